"""The steps a leader has scheduled and not had the tokens of yet, oldest first: with PP and batches
in flight up to `depth` (the pipeline depth) of them run through the stages at once. A running
sequence in one of them waits for its token before its next step; the running sequences that are
free take turns through the stages in groups of at most 1/depth of the batch (vLLM's and
DistServe's decode micro-batches). A prompt's next chunk may start before its previous one has left
the last stage: every stage runs the steps in order, so the KV it attends to is there. A chunk
that does not end its prompt runs for its KV alone: the token the ranks sample for it is dropped.
Pure Python: no torch.
"""
from __future__ import annotations

from collections import deque

from contracts.protocol import SeqChunk
from engine.sequence import Sequence


class StepsInFlight:
    def __init__(self, depth: int):
        self.depth = depth
        self.steps: deque[list[tuple[Sequence, bool]]] = deque()  # its sequences, whether it samples their token

    def __bool__(self) -> bool:
        return bool(self.steps)

    def add(self, decodes: list[Sequence], prompts: list[tuple[Sequence, SeqChunk]]) -> None:
        """A step of these decodes and prompt chunks; a chunk short of its prompt's end samples no token."""
        step = [(seq, True) for seq in decodes] + \
               [(seq, chunk.start_pos + len(chunk.token_ids) == len(seq.request.prompt_ids)) for seq, chunk in prompts]
        if step:
            self.steps.append(step)

    def oldest(self) -> list[tuple[Sequence, bool]]:
        """Takes the oldest step out (its tokens came)."""
        return self.steps.popleft()

    def clear(self) -> None:
        self.steps.clear()

    def flying(self) -> set[int]:
        """Ids of the sequences in steps in flight."""
        return {seq.req_id for step in self.steps for seq, _ in step}

    def decode_group(self, running: list[Sequence]) -> list[Sequence]:
        """The running sequences of the next decode step: those not in a step in flight, at most
        1/depth of the batch, so that `depth` groups take turns through the PP stages."""
        size = -(-len(running) // self.depth)
        flying = self.flying()
        return [seq for seq in running if seq.req_id not in flying][:size]
