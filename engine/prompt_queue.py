"""The prompts an instance has yet to prefill, and which of their tokens the next step takes.

Waiting prompts are taken FCFS, with no skipping ahead; a started prompt (one that runs in chunks)
gives its next chunk before any waiting prompt starts. A prompt runs whole, or, where it may
split (every prompt of a chunked colocated instance, one longer than L_m on a prefill instance,
none under prefill_first), as much of it as the step's budget holds; its KV grows chunk by chunk
in its blocks. Admission (blocks, batch room, announcing the KV) is the scheduler's, handed in.
launcher/planner/sim_steps.PromptQueue is the simulator's copy of the same rule
(tests/test_scheduler.py checks that both take the same chunks). Pure Python: no torch.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Optional

from contracts.protocol import SeqChunk
from engine.seq_blocks import SequenceBlocks
from engine.sequence import Sequence


class PromptQueue:
    def __init__(self, blocks: SequenceBlocks, split_longer_than: Optional[int]):
        """Prompts with more tokens to run than `split_longer_than` may run in chunks (0: every
        prompt; None: none, a prompt longer than the budget runs alone in its step)."""
        self.blocks, self.split_longer_than = blocks, split_longer_than
        self.waiting: deque[Sequence] = deque()      # not admitted yet
        self.prefilling: deque[Sequence] = deque()   # admitted, prompt not all given to steps yet

    def __len__(self) -> int:
        return len(self.waiting) + len(self.prefilling)

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def drop_waiting(self, req_id: int) -> Optional[Sequence]:
        """Takes a request out that has not started (an abort); None if it has."""
        seq = next((s for s in self.waiting if s.req_id == req_id), None)
        if seq is not None:
            self.waiting.remove(seq)
        return seq

    def splits(self, tokens: int) -> bool:
        return self.split_longer_than is not None and tokens > self.split_longer_than

    def take(self, budget: int, admit: Callable[[Sequence], bool]) -> list[tuple[Sequence, SeqChunk]]:
        """The prompt chunks of a step with `budget` tokens left. `admit(seq)` gives a waiting
        prompt its blocks (and sets its cached prefix), or says there is no room (backpressure)."""
        chunks = []
        while budget > 0 and self:
            started = bool(self.prefilling)
            seq = self.prefilling[0] if started else self.waiting[0]
            n = len(seq.request.prompt_ids)
            if not started:
                tail = self.blocks.uncached(seq)
                if tail > budget and chunks and not self.splits(tail):
                    break  # a whole prompt that does not fit: the next step
                if not admit(seq):
                    break
                self.waiting.popleft()
                self.prefilling.append(seq)
            take = min(n - seq.prefilled, budget) if self.splits(n - seq.cached_tokens) else n - seq.prefilled
            chunks.append((seq, SeqChunk(seq.req_id, tuple(seq.request.prompt_ids[seq.prefilled:seq.prefilled + take]),
                                         seq.prefilled, tuple(seq.blocks), seq.request.sampling, 0)))
            seq.prefilled += take
            budget -= take
            self.blocks.written(seq, seq.prefilled)
            if seq.prefilled == n:
                self.prefilling.remove(seq)
        return chunks
