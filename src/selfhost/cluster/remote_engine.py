"""The front end's view of a model whose engines are Ray Serve replicas.

`RemoteLLM` is what the server reads of an `LLM` (tokenizer, context window,
request limits, architecture) without loading weights; `RemoteEngine` is what it
reads of an `AsyncEngine` (generate, stats), backed by a DeploymentHandle to the
replicas. A request whose replica dies before any of its output reached the
client is sent again (Serve routes it to a live replica); one that had started
ends with an error (a stream: an error event), never a hang. With `multiplex`,
each request's call carries only the replica's hello and its end or error; the
deltas of all of this front end's requests on a replica come over one `deltas`
stream per replica (outbox.py), which `_Inbox` reads and hands to each request.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import uuid
from collections.abc import AsyncIterator
from contextvars import ContextVar
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from ray.exceptions import ActorUnavailableError, RayActorError, RayTaskError

from selfhost.cluster.replica import ReplicaHello
from selfhost.engine.llm_engine import EngineStats
from selfhost.engine.validation import RequestLimits, validate_request
from selfhost.errors import SelfhostError
from selfhost.outputs import StreamDelta
from selfhost.sampling_params import SamplingParams
from selfhost.server.errors import APIError

log = logging.getLogger("selfhost.cluster")

# Per HTTP request: a set the front end's middleware puts here and generate() fills with the replicas
# that served it (a set object, so tasks the request spawns, which copy the context, fill the same one).
SERVED_BY: ContextVar[set[str] | None] = ContextVar("selfhost_served_by", default=None)

REPLICA_LOST = (RayActorError, ActorUnavailableError)
STATS_POLL_S = 1.0


class _RemoteLimits:
    """`llm.engine` as the server uses it: fixed limits and the request check, run in the front end."""

    def __init__(self, limits: RequestLimits, capacity_tokens: int, tokenizer, vocab_size: int):
        self.limits, self.capacity_tokens = limits, capacity_tokens
        self._tokenizer, self._vocab_size = tokenizer, vocab_size
        self._grammars = None

    def validate_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        validate_request(prompt_ids, params, self.limits)
        if params.structured_output is not None:  # a bad schema is the client's 400 here, not a replica's error
            from selfhost.engine.grammar import GrammarCompiler

            if self._grammars is None:
                self._grammars = GrammarCompiler(self._tokenizer, self._vocab_size, self._tokenizer.eos_token_ids)
            self._grammars.matcher(params.structured_output)


class RemoteLLM:
    def __init__(self, info: dict[str, Any], model_dir):
        from selfhost.tokenizer import Tokenizer

        self.model_dir = Path(model_dir)
        self.tokenizer = Tokenizer(self.model_dir)
        self.max_model_len = info["max_model_len"]
        self.device = torch.device(info["device"])
        self.dtype = getattr(torch, info["dtype"].removeprefix("torch."))
        self.model = SimpleNamespace(spec=info["spec"])
        self.engine = _RemoteLimits(info["limits"], info["capacity_tokens"], self.tokenizer, info["spec"].vocab_size)


class _Inbox:
    """One replica's `deltas` stream to this front end, read while any request waits on that replica.

    The reader puts each request's deltas (lists) in that request's queue in `queues`, which the front
    end shares among its inboxes and fills before it sends the request: a replica's first delta can come
    over this stream before its hello has come over the request's own call. Should the stream fail, the
    error goes to every request waiting here. A stream the replica ends (nothing under way there for a
    while) is opened again while requests wait.
    """

    def __init__(self, handle, outbox: str, replica: str, queues: dict[str, asyncio.Queue]):
        self.handle, self.outbox, self.replica, self.queues = handle, outbox, replica, queues
        self.waiting: set[str] = set()
        self._reader: asyncio.Task | None = None

    def join(self, request_id: str) -> None:
        self.waiting.add(request_id)
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read())

    def leave(self, request_id: str) -> None:
        self.waiting.discard(request_id)

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()

    async def _read(self) -> None:
        while self.waiting:
            stream = self.handle.options(stream=True).deltas.remote(self.outbox, self.replica)
            items = 0
            try:
                async for batch in stream:
                    items += 1
                    for request_id, deltas in batch:
                        queue = self.queues.get(request_id)
                        if queue is not None:  # None: a request that went away (its output is dropped)
                            queue.put_nowait(deltas)
            except asyncio.CancelledError:
                stream.cancel()
                raise
            except Exception as err:  # noqa: BLE001 -- each waiting request raises it (a lost replica: retried)
                for request_id in self.waiting:
                    queue = self.queues.get(request_id)
                    if queue is not None:
                        queue.put_nowait(err)
                return
            if not items:  # ended at once (a replica that was not the one named): do not spin
                await asyncio.sleep(0.05)


class RemoteEngine:
    def __init__(self, engine_handle, board_handle=None, max_retries: int = 2, multiplex: bool = True):
        self.handle = engine_handle
        self.board = board_handle
        self.max_retries = max_retries
        # This front end's outbox on every replica (their deltas come over one stream per replica); None:
        # each request's own stream carries its deltas.
        self.outbox = uuid.uuid4().hex if multiplex else None
        self._inboxes: dict[str, _Inbox] = {}
        self._queues: dict[str, asyncio.Queue] = {}  # request id -> its deltas, from whichever replica has it
        self.replicas: dict[str, dict[str, Any]] = {}  # the board's latest snapshot
        self.served_by: dict[str, int] = {}  # responses begun per replica, as this front end saw them
        self._stop = threading.Event()
        if board_handle is not None:
            threading.Thread(target=self._poll_board, name="selfhost-board", daemon=True).start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str,
                       cache_salt: bytes | None = None, lora: str | None = None) -> AsyncIterator[StreamDelta]:
        assert lora is None, "LoRA adapters are refused with --ray before any request"
        for attempt in range(self.max_retries + 1):
            call = self.handle.options(stream=True).generate
            if self.outbox is not None:  # before the call: its deltas may come before its hello does
                queue = self._queues[request_id] = asyncio.Queue()
            stream = (call.remote(prompt_ids, params, request_id, cache_salt) if self.outbox is None else
                      call.remote(prompt_ids, params, request_id, cache_salt, self.outbox))
            delivered = finished = False
            replica = inbox = watcher = None
            try:
                if self.outbox is None:
                    async for item in stream:
                        if isinstance(item, ReplicaHello):
                            replica = item.replica
                            self._note(replica)
                            continue
                        for delta in item:  # the replica sends deltas in lists (replica.batched)
                            delivered = True
                            finished = delta.is_finished
                            yield delta
                    return
                hello = await stream.__anext__()
                replica = hello.replica
                self._note(replica)
                inbox = self._inbox(replica)
                inbox.join(request_id)
                # The call itself now only ends (the request is done) or fails (raised from the queue).
                watcher = asyncio.get_running_loop().create_task(self._watch(stream, queue))
                while not finished:
                    item = await queue.get()
                    if isinstance(item, BaseException):
                        raise item
                    for delta in item:
                        delivered = True
                        finished = delta.is_finished
                        yield delta
                return
            except RayTaskError as err:  # the replica raised: a validation error is the client's
                cause = err.cause if isinstance(err.cause, Exception) else err
                if isinstance(cause, SelfhostError):
                    raise cause from None
                raise APIError(f"replica {replica or '?'} failed: {type(cause).__name__}", 500,
                               code="replica_error") from err
            except REPLICA_LOST as err:
                lost = self._inboxes.pop(replica, None) if replica is not None else None
                if lost is not None:
                    lost.close()  # its `deltas` call would wait for the dead replica forever
                if delivered:
                    raise APIError(f"replica {replica} was lost mid-response; the output is incomplete", 502,
                                   code="replica_lost") from err
                if attempt == self.max_retries:
                    raise APIError(f"no replica could take the request ({attempt + 1} tries; the last lost: "
                                   f"{replica or 'before it answered'})", 503, code="replica_lost") from err
                log.warning("replica %s lost before request %s started; retrying (%s)", replica or "?", request_id,
                            type(err).__name__)
            finally:
                if watcher is not None:
                    watcher.cancel()
                if inbox is not None:
                    inbox.leave(request_id)
                if self.outbox is not None:
                    self._queues.pop(request_id, None)
                if not finished:
                    stream.cancel()  # the replica's generator closes, which aborts the engine request

    def _inbox(self, replica: str) -> _Inbox:
        inbox = self._inboxes.get(replica)
        if inbox is None:
            inbox = self._inboxes[replica] = _Inbox(self.handle, self.outbox, replica, self._queues)
        return inbox

    @staticmethod
    async def _watch(stream, queue: asyncio.Queue) -> None:
        """Read a multiplexed request's own call to its end; its error goes to the request's queue."""
        try:
            async for _ in stream:
                pass
        except asyncio.CancelledError:
            raise
        except Exception as err:  # noqa: BLE001 -- raised by the request (RayTaskError, a lost replica)
            queue.put_nowait(err)

    def _note(self, replica: str) -> None:
        self.served_by[replica] = self.served_by.get(replica, 0) + 1
        served = SERVED_BY.get()
        if served is not None:
            served.add(replica)

    def stats(self) -> EngineStats:
        """Every replica's engine figures summed; the prefix hit rate over all of their prompt tokens."""
        live = list(self.replicas.values())
        hit = sum(s["prefix_hit_tokens"] for s in live)
        queried = sum(s["prefix_queried_tokens"] for s in live)

        def total(key: str) -> int:
            return sum(s[key] for s in live)

        return EngineStats(
            num_running=total("num_running"), num_waiting=total("num_waiting"),
            kv_blocks_used=total("kv_blocks_used"), kv_blocks_total=total("kv_blocks_total"),
            kv_blocks_free=total("kv_blocks_total") - total("kv_blocks_used"),
            prefix_hit_rate=hit / queried if queried else 0.0, tokens_last_step=0,
            num_steps=total("num_steps"), num_preemptions=total("num_preemptions"),
        )

    def _poll_board(self) -> None:
        while not self._stop.wait(STATS_POLL_S):
            try:
                self.replicas = self.board.snapshot.remote().result(timeout_s=10)
            except Exception:  # the board restarting; keep the last snapshot
                log.debug("stats board unreachable", exc_info=True)

    def shutdown(self) -> None:
        self._stop.set()
        for inbox in self._inboxes.values():
            inbox.close()
