"""`model.dtype: auto`: bf16 where the hardware computes it natively, else fp32.

On CPUs bf16 pays only with native bf16 instructions (avx512_bf16 or AMX): there a bf16 matmul runs
~4x an fp32 one and weights stream half the bytes; without them torch emulates bf16 and is slower
than fp32. CUDA GPUs from Ampere on have bf16. The engine applies the same rule on every rank and
the job takes bf16 only if every rank can (KV moves between ranks in one dtype). Pure, no torch.
"""
from __future__ import annotations

AUTO = "auto"
NATIVE_BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    """This machine's CPU feature flags (empty where /proc/cpuinfo is missing: not Linux)."""
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_has_native_bf16(flags: set[str]) -> bool:
    return any(flag in flags for flag in NATIVE_BF16_CPU_FLAGS)


def choose_dtype(requested: str, bf16_native: bool) -> str:
    """The dtype a job runs in: an explicit choice as is; auto: bfloat16 where native, else float32."""
    if requested != AUTO:
        return requested
    return "bfloat16" if bf16_native else "float32"


def planned_dtype(requested: str, device: str) -> str:
    """What the launcher expects the engine to choose, for planning (KV bytes per token): CUDA GPUs
    are taken to have bf16; a CPU job is judged by this machine's CPU."""
    return choose_dtype(requested, device == "cuda" or cpu_has_native_bf16(cpu_flags()))
