"""Cache-aware dispatch on the controller (Mooncake's cache-aware scheduling, Dynamo's KV-aware
routing): a request goes to the prefill (or colocated) instance where the fewest prompt tokens stand
between it and its first token.

An instance's cost for a prompt is the prompt tokens it has been sent and not yet prefilled (its
queue, each counted without the part its cache was expected to hold) plus this prompt's tokens past
its cached prefix there. Both are tokens the instance must run before this request's first token,
so a cached prefix is worth its length in queued tokens: a 512-token hit wins unless that
instance's queue holds more than 512 uncached tokens beyond the other's. Ties go to the fewer
outstanding requests, then the lower id.

The controller does not ask the instances what they cache: it keeps, per instance, the block names
of the prompts it sent there, least recently sent dropped beyond the instance's own number of KV
blocks (as SGLang's router keeps an approximate tree). The instance decides the real hits; an
eviction the controller did not foresee costs one misjudged dispatch, never a wrong token.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

from engine.prefix_cache import block_hashes, reusable_blocks


class CacheAwareDispatch:
    def __init__(self, kv_blocks: dict[int, int], block_size: int):
        """kv_blocks: each entry instance's id -> its KV blocks (a prefill instance's hold area)."""
        self.block_size, self.capacity = block_size, kv_blocks
        self.sent: dict[int, OrderedDict[bytes, None]] = {i: OrderedDict() for i in kv_blocks}
        self.queued = {i: 0 for i in kv_blocks}  # uncached prompt tokens sent, first token not back yet

    def _uncached(self, instance: int, names: list[bytes], prompt_len: int) -> int:
        sent, hit = self.sent[instance], 0
        for name in names[:reusable_blocks(prompt_len, self.block_size)]:
            if name not in sent:
                break
            hit += 1
        return prompt_len - hit * self.block_size

    def pick(self, prompt_ids: Sequence[int], load: dict[int, int]) -> tuple[int, int]:
        """(the instance to send the prompt to, the prompt tokens it is expected to run there)."""
        names = block_hashes(prompt_ids, self.block_size)
        tails = {i: self._uncached(i, names, len(prompt_ids)) for i in self.sent}
        best = min(self.sent, key=lambda i: (self.queued[i] + tails[i], load[i], i))
        self._remember(best, names)
        self.queued[best] += tails[best]
        return best, tails[best]

    def finished(self, instance: int, token_ids: Sequence[int]) -> None:
        """A colocated instance finished a request: the full blocks of its prompt and output (but
        the last token) stay in its cache, for a later turn that resends them."""
        self._remember(instance, block_hashes(token_ids, self.block_size))

    def _remember(self, instance: int, names: list[bytes]) -> None:
        sent = self.sent[instance]
        for name in names:
            sent[name] = None
            sent.move_to_end(name)
        while len(sent) > self.capacity[instance]:
            sent.popitem(last=False)

    def prefilled(self, instance: int, tokens: int) -> None:
        """A request sent there with `tokens` expected to run has its first token."""
        self.queued[instance] -= tokens
