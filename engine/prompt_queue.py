"""The prompts an instance has yet to prefill, as steps take them: contracts.prompt_chunks' rule
(shared with the simulator) over the engine's sequences, their blocks and prefix cache. Admission
(blocks, batch room, announcing the KV) is the scheduler's, handed in. Pure Python: no torch.
"""
from __future__ import annotations

from typing import Callable, Optional

from contracts.prompt_chunks import PromptChunks
from contracts.protocol import SeqChunk
from engine.seq_blocks import SequenceBlocks
from engine.sequence import Sequence


class PromptQueue:
    def __init__(self, blocks: SequenceBlocks, split_longer_than: Optional[int]):
        """Prompts with more tokens to run than `split_longer_than` may run in chunks (0: every
        prompt; None: none, a prompt longer than the budget runs alone in its step)."""
        self.blocks, self.split_longer_than = blocks, split_longer_than
        self.chunks: PromptChunks[Sequence] = PromptChunks(lambda seq: len(seq.request.prompt_ids), blocks.uncached,
                                                           lambda seq: seq.cached_tokens)

    def __len__(self) -> int:
        return len(self.chunks)

    def add(self, seq: Sequence) -> None:
        self.chunks.add(seq)

    def drop_waiting(self, req_id: int) -> Optional[Sequence]:
        """Takes a request out that has not started (an abort); None if it has."""
        return self.chunks.drop_waiting(lambda seq: seq.req_id == req_id)

    def splits(self, tokens: int) -> bool:
        return self.split_longer_than is not None and tokens > self.split_longer_than

    def take(self, budget: int, admit: Callable[[Sequence], bool]) -> list[tuple[Sequence, SeqChunk]]:
        """The prompt chunks of a step with `budget` tokens left. `admit(seq)` gives a waiting
        prompt its blocks (and sets its cached prefix), or says there is no room (backpressure)."""
        taken = self.chunks.take(budget, self.splits, lambda seq, _: admit(seq), self._given)
        return [(seq, SeqChunk(seq.req_id, tuple(seq.request.prompt_ids[start:start + n]), start, tuple(seq.blocks),
                               seq.request.sampling, 0)) for seq, start, n in taken]

    def _given(self, seq: Sequence, end: int) -> None:
        """Its prompt up to `end` is in a step: written on every rank once the step runs, so a later
        prompt (of this step too) may share its full blocks."""
        seq.prefilled = end
        self.blocks.written(seq, end)
