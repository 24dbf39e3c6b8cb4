"""Outbox: one front end's stream deltas on one replica, sent as one Ray stream for all of its requests.

Every item of a Ray stream costs its receiver a fixed ~1-2 ms of CPU whatever it holds. With one
stream per request, a replica decoding 30 requests sent 30 items per engine step and the front end
spent most of its CPU receiving them. Here a request's `generate` call only announces the replica
and lives as long as the request (so cancelling it still aborts the engine request, and a dead
replica still fails it); its deltas go into the outbox of the front end that sent it, and that
front end's one `deltas` stream per replica carries every request's deltas, one item per interval.

A request's first delta is sent at once (time to first token is not held back by the interval);
the rest wait until `interval_s` after the previous item. With `merge`, a request's deltas that
wait together go as one delta of several tokens, as a speculative step's do, so the server writes
one event for them: each event costs the front end and Serve's proxy CPU of its own. Free of Ray: replica.py holds one Outbox
per front end and serves `drain()` as its `deltas` stream.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

from selfhost.outputs import StreamDelta

IDLE_S = 2.0  # a drain with no request under way ends after this long; the front end opens another when needed


def merge(first: StreamDelta, then: StreamDelta) -> StreamDelta:
    """One delta saying what two successive deltas of a request said."""
    logprobs = None if first.logprobs is None and then.logprobs is None else \
        [*(first.logprobs or ()), *(then.logprobs or ())]
    return StreamDelta(first.request_id, first.text + then.text, first.token_ids + then.token_ids, logprobs,
                       then.finish_reason, then.num_prompt_tokens, then.num_output_tokens,
                       first.prompt_logprobs if first.prompt_logprobs is not None else then.prompt_logprobs,
                       then.num_cached_tokens)


class Outbox:
    def __init__(self, merge_deltas: bool = False):
        self.merge_deltas = merge_deltas
        self._pending: dict[str, list[StreamDelta]] = {}  # request id -> deltas not yet sent, in order
        self._urgent = False  # a request's first delta waits: send without waiting out the interval
        self._ready = asyncio.Event()
        self._drain = None  # the drain now sending; a newer one takes over
        self.active = 0  # generate calls of this front end under way on the replica

    def put(self, request_id: str, delta: StreamDelta, first: bool = False) -> None:
        held = self._pending.get(request_id)
        if held is None:
            self._pending[request_id] = [delta]
        elif self.merge_deltas:
            held[-1] = merge(held[-1], delta)
        else:
            held.append(delta)
        # Wake the drain only when it has a reason to look: otherwise it sleeps out its interval.
        if first or len(self._pending) == 1 and held is None:
            self._ready.set()
        self._urgent |= first

    def begin(self) -> None:
        """A generate call of this front end started here."""
        self.active += 1

    def end(self) -> None:
        """A generate call ended (its request finished, failed or was cancelled)."""
        self.active -= 1
        self._ready.set()  # an idle drain may now end

    @property
    def idle(self) -> bool:
        return self.active == 0 and not self._pending

    def _take(self) -> list[tuple[str, list[StreamDelta]]]:
        out, self._pending, self._urgent = list(self._pending.items()), {}, False
        return out

    async def drain(self, interval_s: float, idle_s: float = IDLE_S) -> AsyncIterator[list[tuple[str, list[StreamDelta]]]]:
        """[(request id, its deltas)] items: at most one per `interval_s` unless a first delta waits; ends
        after `idle_s` without a request under way or when a newer drain of this outbox starts."""
        me = object()
        self._drain = me
        loop = asyncio.get_running_loop()
        sent_at = -float("inf")
        while self._drain is me:
            self._ready.clear()
            if not self._pending:
                try:
                    await asyncio.wait_for(self._ready.wait(), idle_s if self.active == 0 else None)
                except TimeoutError:
                    if self.idle:
                        return
                continue
            remaining = sent_at + interval_s - loop.time()
            if remaining > 0 and not self._urgent:
                try:  # more deltas gather meanwhile; a request's first one cuts the wait short
                    await asyncio.wait_for(self._ready.wait(), remaining)
                except TimeoutError:
                    pass
                continue
            if self._drain is not me:
                return
            yield self._take()
            sent_at = loop.time()
