"""Prefix-aware choice without Ray: the longest owned prefix wins, within a bounded imbalance, and keeps its owner."""

import random

from selfhost.cluster.prefix_table import PrefixTable, prefix_keys


def _prompt(seed: int, n: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(1000) for _ in range(n)]


def test_keys_chain_over_whole_blocks():
    a = _prompt(0, 64)
    b = a[:32] + _prompt(1, 32)
    ka, kb = prefix_keys(a), prefix_keys(b)
    assert len(ka) == 4 and len(prefix_keys(a[:15])) == 0  # full 16-token blocks only
    assert ka[:2] == kb[:2] and ka[2] != kb[2]  # a shared prefix shares exactly its keys
    assert prefix_keys(a, salt=b"tenant") != ka  # another cache scope, other keys


def test_shared_prefix_follows_its_replica_and_distinct_prefixes_spread():
    table, load = PrefixTable(), {"r1": 0, "r2": 0}
    system = _prompt(7, 512)
    first = table.route(prefix_keys(system + [1, 2]), load, imbalance=4)
    load[first] += 1
    for i in range(3):  # the same system prompt, other questions
        assert table.route(prefix_keys(system + _prompt(100 + i, 40)), load, imbalance=4) == first
        load[first] += 1
    assert table.num_affinity == 3
    load = {"r1": 0, "r2": 0}  # all of those finished
    # Unseen prefixes on idle replicas: each goes to the one that took fewer of the recent requests.
    spread = [table.route(prefix_keys(_prompt(200 + i, 64)), load, imbalance=4) for i in range(4)]
    other = "r2" if first == "r1" else "r1"
    assert spread == [other] * 4
    assert [table.route(prefix_keys(_prompt(300 + i, 64)), load, imbalance=4) for i in range(4)].count(first) >= 2


def test_imbalance_bound_spills_a_busy_owners_request_but_keeps_the_owner():
    table = PrefixTable()
    system = _prompt(3, 128)
    assert table.route(prefix_keys(system + _prompt(10, 16)), {"r1": 0, "r2": 1}, imbalance=4) == "r1"
    assert table.route(prefix_keys(system + _prompt(11, 16)), {"r1": 5, "r2": 1}, imbalance=4) == "r1"
    spilled = system + _prompt(12, 16)
    assert table.route(prefix_keys(spilled), {"r1": 6, "r2": 1}, imbalance=4) == "r2"
    assert table.num_spilled == 1
    # The system prompt still belongs to r1: once it is less busy, its requests go back there at once
    # (the old behaviour moved the prefix to r2, so it bounced between both caches).
    assert table.owner(prefix_keys(system)) == "r1"
    assert table.route(prefix_keys(system + _prompt(13, 16)), {"r1": 3, "r2": 0}, imbalance=4) == "r1"
    # What the spilled request added past the shared prefix is r2's (a conversation continues there).
    assert table.route(prefix_keys(spilled + _prompt(14, 32)), {"r1": 0, "r2": 0}, imbalance=4) == "r2"


def test_a_gone_replica_is_forgotten_and_never_chosen():
    table = PrefixTable()
    keys = prefix_keys(_prompt(4, 64))
    table.route(keys, {"r1": 0}, imbalance=0)
    assert table.route(keys, {"r2": 3, "r3": 3}, imbalance=0) in {"r2", "r3"}  # r1 is not a candidate
    assert table.num_affinity == 0
    assert table.owner(keys) in {"r2", "r3"}  # re-homed where it went
    other = prefix_keys(_prompt(5, 64))
    table.route(other, {"r1": 0}, imbalance=0)
    table.forget("r1")
    assert table.owner(other) is None and table.owner(keys) is not None


def test_table_is_bounded():
    table = PrefixTable(max_entries=10)
    for i in range(20):
        table.route(prefix_keys(_prompt(i, 32)), {"r1": 0}, imbalance=0)
    assert len(table._owner) == 10
