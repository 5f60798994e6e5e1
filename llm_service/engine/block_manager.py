"""Paged KV cache bookkeeping: fixed-size blocks, per-sequence block tables, prefix cache.

With prefix caching every FULL computed block gets a hash chained over its predecessors
(hash of block i covers blocks 0..i, image rows included by image key and row offset),
so equal prefixes map to the same physical block. Blocks are ref-counted; a cached block
nobody uses stays findable until its space is needed (least recently released first).
"""
from __future__ import annotations

import hashlib
from collections import OrderedDict, deque

from llm_service.engine.sequence import Sequence

Hit = tuple[int, bytes]  # (block id, chained hash)


def _chain(prev: bytes, content: bytes) -> bytes:
    return hashlib.blake2b(prev + content, digest_size=16).digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = enable_prefix_caching
        self.ref_count = [0] * num_blocks
        self.block_hash: list[bytes | None] = [None] * num_blocks
        self.hash_to_block: dict[bytes, int] = {}
        self.free: deque[int] = deque(range(num_blocks))  # free, holding nothing reusable
        self.evictable: OrderedDict[int, None] = OrderedDict()  # free, still cached; LRU first

    @property
    def num_free_blocks(self) -> int:
        return len(self.free) + len(self.evictable)

    def blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, seq: Sequence) -> list[Hit]:
        """Cached blocks equal to seq's leading full blocks. At least the last prompt token
        is left to compute, since its logits are needed."""
        if not self.prefix_caching:
            return []
        hits: list[Hit] = []
        prev = b""
        for i in range((len(seq) - 1) // self.block_size):
            prev = _chain(prev, seq.block_content(i, self.block_size))
            block = self.hash_to_block.get(prev)
            if block is None:
                break
            hits.append((block, prev))
        return hits

    def can_admit(self, hits: list[Hit], num_tokens: int) -> bool:
        """Whether a new sequence reusing `hits` can hold `num_tokens` positions."""
        reclaimed = sum(1 for block, _ in hits if self.ref_count[block] == 0)
        return self.blocks_for(num_tokens) - len(hits) <= self.num_free_blocks - reclaimed

    def admit(self, seq: Sequence, hits: list[Hit], num_tokens: int) -> None:
        for block, h in hits:
            if self.ref_count[block] == 0:
                del self.evictable[block]
            self.ref_count[block] += 1
            seq.block_table.append(block)
            seq.block_hashes.append(h)
        self.grow(seq, num_tokens)

    def blocks_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New blocks seq needs to hold `num_tokens` positions."""
        return max(0, self.blocks_for(num_tokens) - len(seq.block_table))

    def can_grow(self, seq: Sequence, num_tokens: int) -> bool:
        return self.blocks_needed(seq, num_tokens) <= self.num_free_blocks

    def grow(self, seq: Sequence, num_tokens: int) -> None:
        """Extend seq's block table to cover `num_tokens` positions (checked by can_grow)."""
        while len(seq.block_table) < self.blocks_for(num_tokens):
            seq.block_table.append(self._allocate())

    def _allocate(self) -> int:
        if self.free:
            block = self.free.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)
            del self.hash_to_block[self.block_hash[block]]
            self.block_hash[block] = None
        self.ref_count[block] = 1
        return block

    def release(self, seq: Sequence) -> None:
        """Drop seq's references; tail blocks first, so they are evicted before the
        prefix blocks other requests are likelier to share."""
        for block in reversed(seq.block_table):
            self.ref_count[block] -= 1
            if self.ref_count[block] == 0:
                if self.block_hash[block] is None:
                    self.free.append(block)
                else:
                    self.evictable[block] = None
        seq.block_table = []
        seq.block_hashes = []

    def commit(self, seq: Sequence) -> None:
        """Hash the blocks seq has newly filled with computed K/V, making them findable.
        A step launched ahead computes a position whose id is not on the host yet: only
        blocks whose ids are all known count."""
        if not self.prefix_caching:
            return
        for i in range(len(seq.block_hashes), min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size):
            prev = seq.block_hashes[-1] if seq.block_hashes else b""
            h = _chain(prev, seq.block_content(i, self.block_size))
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.hash_to_block:  # an equal block computed concurrently keeps its place
                self.hash_to_block[h] = block
                self.block_hash[block] = h
