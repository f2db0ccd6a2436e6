"""megatron-core, imported without the TorchDynamo start-up it does not need here.

Importing megatron.core decorates its fused kernels (bias-GeLU, SwiGLU, rotary, ...) with
`megatron.core.jit.jit_fuser`, which is torch.compile, and the first torch.compile imports
TorchDynamo and Inductor: 3-5 s of every rank's start on these CPUs, more than torch itself.
pdlaunch runs none of those kernels (only the tensor-parallel linear and embedding layers and
HyperCommGrid), so megatron is imported with its JIT fuser off from the first decoration: the
state megatron's own `disable_jit_fuser()` leaves, which it can only set after its import.
Every rank imports megatron through here before anything else of it.
"""
from __future__ import annotations

import sys


def _eager(model=None, **_options):
    """torch.compile's signature, compiling nothing: `@torch.compile` and `torch.compile(...)(f)`."""
    return model if model is not None else (lambda fn: fn)


def import_megatron() -> None:
    """Imports megatron.core (once) with torch.compile as the identity, then turns its JIT fuser
    off for any later decoration."""
    if "megatron.core" in sys.modules:
        return
    import torch

    compile_ = torch.compile
    torch.compile = _eager
    try:
        import megatron.core  # noqa: F401
    finally:
        torch.compile = compile_
    from megatron.core.jit import disable_jit_fuser

    disable_jit_fuser()
