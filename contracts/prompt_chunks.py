"""Which prompt tokens a step takes: the one rule the engine's scheduler (engine/prompt_queue.py)
and the planner's simulator (launcher/planner/simulator.py) both run, so the simulator prices the
steps the engine takes.

Waiting prompts start FCFS, with no skipping ahead; a started prompt (one that runs in chunks) gives
its next chunk before any waiting prompt starts. A prompt runs whole or, where it may split (every
prompt of a chunked colocated instance, one longer than L_m on a prefill instance, none under
prefill_first), as much of it as the step's budget holds. A prefix found in a cache runs no step.
Admission (blocks, batch room) is the caller's, handed in. Pure Python.
"""
from __future__ import annotations

from collections import deque
from typing import Callable, Generic, Optional, TypeVar

P = TypeVar("P")


class PromptChunks(Generic[P]):
    def __init__(self, tokens: Callable[[P], int], uncached: Callable[[P], int], cached: Callable[[P], int]):
        """tokens(p): its prompt length; uncached(p): the tokens a waiting prompt would run (past
        what a prefix cache holds of it now); cached(p): of an admitted one, the tokens its cache
        hit covers (where its first chunk starts)."""
        self.tokens, self.uncached, self.cached = tokens, uncached, cached
        self.waiting: deque[P] = deque()          # not admitted yet
        self.started: deque[list] = deque()       # [prompt, tokens given to steps or cached so far]

    def __len__(self) -> int:
        return len(self.waiting) + len(self.started)

    def add(self, prompt: P) -> None:
        self.waiting.append(prompt)

    def drop_waiting(self, match: Callable[[P], bool]) -> Optional[P]:
        """Takes out the first waiting prompt that matches (an abort); None if no waiting one does."""
        found = next((p for p in self.waiting if match(p)), None)
        if found is not None:
            self.waiting.remove(found)
        return found

    def take(self, budget: int, splits: Callable[[int], bool], admit: Callable[[P, int], bool],
             on_chunk: Callable[[P, int], None] = lambda prompt, end: None) -> list[tuple[P, int, int]]:
        """(prompt, tokens before the chunk, chunk tokens) of one step with `budget` tokens left.
        splits(n): whether a prompt with n tokens to run may run in chunks; admit(prompt, chunks so
        far) takes a waiting prompt in, or says there is no room (backpressure); on_chunk(prompt,
        end) hears at once that its prompt tokens up to `end` are given to a step (a later prompt of
        the same step may find them in the cache)."""
        chunks = []
        while budget > 0 and self:
            if not self.started:
                prompt = self.waiting[0]
                tail = self.uncached(prompt)
                if tail > budget and chunks and not splits(tail):
                    break  # a whole prompt that does not fit: the next step
                if not admit(prompt, len(chunks)):
                    break
                self.waiting.popleft()
                self.started.append([prompt, self.cached(prompt)])
            entry = self.started[0]
            prompt, done = entry
            total = self.tokens(prompt)
            n = min(total - done, budget) if splits(total - self.cached(prompt)) else total - done
            chunks.append((prompt, done, n))
            entry[1] += n
            budget -= n
            on_chunk(prompt, done + n)
            if done + n == total:
                self.started.popleft()
        return chunks
