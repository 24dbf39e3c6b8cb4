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
"""

from __future__ import annotations

import itertools
from collections import Counter

from ray.serve.request_router import (
    FIFOMixin,
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


class _CountingRouter(FIFOMixin, RequestRouter):
    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **_ignored):
        self.imbalance = imbalance
        self.in_flight: Counter = Counter()

    def on_send_request(self, replica_id) -> None:
        super().on_send_request(replica_id)
        self.in_flight[replica_id] += 1

    def on_request_completed(self, replica_id, internal_request_id: str) -> None:
        if self.in_flight[replica_id] > 0:
            self.in_flight[replica_id] -= 1

    def _loads(self, candidates: list[RunningReplica]) -> dict:
        return {r.replica_id: self.in_flight[r.replica_id] for r in candidates}


class PrefixAffinityRouter(_CountingRouter):
    """A request goes to the owner of its longest known prefix, within a bounded imbalance (prefix_table.py)."""

    def initialize_state(self, imbalance: int = DEFAULT_IMBALANCE, **kwargs):
        super().initialize_state(imbalance, **kwargs)
        self.table = PrefixTable()

    async def choose_replicas(self, candidate_replicas: list[RunningReplica],
                              pending_request: PendingRequest | None = None) -> list[list[RunningReplica]]:
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
        if not candidate_replicas:
            return []
        ordered = sorted(candidate_replicas, key=lambda r: r.replica_id.unique_id)
        first = next(self._turn) % len(ordered)
        return [[ordered[first]], ordered[first + 1:] + ordered[:first]]
