"""What a KV transfer's point-to-point ops need while they are in flight: their completion in
posting order with what to do once each completes (`Completions`), gloo's helper thread that
completes its works (`drive_to_completion`), and staging buffers reused across requests
(`StagingPool`). engine/kv_transfer.py says why completion, never wait(), decides."""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch

POOL_BYTES = 256 << 20


class StagingPool:
    """Reused transfer buffers: on the CPU a fresh 100 MB buffer costs about as much in page faults
    as the copy into it. Free buffers are kept up to POOL_BYTES (bounded memory)."""

    def __init__(self, limit_bytes: int = POOL_BYTES):
        self.limit = limit_bytes
        self.free: list[torch.Tensor] = []
        self.lent: dict[int, torch.Tensor] = {}  # id(view handed out) -> its flat buffer

    def take(self, shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        numel = math.prod(shape)
        fits = [i for i, b in enumerate(self.free)
                if numel <= b.numel() <= 2 * numel and b.dtype == dtype and b.device == device]
        if fits:
            flat = self.free.pop(min(fits, key=lambda i: self.free[i].numel()))
        else:
            flat = torch.empty(1 << max(numel - 1, 1).bit_length(), dtype=dtype, device=device)
        view = flat[:numel].view(shape)
        self.lent[id(view)] = flat
        return view

    def give(self, buf: torch.Tensor) -> None:
        self.free.append(self.lent.pop(id(buf)))
        while sum(b.numel() * b.element_size() for b in self.free) > self.limit:
            self.free.pop(max(range(len(self.free)), key=lambda i: self.free[i].numel()))


@dataclass(frozen=True)
class PostedOp:
    """A posted send or receive (a torch.distributed work) and what to do once it completes."""

    work: Any
    on_done: Optional[Callable[[], None]] = None


class Completions:
    """Posted ops of one request, in posting order. advance() runs the callbacks of every op
    completed so far, oldest first, without blocking, and says whether all are done."""

    def __init__(self, ops: list[PostedOp]):
        self.ops, self.done = ops, 0

    def advance(self) -> bool:
        while self.done < len(self.ops) and self.ops[self.done].work.is_completed():
            on_done = self.ops[self.done].on_done
            if on_done is not None:
                on_done()
            self.done += 1
        return self.done == len(self.ops)


def drive_to_completion(works: list) -> None:
    """gloo only: its works complete inside wait() alone, so a helper thread (which releases the
    GIL) waits on them in order. A wait that fails (a peer died) leaves the rest incomplete: the
    request never arrives, and the launcher and the controller's watchdog name the dead rank."""
    def wait_all():
        for work in works:
            work.wait()

    threading.Thread(target=wait_all, daemon=True).start()
