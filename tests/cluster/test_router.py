"""The routers' choices without a running Serve: `deltas` calls reach the replica they name, requests stay
within max_ongoing, and prefix routing still follows the table."""

from __future__ import annotations

import asyncio
from collections import namedtuple
from types import SimpleNamespace

import pytest

pytest.importorskip("ray.serve")

from selfhost.cluster.router import PrefixAffinityRouter, RoundRobinRouter  # noqa: E402


ReplicaID = namedtuple("ReplicaID", "unique_id")  # hashable, as Serve's


def replica(name: str):
    return SimpleNamespace(replica_id=ReplicaID(name), name=name)


def call(method: str, *args, request_id: str = "internal-0"):
    return SimpleNamespace(metadata=SimpleNamespace(call_method=method, internal_request_id=request_id),
                           args=list(args), routing_context=SimpleNamespace(should_backoff=False))


def router(cls, **kwargs):
    r = cls.__new__(cls)  # the routing state alone: Serve's own constructor needs a running deployment
    r.initialize_state(**kwargs)
    return r


def choose(r, candidates, request):
    chosen = asyncio.run(r.choose_replicas(candidates, request))
    return [[c.name for c in group] for group in chosen]


@pytest.mark.parametrize("cls", [PrefixAffinityRouter, RoundRobinRouter])
def test_a_deltas_call_goes_to_the_replica_it_names_or_waits(cls):
    r = router(cls, imbalance=8, max_ongoing=4)
    candidates = [replica("a"), replica("b"), replica("c")]
    for name in ("a", "b", "c", "b"):
        assert choose(r, candidates, call("deltas", "front-end-1", name)) == [[name]]
    waiting = call("deltas", "front-end-1", "gone")
    assert choose(r, candidates, waiting) == []
    assert waiting.routing_context.should_backoff


def send(r, target, request=None):
    """What Serve does once a replica takes a call the router chose for it."""
    r.in_flight[target.replica_id] += 1


@pytest.mark.parametrize("cls", [PrefixAffinityRouter, RoundRobinRouter])
def test_requests_stay_within_max_ongoing_beside_the_front_ends_stream(cls):
    r = router(cls, imbalance=8, max_ongoing=2)
    a, b = replica("a"), replica("b")
    assert choose(r, [a, b], call("deltas", "fe", "a", request_id="stream-a")) == [["a"]]
    for _ in range(3):  # the front end's `deltas` call and two requests
        send(r, a)
    request = call("generate", list(range(64)), None, "req-1", None, "front-end-1")
    for _ in range(4):
        assert choose(r, [a, b], request)[0] == ["b"]
    for _ in range(2):
        send(r, b)
    request.routing_context.should_backoff = False
    assert choose(r, [a, b], request) == []  # Serve waits and asks again...
    assert request.routing_context.should_backoff  # ...after a pause: retrying at once spun a core
    r.on_request_completed(a.replica_id, "some-request")
    assert choose(r, [a, b], request)[0] == ["a"]
    r.on_request_completed(a.replica_id, "stream-a")  # the stream ends: it leaves no room of its own
    assert r._load(a.replica_id) == 1


def test_an_open_stream_does_not_make_its_replica_look_busier():
    """New prefixes go to the least busy replica; the front end's stream to one must not tip that."""
    r = router(PrefixAffinityRouter, imbalance=8, max_ongoing=64)
    a, b = replica("a"), replica("b")
    choose(r, [a, b], call("deltas", "fe", "a", request_id="stream-a"))
    for target in (a, a, b):  # the stream, then one request on each replica
        send(r, target)
    assert r._loads([a, b]) == {a.replica_id: 1, b.replica_id: 1}
    picks = [choose(r, [a, b], call("generate", list(range(100 * i, 100 * i + 64)), None, f"r{i}", None, "fe",
                                    request_id=f"req-{i}"))[0][0] for i in range(4)]
    assert sorted(picks) == ["a", "a", "b", "b"]  # equally busy: new prefixes alternate


def test_prefix_routing_keeps_a_shared_prefix_on_one_replica():
    r = router(PrefixAffinityRouter, imbalance=8, max_ongoing=64)
    candidates = [replica("a"), replica("b")]
    system = list(range(100, 164))
    first = choose(r, candidates, call("generate", system + [1, 2, 3], None, "r1", None, "fe"))[0]
    for i in range(5):
        assert choose(r, candidates, call("generate", system + [i] * 20, None, f"r{i + 2}", None, "fe"))[0] == first
