"""A small OpenAI-compatible streaming server for bench tests, on loopback.

The model name picks the behaviour, so one server covers every case:

    ok        stream max_tokens tokens: first after `ttft_s`, then one per `itl_s`
    no-usage  as ok, without the usage chunk
    http500   answer 500 with an OpenAI-shaped error
    flaky     every third request (by arrival) answers 500, others as ok
    broken    two tokens, then the connection drops mid-stream
    no-done   all tokens and usage, but no `data: [DONE]`
    slow      wait `slow_s` before anything (to trip client timeouts)

It records every request body and the peak number of requests in flight. With
`hold_after=N`, requests after the N-th (by arrival) send no token until the state
is reset, so a test can act while a run is certainly mid-way, on any machine. With
`gather=N`, no request sends a token until N are in flight at once (from then on
they stream freely), so a client that keeps N in flight is seen doing so however
the machine schedules the two sides; one that never reaches N times out.

Each request counts itself in the InFlight of the state it arrived under: a reset
starts a fresh count, which streams still ending from before it cannot disturb.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from dataclasses import dataclass, field

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class InFlight:
    """Requests streaming now and the most at once, among those of one reset."""

    now: int = 0
    peak: int = 0
    gathered: asyncio.Event = field(default_factory=asyncio.Event)  # set, on the server's loop, at peak >= gather


@dataclass
class FakeState:
    ttft_s: float = 0.05
    itl_s: float = 0.01
    slow_s: float = 5.0
    hold_after: int | None = None
    gather: int = 1
    owned_by: str = "vllm"
    bodies: list[dict] = field(default_factory=list)
    arrivals_s: list[float] = field(default_factory=list)
    in_flight: InFlight = field(default_factory=InFlight)

    @property
    def max_in_flight(self) -> int:
        return self.in_flight.peak

    def reset(self, **settings) -> None:
        self.__init__(**settings)


def _prompt_words(body: dict) -> int:
    if "messages" in body:
        return sum(len(m["content"].split()) for m in body["messages"])
    return len(body["prompt"].split())


def _chunk(body: dict, text: str, chat: bool) -> dict:
    choice = {"index": 0, "delta": {"content": text}} if chat else {"index": 0, "text": text}
    return {"id": "x", "object": "chunk", "model": body["model"], "choices": [choice]}


def _sse(obj) -> bytes:
    return f"data: {obj if isinstance(obj, str) else json.dumps(obj)}\n\n".encode()


class _Dropped(Exception):
    """Raised inside a streaming body so the server cuts the connection."""


def create_app(state: FakeState) -> FastAPI:
    app = FastAPI()

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": "ok", "object": "model", "owned_by": state.owned_by}]}

    async def complete(request: Request, chat: bool):
        body = await request.json()
        counts, gather = state.in_flight, state.gather  # this request's reset, even if another comes
        state.bodies.append(body)
        number = len(state.bodies)
        state.arrivals_s.append(time.perf_counter())
        mode = body["model"]
        if mode == "http500" or (mode == "flaky" and len(state.bodies) % 3 == 0):
            error = {"message": "injected failure", "type": "server_error", "param": None, "code": 500}
            return JSONResponse({"error": error}, status_code=500)

        async def stream():
            counts.now += 1
            counts.peak = max(counts.peak, counts.now)
            if counts.peak >= gather:
                counts.gathered.set()
            try:
                await counts.gathered.wait()
                while state.hold_after is not None and number > state.hold_after:
                    await asyncio.sleep(0.01)  # released by reset(); a cancelled client cancels this
                if mode == "slow":
                    await asyncio.sleep(state.slow_s)
                n = body["max_tokens"]
                for i in range(n):
                    await asyncio.sleep(state.ttft_s if i == 0 else state.itl_s)
                    if mode == "broken" and i == 2:
                        raise _Dropped("injected broken stream")
                    yield _sse(_chunk(body, f"tok{i} ", chat))
                if mode != "no-usage" and body.get("stream_options", {}).get("include_usage"):
                    prompt = _prompt_words(body)
                    usage = {"prompt_tokens": prompt, "completion_tokens": n, "total_tokens": prompt + n}
                    yield _sse({"id": "x", "object": "chunk", "model": mode, "choices": [], "usage": usage})
                if mode != "no-done":
                    yield _sse("[DONE]")
            finally:
                counts.now -= 1

        return StreamingResponse(stream(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


class FakeServer:
    """Runs the app with uvicorn in a daemon thread on a free loopback port."""

    def __init__(self) -> None:
        self.state = FakeState()
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        config = uvicorn.Config(create_app(self.state), log_level="critical", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def start(self) -> FakeServer:
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("fake server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
