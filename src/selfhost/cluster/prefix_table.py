"""Prefix-aware replica choice, free of Ray: block-chain keys of a prompt and which replica holds each.

A prompt's leading tokens are cut into blocks (16 tokens, as the engine's KV
blocks) and each block gets a key chained over every block before it, so one
key stands for a whole prefix. The table remembers the replica that owns each
key: a request goes to the owner of the longest prefix it shares with an
earlier request (that replica's prefix cache most likely still holds it),
unless the owner has more than `imbalance` requests in flight beyond the least
busy replica. Then the request spills to the least busy one, and the shared
prefix keeps its owner: a replica that is busy for a moment does not lose its
prefixes, so they do not bounce between replicas and end up cold in both
caches. A prefix seen nowhere goes to the least busy replica, ties to the one
that took the fewest of the recent requests, so prefixes spread by traffic.

The keys steer routing only; the engines key their caches by SHA-256 of the
tokens themselves, so a colliding key costs a cache miss, never wrong output.
"""

from __future__ import annotations

from collections import Counter, OrderedDict, deque
from collections.abc import Hashable, Mapping, Sequence

ROUTING_BLOCK_TOKENS = 16
MAX_ROUTING_BLOCKS = 128  # prefixes up to 2,048 tokens steer routing; longer ones share these keys
TABLE_ENTRIES = 200_000  # keys remembered (least recently used forgotten): a few MB
RECENT_REQUESTS = 64  # where the last this many requests went: the tie-break for a new prefix


def prefix_keys(prompt_ids: Sequence[int], salt: bytes | None = None,
                block_tokens: int = ROUTING_BLOCK_TOKENS, max_blocks: int = MAX_ROUTING_BLOCKS) -> list[int]:
    """One key per full leading block, each chained over the ones before (shortest prefix first)."""
    keys, parent = [], hash(salt)
    for start in range(0, min(len(prompt_ids) // block_tokens, max_blocks) * block_tokens, block_tokens):
        parent = hash((parent, tuple(prompt_ids[start:start + block_tokens])))
        keys.append(parent)
    return keys


class PrefixTable:
    """Which replica owns each prefix key, bounded (LRU), and the routing decision made from it."""

    def __init__(self, max_entries: int = TABLE_ENTRIES, recent_requests: int = RECENT_REQUESTS):
        self.max_entries = max_entries
        self._owner: OrderedDict[int, Hashable] = OrderedDict()
        self._recent: deque[Hashable] = deque(maxlen=recent_requests)
        self.num_routed = 0
        self.num_affinity = 0  # requests sent where an earlier one with a shared prefix went
        self.num_spilled = 0  # requests whose prefix owner was too busy, sent to the least busy instead

    def route(self, keys: Sequence[int], in_flight: Mapping[Hashable, int], imbalance: int) -> Hashable:
        """The replica for a request with these prefix keys, among those in `in_flight` (replica -> requests
        in flight); the table then records what that replica holds."""
        assert in_flight, "no replica to choose from"
        least_busy = min(in_flight.values())
        depth, owner = self._longest_owned(keys, in_flight)
        if owner is not None and in_flight[owner] <= least_busy + imbalance:
            self.num_affinity += 1
            chosen, kept = owner, 0
        else:
            self.num_spilled += owner is not None
            chosen = self._least_busy(keys, in_flight)
            kept = depth  # a spill leaves the shared prefix with its owner; the rest is the new replica's
        for key in keys[:kept]:
            self._owner.move_to_end(key)
        self._record(keys[kept:], chosen)
        self._recent.append(chosen)
        self.num_routed += 1
        return chosen

    def owner(self, keys: Sequence[int]) -> Hashable | None:
        """The replica that owns the longest of these prefixes, if any."""
        for key in reversed(keys):
            if key in self._owner:
                return self._owner[key]
        return None

    def forget(self, replica: Hashable) -> None:
        """Drop a replica that is gone, so its prefixes are routed afresh."""
        for key in [k for k, r in self._owner.items() if r == replica]:
            del self._owner[key]

    def _longest_owned(self, keys: Sequence[int], in_flight: Mapping[Hashable, int]) -> tuple[int, Hashable | None]:
        """(number of leading keys, owner) of the longest prefix owned by a live replica; (0, None) if none."""
        for depth in range(len(keys), 0, -1):
            owner = self._owner.get(keys[depth - 1])
            if owner in in_flight:
                return depth, owner
        return 0, None

    def _least_busy(self, keys: Sequence[int], in_flight: Mapping[Hashable, int]) -> Hashable:
        """Fewest in flight; ties to the fewest of the recent requests, then by the first key (order-free)."""
        recent = Counter(self._recent)
        least = min(in_flight.values())
        tied = [r for r, n in in_flight.items() if n == least]
        fewest = min(recent[r] for r in tied)
        tied = sorted((r for r in tied if recent[r] == fewest), key=str)
        return tied[(keys[0] if keys else 0) % len(tied)]

    def _record(self, keys: Sequence[int], replica: Hashable) -> None:
        for key in keys:
            self._owner[key] = replica
            self._owner.move_to_end(key)
        while len(self._owner) > self.max_entries:
            self._owner.popitem(last=False)
