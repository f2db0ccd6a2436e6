"""A machine's fingerprint: what makes a latency profile measured on one machine wrong on another.

CPU model and the flags that change a forward's speed (AVX2, AVX-512, its bf16/VNNI forms, AMX),
or GPU name and count; the dtype; the torch version; the threads per rank and the cores. `pdlaunch
profile` records it and the planner compares it with the machine it plans on (launcher/calibrate.py).
Pure reading of /proc/cpuinfo, nvidia-smi and package metadata: no torch.
"""
from __future__ import annotations

import os
import subprocess
from importlib import metadata

from launcher.dtypes import cpu_flags

SPEED_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "avx_vnni", "amx_tile", "amx_bf16", "amx_int8")
THREADS_PER_RANK = 1  # every rank runs torch with one thread (engine/data_plane.py, OMP_NUM_THREADS=1)


def cpu_model(cpuinfo: str = "/proc/cpuinfo") -> str:
    try:
        with open(cpuinfo, encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def gpus() -> list[str]:
    """Names of this machine's NVIDIA GPUs (empty without nvidia-smi)."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return []
    return [line.strip() for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


def torch_version() -> str:
    try:
        return metadata.version("torch")
    except metadata.PackageNotFoundError:
        return "none"


def fingerprint(device: str, dtype: str) -> dict:
    """This machine, as a profile's timings depend on it."""
    if device == "cuda":
        names = gpus()
        hardware = {"gpu": names[0] if names else "none", "gpu_count": len(names)}
    else:
        hardware = {"cpu": cpu_model(), "cpu_flags": sorted(set(SPEED_FLAGS) & cpu_flags()), "cores": os.cpu_count()}
    return hardware | {"dtype": dtype, "torch": torch_version(), "threads_per_rank": THREADS_PER_RANK}


def differences(profiled: dict, here: dict) -> list[str]:
    """What differs between a profile's machine and this one, in words (empty: the same kind)."""
    return [f"{key} {profiled.get(key)!r} there, {here.get(key)!r} here"
            for key in sorted(set(profiled) | set(here)) if profiled.get(key) != here.get(key)]
