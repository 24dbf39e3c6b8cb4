"""Prefix-cache keys: SHA-256 digests of the token bytes, chained block to block."""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass, field

from selfhost.engine.block_manager import ROOT_DIGEST, BlockManager, block_hash

BLOCK = 4


@dataclass
class FakeSequence:
    """The fields the block manager reads and writes, without a tokenizer or model."""

    token_ids: list[int]
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)
    num_computed_tokens: int = 0
    needs_prompt_logprobs: bool = False
    cache_root: bytes | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


def computed(manager: BlockManager, tokens: list[int]) -> FakeSequence:
    """A sequence whose whole prompt ran: its full blocks are committed to the cache."""
    seq = FakeSequence(list(tokens))
    manager.match_prefix(seq)
    manager.grow(seq, seq.num_tokens - seq.num_computed_tokens)
    seq.num_computed_tokens = seq.num_tokens
    manager.commit_full_blocks(seq)
    return seq


def expected_digest(parent: bytes, tokens: list[int]) -> bytes:
    return hashlib.sha256(parent + struct.pack(f"<{len(tokens)}i", *tokens)).digest()


def test_keys_are_sha256_of_the_parent_digest_and_the_token_bytes():
    tokens = list(range(100, 100 + 3 * BLOCK))
    seq = computed(BlockManager(8, BLOCK), tokens)
    first = expected_digest(ROOT_DIGEST, tokens[:BLOCK])
    second = expected_digest(first, tokens[BLOCK : 2 * BLOCK])
    third = expected_digest(second, tokens[2 * BLOCK :])
    assert seq.block_hashes == [first, second, third]
    assert all(isinstance(h, bytes) and len(h) == 32 for h in seq.block_hashes)
    assert block_hash(None, tokens[:BLOCK]) == first


def test_same_prefix_hits_the_cache():
    manager = BlockManager(16, BLOCK)
    prompt = list(range(1, 2 * BLOCK + 3))
    first = computed(manager, prompt)
    manager.free(first)
    again = FakeSequence(prompt[: 2 * BLOCK] + [99, 98])
    manager.match_prefix(again)
    assert again.num_computed_tokens == 2 * BLOCK
    assert again.block_hashes == [expected_digest(ROOT_DIGEST, prompt[:BLOCK]),
                                  expected_digest(again.block_hashes[0], prompt[BLOCK : 2 * BLOCK])]


def test_a_different_earlier_token_changes_every_later_key():
    tokens = list(range(10, 10 + 4 * BLOCK))
    changed = list(tokens)
    changed[1] += 1  # first block only
    a = computed(BlockManager(8, BLOCK), tokens).block_hashes
    b = computed(BlockManager(8, BLOCK), changed).block_hashes
    assert len(a) == len(b) == 4
    assert all(x != y for x, y in zip(a, b))
    # ... and so the changed prompt shares nothing with the cached one.
    manager = BlockManager(16, BLOCK)
    manager.free(computed(manager, tokens))
    probe = FakeSequence(changed + [1])
    manager.match_prefix(probe)
    assert probe.block_table == [] and probe.num_computed_tokens == 0
