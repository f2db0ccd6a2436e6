"""KV block bookkeeping for the leader's scheduler: how many blocks a request needs and which ids
are free. Pure Python, no torch: the scheduler imports it without loading the model stack."""
from __future__ import annotations

import bisect


def blocks_for(tokens: int, block_size: int) -> int:
    return -(-tokens // block_size)


class BlockAllocator:
    """Free blocks as runs of consecutive ids. An allocation takes the smallest run that holds it
    whole, so a request's blocks are usually consecutive (its KV then moves between instances
    without copies, engine.kv_transfer); only when no run is long enough does it take pieces of
    the longest runs. Pure bookkeeping, no tensors."""

    def __init__(self, num_blocks: int):
        self.num_blocks = num_blocks
        self._starts: list[int] = [0] if num_blocks else []  # sorted first ids of the free runs
        self._length: dict[int, int] = {0: num_blocks} if num_blocks else {}
        self._num_free = num_blocks

    @property
    def num_free(self) -> int:
        return self._num_free

    @property
    def num_used(self) -> int:
        return self.num_blocks - self._num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self._num_free

    def allocate(self, n: int) -> list[int]:
        if n > self._num_free:
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {self._num_free} free")
        taken: list[int] = []
        fits = [s for s in self._starts if self._length[s] >= n]
        while len(taken) < n:
            start = (min(fits, key=lambda s: (self._length[s], s)) if fits
                     else max(self._starts, key=lambda s: (self._length[s], -s)))
            k = min(n - len(taken), self._length[start])
            taken += range(start, start + k)
            self._take(start, k)
        self._num_free -= n
        return taken

    def _take(self, start: int, k: int) -> None:
        """Removes the first k blocks of the run at `start`."""
        i = bisect.bisect_left(self._starts, start)
        length = self._length.pop(start)
        del self._starts[i]
        if length > k:
            self._starts.insert(i, start + k)
            self._length[start + k] = length - k

    def free(self, blocks: list[int]) -> None:
        ordered = sorted(blocks)
        run_start = 0
        for j in range(1, len(ordered) + 1):
            if j == len(ordered) or ordered[j] != ordered[j - 1] + 1:
                self._insert(ordered[run_start], j - run_start)
                run_start = j
        self._num_free += len(blocks)

    def _insert(self, start: int, k: int) -> None:
        """Adds a free run, merged with the runs it touches."""
        i = bisect.bisect_left(self._starts, start)
        if i < len(self._starts) and self._starts[i] == start + k:
            k += self._length.pop(self._starts.pop(i))
        before = self._starts[i - 1] if i else None
        if before is not None and before + self._length[before] == start:
            self._length[before] += k
        else:
            self._starts.insert(i, start)
            self._length[start] = k
