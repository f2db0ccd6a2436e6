"""An instance's KV blocks as its scheduler hands them to sequences: taken on admission (with
prefix caching, a cached prefix's blocks shared), named once their KV is written so later prompts
find them, freed when the sequence ends here. The scheduler's one view of its blocks, with or
without a prefix cache. Pure Python: no torch."""
from __future__ import annotations

from typing import Optional

from engine.blocks import BlockAllocator
from engine.prefix_cache import PrefixCache, block_hashes
from engine.sequence import Sequence


class SequenceBlocks:
    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool):
        self.block_size = block_size
        self.cache = PrefixCache(num_blocks, block_size) if prefix_caching else None
        self.allocator = self.cache or BlockAllocator(num_blocks)

    @property
    def num_blocks(self) -> int:
        return self.allocator.num_blocks

    @property
    def num_used(self) -> int:
        return self.allocator.num_used

    @property
    def num_free(self) -> int:
        return self.allocator.num_free

    def hashes(self, token_ids) -> list[bytes]:
        """The names of a prompt's full blocks, where this instance caches prefixes."""
        return block_hashes(token_ids, self.block_size) if self.cache else []

    def take(self, seq: Sequence, need: int) -> Optional[int]:
        """Gives a sequence its `need` blocks, with prefix caching its cached prefix's shared;
        returns how many leading blocks came from the cache, None when they do not fit."""
        if self.cache is None:
            if not self.allocator.can_allocate(need):
                return None
            seq.blocks = self.allocator.allocate(need)
            return 0
        taken = self.cache.admit(seq.block_hashes, len(seq.request.prompt_ids), need)
        if taken is None:
            return None
        seq.blocks, hits = taken
        return hits

    def uncached(self, seq: Sequence) -> int:
        """Prompt tokens a waiting sequence would still run (its tail past a cached prefix)."""
        n = len(seq.request.prompt_ids)
        if self.cache is None:
            return n
        return n - len(self.cache.cached_prefix(seq.block_hashes, n)) * self.block_size

    def written(self, seq: Sequence, tokens: int) -> None:
        """The KV of the sequence's first `tokens` prompt tokens is written (on every rank): later
        prompts with the same prefix may share its full blocks."""
        if self.cache:
            self.cache.register(seq.blocks, seq.block_hashes[:tokens // self.block_size])

    def free(self, seq: Sequence, keep_output: bool = False) -> None:
        """Frees a sequence's blocks; `keep_output` (it ends here) keeps the full blocks of its
        prompt and output (but its last token, whose KV no step wrote) cached, for a later turn of
        the conversation that resends them."""
        if self.cache and keep_output:
            self.cache.register(seq.blocks, block_hashes([*seq.request.prompt_ids, *seq.output[:-1]], self.block_size))
        self.allocator.free(seq.blocks)

    def prefix_counts(self) -> tuple[int, int, int]:
        """Prompt tokens admitted, of those served from the prefix cache, and the blocks cached that
        no request holds (free room, counted apart from the blocks in use)."""
        if not self.cache:
            return 0, 0, 0
        counts = self.cache.counts()
        return counts["prefix_query_tokens"], counts["prefix_hit_tokens"], counts["kv_cached"]
