"""EngineReplica: one Ray Serve replica = one model on one AsyncEngine, with its own KV and prefix cache.

The model loads exactly as `selfhost serve` loads it (ModelRegistry, the same
settings), inside the replica's Ray worker, which Ray gives the replica's CPU
share (torch then uses that many threads) or GPU. `generate` first announces
which replica took the request; then either it streams the request's StreamDeltas
itself in lists (`batched`: the first at once, then at most one message per
interval), or, when the front end names its outbox, it puts them there and the
front end's one `deltas` stream per replica carries all of its requests' deltas
(outbox.py). A thread reports the engine's figures to the StatsBoard every second.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from selfhost.cluster.outbox import Outbox
from selfhost.outputs import StreamDelta
from selfhost.sampling_params import SamplingParams

log = logging.getLogger("selfhost.cluster")

STATS_PERIOD_S = 1.0


@dataclass(frozen=True)
class ReplicaHello:
    """The first item of every generate stream: the replica that took the request."""

    replica: str


_END = object()


async def batched(deltas: AsyncIterator[StreamDelta], interval_s: float) -> AsyncIterator[list[StreamDelta]]:
    """`deltas` in lists: a delta that comes after a quiet interval goes at once (so the first token is never
    held), later ones wait until `interval_s` after the previous list and go together; the last one at once.

    Every item of a Ray stream costs its receiver a fixed ~1-2 ms of CPU whatever it holds, so one item per
    engine step was most of what the front end and Serve's proxy spent per request. Closing this generator
    closes `deltas` (which aborts the engine request); `deltas`' error is raised here.
    """
    if interval_s <= 0:
        async for delta in deltas:
            yield [delta]
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump():
        try:
            async for delta in deltas:
                queue.put_nowait(delta)
            queue.put_nowait(_END)
        except Exception as err:  # noqa: BLE001 -- relayed: the consumer raises it
            queue.put_nowait(err)

    loop = asyncio.get_running_loop()
    task = loop.create_task(pump())
    sent_at = -float("inf")
    try:
        while True:
            items = [await queue.get()]
            while not isinstance(items[-1], Exception) and items[-1] is not _END and not items[-1].is_finished:
                remaining = sent_at + interval_s - loop.time()
                if remaining <= 0 and queue.empty():
                    break
                try:
                    items.append(queue.get_nowait() if not queue.empty() else
                                 await asyncio.wait_for(queue.get(), remaining))
                except TimeoutError:
                    break
            batch = [item for item in items if item is not _END and not isinstance(item, Exception)]
            if batch:
                yield batch
                sent_at = loop.time()
            if isinstance(items[-1], Exception):
                raise items[-1]
            if items[-1] is _END or items[-1].is_finished:
                return
    finally:
        task.cancel()


def load_served_model(settings):
    """The one model of `settings`, loaded by the single-process server's own registry."""
    from selfhost.server.models import ModelRegistry

    registry = ModelRegistry(settings)
    with ThreadPoolExecutor(1) as pool:  # its own event loop, whatever thread Serve constructs us on
        pool.submit(asyncio.run, registry.preload()).result()
    return next(iter(registry.models.values()))


class EngineReplica:
    def __init__(self, server_settings: dict[str, Any], cpus: float, board=None, stream_interval_s: float = 0.0,
                 merge_deltas: bool = False):
        import torch
        from ray import serve

        from selfhost.server.settings import ServerSettings

        torch.set_num_threads(max(1, int(cpus)))  # whatever OMP_NUM_THREADS the worker inherited
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.served = load_served_model(ServerSettings(**server_settings))
        self.engine = self.served.engine
        self.num_requests = 0
        self.board = board
        self.stream_interval_s = stream_interval_s
        self.merge_deltas = merge_deltas  # a multiplexed request's waiting deltas go as one (outbox.merge)
        self._outboxes: dict[str, Outbox] = {}  # front end id -> its requests' deltas waiting to be sent
        self._stop = threading.Event()
        if board is not None:
            threading.Thread(target=self._report_forever, name="selfhost-stats", daemon=True).start()
        log.info("replica %s ready: %s", self.replica, self.served.name)

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       cache_salt: bytes | None = None, outbox: str | None = None):
        """ReplicaHello, then lists of the engine's deltas, or with `outbox` (a front end's id) nothing more:
        the deltas go to that front end's `deltas` stream and this call ends when the request does. Either
        way a consumer that goes away aborts the request, and the engine's error is raised here."""
        self.num_requests += 1
        yield ReplicaHello(self.replica)
        deltas = self.engine.generate(prompt_ids, params, request_id, cache_salt)
        if outbox is None:
            async for batch in batched(deltas, self.stream_interval_s):
                yield batch
            return
        box = self._outboxes.get(outbox)
        if box is None:
            box = self._outboxes[outbox] = Outbox(self.merge_deltas)
        box.begin()
        try:
            first = True
            async for delta in deltas:
                box.put(request_id, delta, first)
                first = False
        finally:
            box.end()

    async def deltas(self, outbox: str, replica: str):
        """Every delta of front end `outbox`'s requests here, in lists of (request id, deltas); ends when that
        front end has had nothing under way here for a while. The router sends this call to `replica`."""
        if replica != self.replica:  # a router that did not honour the target: end at once, the caller retries
            return
        box = self._outboxes.get(outbox)
        if box is None:
            box = self._outboxes[outbox] = Outbox(self.merge_deltas)
        async for batch in box.drain(self.stream_interval_s):
            yield batch
        if box.idle and self._outboxes.get(outbox) is box:
            del self._outboxes[outbox]  # a front end that went away leaves nothing behind

    def describe(self) -> dict[str, Any]:
        """What the front end needs to serve this model without loading it: limits, shape, sizes."""
        served, llm = self.served, self.served.llm
        return {
            "replica": self.replica, "name": served.name, "model_dir": str(llm.model_dir),
            "limits": llm.engine.limits, "spec": llm.model.spec, "max_model_len": llm.max_model_len,
            "capacity_tokens": llm.engine.capacity_tokens, "device": str(llm.device), "dtype": str(llm.dtype),
            "weight_bytes": served.weight_bytes, "kv_cache_bytes": served.kv_cache_bytes,
            "num_params": served.num_params, "quantization": served.quantization,
        }

    def stats(self) -> dict[str, Any]:
        import ray

        s = self.engine.engine.stats()
        return {
            "replica": self.replica, "actor_name": ray.get_runtime_context().get_actor_name(), "pid": os.getpid(),
            "num_running": s.num_running, "num_waiting": s.num_waiting, "kv_blocks_used": s.kv_blocks_used,
            "kv_blocks_total": s.kv_blocks_total, "prefix_hit_tokens": s.prefix_hit_tokens,
            "prefix_queried_tokens": s.prefix_queried_tokens, "num_preemptions": s.num_preemptions,
            "num_steps": s.num_steps, "num_requests": self.num_requests, "time": time.time(),
        }

    def _report_forever(self) -> None:
        while not self._stop.wait(STATS_PERIOD_S):
            try:
                self.board.report.remote(self.stats())
            except Exception:  # the board restarting: the next report goes through
                log.debug("stats report failed", exc_info=True)

    def __del__(self):
        self._stop.set()
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.shutdown()
