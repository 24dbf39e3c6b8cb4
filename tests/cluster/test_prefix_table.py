"""Prefix-aware choice without Ray: longest known prefix wins, within a bounded imbalance."""

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
    first = table.choose(prefix_keys(system + [1, 2]), load, imbalance=4)
    table.record(prefix_keys(system + [1, 2]), first)
    load[first] += 1
    for i in range(3):  # the same system prompt, other questions
        keys = prefix_keys(system + _prompt(100 + i, 40))
        assert table.choose(keys, load, imbalance=4) == first
        table.record(keys, first)
        load[first] += 1
    spread = set()
    for i in range(4):  # unseen prefixes go to the least busy replica
        keys = prefix_keys(_prompt(200 + i, 64))
        chosen = table.choose(keys, load, imbalance=4)
        table.record(keys, chosen)
        load[chosen] += 1
        spread.add(chosen)
    assert spread == {"r1", "r2"} or load["r1"] == load["r2"]
    assert table.num_affinity == 3


def test_imbalance_bound_sends_a_hot_prefix_elsewhere():
    table = PrefixTable()
    keys = prefix_keys(_prompt(3, 128))
    table.record(keys, "r1")
    assert table.choose(keys, {"r1": 4, "r2": 0}, imbalance=4) == "r1"
    assert table.choose(keys, {"r1": 5, "r2": 0}, imbalance=4) == "r2"


def test_a_gone_replica_is_forgotten_and_never_chosen():
    table = PrefixTable()
    keys = prefix_keys(_prompt(4, 64))
    table.record(keys, "r1")
    assert table.choose(keys, {"r2": 3, "r3": 3}, imbalance=0) in {"r2", "r3"}
    table.forget("r1")
    assert table.choose(keys, {"r1": 0, "r2": 0}, imbalance=0) in {"r1", "r2"}
    assert table.num_affinity == 0


def test_table_is_bounded():
    table = PrefixTable(max_entries=10)
    for i in range(20):
        table.record(prefix_keys(_prompt(i, 32)), "r1")
    assert len(table._owner) == 10
