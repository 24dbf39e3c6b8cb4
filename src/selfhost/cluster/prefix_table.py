"""Prefix-aware replica choice, free of Ray: block-chain keys of a prompt and where each was sent.

A prompt's leading tokens are cut into blocks (16 tokens, as the engine's KV
blocks) and each block gets a key chained over every block before it, so one
key stands for a whole prefix. The table remembers which replica each key last
went to: a request goes to the replica that got the longest prefix it shares
with an earlier request (that replica's prefix cache most likely still holds
it), unless that replica has more than `imbalance` requests in flight beyond
the least busy one; then, and for a prefix seen nowhere, to the least busy.

The keys steer routing only; the engines key their caches by SHA-256 of the
tokens themselves, so a colliding key costs a cache miss, never wrong output.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Hashable, Mapping, Sequence

ROUTING_BLOCK_TOKENS = 16
MAX_ROUTING_BLOCKS = 128  # prefixes up to 2,048 tokens steer routing; longer ones share these keys
TABLE_ENTRIES = 200_000  # keys remembered (least recently used forgotten): a few MB


def prefix_keys(prompt_ids: Sequence[int], salt: bytes | None = None,
                block_tokens: int = ROUTING_BLOCK_TOKENS, max_blocks: int = MAX_ROUTING_BLOCKS) -> list[int]:
    """One key per full leading block, each chained over the ones before (shortest prefix first)."""
    keys, parent = [], hash(salt)
    for start in range(0, min(len(prompt_ids) // block_tokens, max_blocks) * block_tokens, block_tokens):
        parent = hash((parent, tuple(prompt_ids[start:start + block_tokens])))
        keys.append(parent)
    return keys


class PrefixTable:
    """Which replica each prefix key was last sent to, bounded (LRU)."""

    def __init__(self, max_entries: int = TABLE_ENTRIES):
        self.max_entries = max_entries
        self._owner: OrderedDict[int, Hashable] = OrderedDict()
        self.num_routed = 0
        self.num_affinity = 0  # requests sent where an earlier one with a shared prefix went

    def choose(self, keys: Sequence[int], in_flight: Mapping[Hashable, int], imbalance: int) -> Hashable:
        """The replica for a request with these prefix keys, among those in `in_flight` (replica -> requests)."""
        assert in_flight, "no replica to choose from"
        least_busy = min(in_flight.values())
        for key in reversed(keys):  # longest shared prefix first
            owner = self._owner.get(key)
            if owner is None or owner not in in_flight:
                continue
            if in_flight[owner] <= least_busy + imbalance:
                self.num_affinity += 1
                return owner
            break  # its holder is too busy: a shorter match would most likely name the same replica
        # Least busy; ties go by the first key, so the replica a prefix lands on does not depend on order.
        tied = sorted((r for r, n in in_flight.items() if n == least_busy), key=str)
        return tied[(keys[0] if keys else 0) % len(tied)]

    def record(self, keys: Sequence[int], replica: Hashable) -> None:
        """`replica` now holds these prefixes (its engine will cache them)."""
        self.num_routed += 1
        for key in keys:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)

    def forget(self, replica: Hashable) -> None:
        """Drop a replica that is gone, so its prefixes are routed afresh."""
        for key in [k for k, r in self._owner.items() if r == replica]:
            del self._owner[key]
