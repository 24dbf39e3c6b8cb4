"""Hands out fixed-size KV blocks and shares full blocks between sequences.

A full block is identified by a SHA-256 digest of its token ids chained with
the digest of the block before it, so two sequences share a block only when
their whole prefix up to and including it is identical. The digest is
cryptographic on purpose: with a 64-bit `hash()` one client could craft a
prompt whose blocks collide with another client's and be served its KV. Blocks whose last user finished
keep their contents and hash: they sit in an LRU pool and are reused on a
prefix hit, or evicted (oldest first) when a fresh block is needed.
"""

from __future__ import annotations

import hashlib
import struct
from collections import OrderedDict, deque

from selfhost.engine.sequence import Sequence

# Stands in for the parent digest of a sequence's first block, so every hashed message has one layout.
ROOT_DIGEST = bytes(hashlib.sha256().digest_size)


def cache_root(cache_salt: bytes | None) -> bytes | None:
    """The parent digest of a sequence's first block: requests share cached blocks only under the same salt
    (the server's `--prefix-cache-scope key` salts with the API key's digest)."""
    return None if cache_salt is None else hashlib.sha256(b"selfhost prefix-cache scope\0" + cache_salt).digest()


def block_hash(parent: bytes | None, tokens: list[int]) -> bytes:
    """SHA-256 over the parent block's digest, then this block's token ids as little-endian int32."""
    digest = hashlib.sha256(parent or ROOT_DIGEST)
    digest.update(struct.pack(f"<{len(tokens)}i", *tokens))
    return digest.digest()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.ref_counts = [0] * num_blocks
        self.block_hashes: list[bytes | None] = [None] * num_blocks
        self.free_blocks: deque[int] = deque(range(num_blocks))  # empty, no cached content
        self.evictable: OrderedDict[int, None] = OrderedDict()  # ref 0 but cached, LRU first
        self.cached: dict[bytes, int] = {}  # digest -> block id
        self.prefix_queried_tokens = 0
        self.prefix_hit_tokens = 0

    @property
    def num_free(self) -> int:
        return len(self.free_blocks) + len(self.evictable)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    @property
    def prefix_hit_rate(self) -> float:
        return self.prefix_hit_tokens / self.prefix_queried_tokens if self.prefix_queried_tokens else 0.0

    def _blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- prefix reuse ------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> None:
        """Attach cached blocks for the longest cached prefix of a new (or preempted) sequence."""
        assert not seq.block_table
        # A cached block's rows are never computed, so prompt logprobs could not be scored there.
        if not self.enable_prefix_caching or seq.needs_prompt_logprobs:
            return
        tokens = seq.token_ids
        # The last token is always computed so the step yields its logits:
        # never take the block holding it from the cache.
        max_full = (len(tokens) - 1) // self.block_size
        parent = seq.cache_root
        for i in range(max_full):
            h = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            block = self.cached.get(h)
            if block is None:
                break
            self._take(block)
            seq.block_table.append(block)
            seq.block_hashes.append(h)
            parent = h
        seq.num_computed_tokens = len(seq.block_table) * self.block_size

    def record_admission(self, seq: Sequence) -> None:
        """Count a sequence's prompt against the prefix-cache hit rate once it is admitted; the first admission
        also tells the sequence how much of its prompt the cache held (a preempted one's later admissions
        find its own blocks)."""
        self.prefix_queried_tokens += seq.num_tokens
        self.prefix_hit_tokens += seq.num_computed_tokens
        if seq.num_preemptions == 0:
            seq.num_cached_prompt_tokens = min(seq.num_computed_tokens, len(seq.prompt_ids))

    def _take(self, block: int) -> None:
        if self.ref_counts[block] == 0:
            self.evictable.pop(block, None)
        self.ref_counts[block] += 1

    # -- allocation --------------------------------------------------------

    def can_grow(self, seq: Sequence, num_new_tokens: int) -> bool:
        needed = self._blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        return needed <= self.num_free

    def grow(self, seq: Sequence, num_new_tokens: int) -> None:
        """Make room for the KV of `num_new_tokens` more tokens of `seq`."""
        needed = self._blocks_for(seq.num_computed_tokens + num_new_tokens) - len(seq.block_table)
        for _ in range(needed):
            seq.block_table.append(self._fresh_block())

    def _fresh_block(self) -> int:
        if self.free_blocks:
            block = self.free_blocks.popleft()
        else:
            block, _ = self.evictable.popitem(last=False)  # least recently used
            del self.cached[self.block_hashes[block]]
            self.block_hashes[block] = None
        self.ref_counts[block] = 1
        return block

    def commit_full_blocks(self, seq: Sequence) -> None:
        """Register blocks that became full and computed, so later requests can share them."""
        if not self.enable_prefix_caching:
            return
        num_full = seq.num_computed_tokens // self.block_size
        tokens = seq.token_ids
        while len(seq.block_hashes) < num_full:
            i = len(seq.block_hashes)
            parent = seq.block_hashes[-1] if seq.block_hashes else seq.cache_root
            h = block_hash(parent, tokens[i * self.block_size : (i + 1) * self.block_size])
            seq.block_hashes.append(h)
            block = seq.block_table[i]
            if h not in self.cached:
                self.cached[h] = block
                self.block_hashes[block] = h

    def trim(self, seq: Sequence) -> None:
        """Release the blocks past the sequence's computed tokens (a rejected proposal's KV slots):
        it then holds exactly the blocks a step without the proposal would have left it."""
        keep = self._blocks_for(seq.num_computed_tokens)
        while len(seq.block_table) > keep:
            block = seq.block_table.pop()
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                # Never committed (past the computed tokens): no cached contents to keep.
                self.free_blocks.append(block)

    def free(self, seq: Sequence) -> None:
        """Release every block of `seq`; cached ones stay reusable until evicted."""
        for block in reversed(seq.block_table):
            self.ref_counts[block] -= 1
            if self.ref_counts[block] == 0:
                if self.block_hashes[block] is not None:
                    self.evictable[block] = None
                else:
                    self.free_blocks.append(block)
        seq.block_table.clear()
        seq.block_hashes.clear()
        seq.num_computed_tokens = 0
