"""Ray Serve request routers for the engine deployment (RequestRouterConfig names them by import path).

Each handle that calls the engine replicas (the front end) has one router. It
counts the requests it has in flight on each replica (Serve calls back when it
sends a request and when that completes, streams included), and chooses from
those counts, exact and immediate, so a burst spreads at once. The engines'
own running and waiting counts, as Serve's routing stats would carry them, are
up to a second or more old: after a burst they still show a drained replica
busy, which is enough to push a prefix off its owner, and with the app's one
front end they add nothing this count lacks. Serve still refuses a replica
whose queue is full (`max_ongoing_requests`) and retries elsewhere.

A front end's `deltas` call (its stream of every delta of its requests on one
replica, outbox.py) names that replica and goes there and nowhere else. Requests
are matched to the replica chosen for them, not handed out first come first
served (Serve's FIFOMixin gives a chosen replica to the oldest waiting request,
which sent a prefix elsewhere than the table recorded, or a `deltas` call to a
replica it did not name).
"""

from __future__ import annotations

import itertools
from collections import Counter

from ray.serve.request_router import (
    PendingRequest,
    RequestRouter,
    RunningReplica,
)

from selfhost.cluster.config import ClusterConfig
from selfhost.cluster.prefix_table import PrefixTable, prefix_keys

DEFAULT_IMBALANCE = ClusterConfig.routing_imbalance


def _prompt_of(request: PendingRequest | None) -> tuple[list[int], bytes | None] | None:
    """(prompt ids, cache salt) of an EngineReplica.generate call; None for any other call."""
    if request is None or request.metadata.call_method != "generate" or not request.args:
        return None
    salt = request.args[3] if len(request.args) > 3 else None
    return request.args[0], salt


def _named_replica(request: PendingRequest | None) -> str | None:
    """The replica a `deltas` call names (EngineReplica.deltas(outbox, replica)); None for any other call."""
    if request is None or request.metadata.call_method != "deltas" or len(request.args) < 2:
        return None
    return request.args[1]


class _CountingRouter(RequestRouter):
    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, max_ongoing: int | None = None, **_ignored):
        self.imbalance = imbalance
        # Requests this router lets a replica hold (its `deltas` streams aside); None: Serve's limit alone.
        # With multiplexed streams the deployment's limit is higher by config.STREAM_SLOTS, so a `deltas`
        # call finds room on a replica full of requests.
        self.max_ongoing = max_ongoing
        self.in_flight: Counter = Counter()  # every call in flight, `deltas` streams included
        # `deltas` calls routed (Serve's internal request id -> replica), so loads leave them out: a replica
        # whose stream to the front end is open is no busier for it.
        self._streams: dict[str, object] = {}

    def _load(self, replica_id) -> int:
        streams = sum(1 for r in self._streams.values() if r == replica_id)
        return max(0, self.in_flight[replica_id] - streams)

    def _open(self, candidates: list[RunningReplica]) -> list[RunningReplica]:
        """Candidates with room for another request (an empty list: Serve waits and asks again)."""
        if self.max_ongoing is None:
            return candidates
        return [r for r in candidates if self._load(r.replica_id) < self.max_ongoing]

    def _named(self, candidates: list[RunningReplica], request: PendingRequest | None) -> list[list[RunningReplica]] | None:
        """A `deltas` call's route: its replica alone, or nothing while that one is not running (Serve waits
        and asks again; the front end stops asking once the replica is lost). None: not such a call."""
        name = _named_replica(request)
        if name is None:
            return None
        chosen = [r for r in candidates if r.replica_id.unique_id == name][:1]
        if chosen:
            self._streams[request.metadata.internal_request_id] = chosen[0].replica_id
        return [chosen] if chosen else []

    def _settled(self, candidates: list[RunningReplica], request: PendingRequest | None
                 ) -> list[list[RunningReplica]] | None:
        """What either router answers before choosing: back off after a refusal (see _back_off_on_refusal),
        nothing while no replica runs, a `deltas` call's named replica. None: the router chooses."""
        _back_off_on_refusal(request)
        if not candidates:
            return []
        return self._named(candidates, request)

    def on_send_request(self, replica_id) -> None:
        super().on_send_request(replica_id)
        self.in_flight[replica_id] += 1

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        self._streams.pop(internal_request_id, None)
        if self.in_flight[replica_id] > 0:
            self.in_flight[replica_id] -= 1

    def _loads(self, candidates: list[RunningReplica]) -> dict:
        return {r.replica_id: self._load(r.replica_id) for r in candidates}


def _back_off_on_refusal(request: PendingRequest | None) -> None:
    """Serve retries a request every replica refused (a full queue) at once, again and again, unless the
    router asks it to back off (25 ms doubling to 0.5 s); without this a full replica had the front end's
    routing thread spinning, a core's worth of CPU on a two-core box."""
    if request is not None:
        request.routing_context.should_backoff = True


class PrefixAffinityRouter(_CountingRouter):
    """A request goes to the owner of its longest known prefix, within a bounded imbalance (prefix_table.py)."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **kwargs):
        super().initialize_state(imbalance, **kwargs)
        self.table = PrefixTable()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        settled = self._settled(candidate_replicas, pending_request)
        if settled is not None:
            return settled
        candidate_replicas = self._open(candidate_replicas)
        if not candidate_replicas:
            return []
        by_id = {r.replica_id: r for r in candidate_replicas}
        prompt = _prompt_of(pending_request)
        loads = self._loads(candidate_replicas)
        if prompt is None:  # not a generate call (describe): the least busy
            chosen = min(loads, key=lambda r: (loads[r], r.unique_id))
        else:
            chosen = self.table.route(prefix_keys(*prompt), loads, self.imbalance)
        # The chosen replica first; should it refuse (a full queue), the others by Serve's queue lengths.
        return [[by_id[chosen]], [r for r in candidate_replicas if r.replica_id != chosen]]

    def on_replica_actor_died(self, replica_id):
        super().on_replica_actor_died(replica_id)
        self.table.forget(replica_id)


class RoundRobinRouter(_CountingRouter):
    """Each request to the next replica in turn: the baseline prefix routing is measured against."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **kwargs):
        super().initialize_state(imbalance, **kwargs)
        self._turn = itertools.count()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
        settled = self._settled(candidate_replicas, pending_request)
        if settled is not None:
            return settled
        ordered = sorted(self._open(candidate_replicas), key=lambda r: r.replica_id.unique_id)
        if not ordered:
            return []
        first = next(self._turn) % len(ordered)
        return [[ordered[first]], ordered[first + 1:] + ordered[:first]]
