"""Prefix caching: KV blocks shared between requests whose prompts begin alike (vLLM's automatic
prefix caching; SGLang's RadixAttention, in blocks).

A full block is named by a hash of its tokens and of the hash of the block before it, so a name
stands for the whole prefix up to the block's end, and two prompts share their first k blocks'
names exactly when they share their first k blocks of tokens. A prompt then prefills only what
follows its longest run of named blocks already in the cache (the scheduler's extend path).

A block is free (in the BlockAllocator), in use (a reference count: every running request that
reads it holds one, read-only), or cached: named, unreferenced, kept until the space is needed and
then evicted least recently used first. Cached blocks count as free room, so a cache never holds a
request back. Pure Python, no torch: the leader's scheduler and the controller import it.
"""
from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from typing import Optional, Sequence

from engine.blocks import BlockAllocator


def block_hashes(token_ids: Sequence[int], block_size: int) -> list[bytes]:
    """The chained name of each full block of `token_ids` (128-bit: a collision would give a
    request another prompt's KV, so no 64-bit Python hash)."""
    names, parent = [], b""
    for start in range(0, len(token_ids) - block_size + 1, block_size):
        block = array("q", token_ids[start:start + block_size]).tobytes()
        parent = hashlib.blake2b(parent + block, digest_size=16).digest()
        names.append(parent)
    return names


def reusable_blocks(prompt_len: int, block_size: int) -> int:
    """Most leading blocks a prompt may take from the cache: full blocks before its last token,
    which always runs (its logits give the first output token), so the tail is never empty and
    never writes into a shared block."""
    return (prompt_len - 1) // block_size


class PrefixCache:
    """The BlockAllocator's interface (allocate, free, can_allocate, num_free, num_used) over
    blocks that requests share, plus the lookups of prefix caching."""

    def __init__(self, num_blocks: int, block_size: int):
        self.allocator = BlockAllocator(num_blocks)
        self.num_blocks, self.block_size = num_blocks, block_size
        self.refs: dict[int, int] = {}                          # block in use -> requests holding it
        self.by_hash: dict[bytes, int] = {}
        self.hash_of: dict[int, bytes] = {}
        self.evictable: OrderedDict[int, None] = OrderedDict()  # cached, unreferenced; least recent first
        self.query_tokens = 0  # prompt tokens of admitted requests
        self.hit_tokens = 0    # of those, served from the cache

    @property
    def num_free(self) -> int:
        return self.allocator.num_free + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def can_allocate(self, n: int) -> bool:
        return n <= self.num_free

    def allocate(self, n: int) -> list[int]:
        """n fresh blocks, evicting cached ones (least recently used first) where the free ones
        are too few."""
        if n > self.num_free:
            raise RuntimeError(f"KV cache exhausted: need {n} blocks, {self.num_free} free")
        evicted = []
        while self.allocator.num_free + len(evicted) < n:
            block, _ = self.evictable.popitem(last=False)
            del self.by_hash[self.hash_of.pop(block)]
            evicted.append(block)
        self.allocator.free(evicted)
        blocks = self.allocator.allocate(n)
        for block in blocks:
            self.refs[block] = 1
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Drops one reference to each block; a named block nobody holds stays cached. The last
        block of a prefix is queued for eviction before the ones in front of it, which other
        prompts are likelier to share."""
        plain = []
        for block in reversed(blocks):
            self.refs[block] -= 1
            if self.refs[block]:
                continue
            del self.refs[block]
            if block in self.hash_of:
                self.evictable[block] = None
            else:
                plain.append(block)
        self.allocator.free(plain)

    def cached_prefix(self, hashes: list[bytes], prompt_len: int) -> list[int]:
        """The cached blocks of the prompt's longest named prefix (not taken)."""
        hits = []
        for name in hashes[:reusable_blocks(prompt_len, self.block_size)]:
            block = self.by_hash.get(name)
            if block is None:
                break
            hits.append(block)
        return hits

    def admit(self, hashes: list[bytes], prompt_len: int, need: int) -> Optional[tuple[list[int], int]]:
        """A prompt's `need` blocks, its cached prefix shared and the rest fresh, and how many
        came from the cache; None (nothing taken) when the rest does not fit."""
        hits = self.cached_prefix(hashes, prompt_len)
        reclaimed = sum(block in self.evictable for block in hits)  # cached room these hits stop being
        if not self.can_allocate(need - len(hits) + reclaimed):
            return None
        for block in hits:
            self.evictable.pop(block, None)
            self.refs[block] = self.refs.get(block, 0) + 1
        self.query_tokens += prompt_len
        self.hit_tokens += len(hits) * self.block_size
        return hits + self.allocate(need - len(hits)), len(hits)

    def register(self, blocks: list[int], hashes: list[bytes]) -> None:
        """Names blocks whose KV the steps scheduled so far compute (every rank runs steps in
        order, so a later step that reads them finds them written). A name already cached under
        another block (two equal prompts admitted together) leaves this block unnamed."""
        for block, name in zip(blocks, hashes):
            if block not in self.hash_of and name not in self.by_hash:
                self.by_hash[name] = block
                self.hash_of[block] = name

    def counts(self) -> dict:
        """Prompt tokens admitted and, of those, served from the cache (a hit rate's two terms), and
        the blocks cached that no request holds (kept as free room: with the blocks in use and the
        allocator's free ones they account for every block)."""
        return {"prefix_query_tokens": self.query_tokens, "prefix_hit_tokens": self.hit_tokens,
                "kv_cached": len(self.evictable)}


def hit_rate(counts: dict) -> float:
    """Share of an instance's admitted prompt tokens its prefix cache served, from counts() as a
    heartbeat or the final stats carry them."""
    query = counts.get("prefix_query_tokens", 0)
    return counts.get("prefix_hit_tokens", 0) / query if query else 0.0
