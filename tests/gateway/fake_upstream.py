"""A fake OpenAI-compatible upstream on a loopback port that can be told how to fail.

Modes: "ok"; "500", "429" and "401" (an error before any byte); "hang" (no answer within any
test timeout); "drop" (a stream that sends two chunks, then the connection dies);
"slow" (answers after SLOW_S, to hold requests outstanding); "stall" (a stream that sends one chunk,
then nothing more for 30 s).
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse

SLOW_S = 0.3
WORDS = ["Hello", " from", " upstream"]
TOOL_ARGUMENTS = {"city": "Paris", "unit": "celsius"}
# Usage every answer reports: hand-priced in the tests (cached and reasoning tokens included).
USAGE = {"prompt_tokens": 1000, "completion_tokens": 80, "total_tokens": 1080,
         "prompt_tokens_details": {"cached_tokens": 200}, "completion_tokens_details": {"reasoning_tokens": 30}}


class FakeUpstream:
    def __init__(self, label: str):
        self.label = label
        self.mode = "ok"
        self.received: list[tuple[dict, dict]] = []  # (headers, body) of every request
        app = FastAPI()
        app.post("/v1/chat/completions")(self._chat)
        app.post("/v1/completions")(self._chat)
        app.post("/v1/embeddings")(self._embeddings)
        app.get("/v1/models")(self._models)
        # IPPROTO_TCP: asyncio then sets TCP_NODELAY (no ~40 ms Nagle/delayed-ACK stall per response).
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        config = uvicorn.Config(app, log_level="warning", access_log=False, timeout_graceful_shutdown=1)
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"

    def start(self) -> FakeUpstream:
        self.thread.start()
        while not self.server.started:
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)

    async def _failure(self):
        if self.mode in ("500", "429", "401"):
            return JSONResponse({"error": {"message": f"{self.label} says {self.mode}", "type": "server_error"}},
                                status_code=int(self.mode))
        if self.mode == "hang":
            await asyncio.sleep(30)
        if self.mode == "slow":
            await asyncio.sleep(SLOW_S)
        return None

    async def _chat(self, request: Request):
        body = await request.json()
        self.received.append((dict(request.headers), body))
        failure = await self._failure()
        if failure is not None:
            return failure
        if "messages" not in body and "prompt" not in body:
            return JSONResponse({"error": {"message": "messages or prompt required", "type": "invalid_request_error"}},
                                status_code=400)
        if body.get("tools"):
            return self._tool_call(body)
        if body.get("stream"):
            return StreamingResponse(self._stream(body), media_type="text/event-stream")
        return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(WORDS) + " " + self.label},
                             "finish_reason": "stop"}], "usage": USAGE}

    def _tool_call(self, body: dict):
        """A request with tools: a call of the first tool with TOOL_ARGUMENTS, whole or (streamed) in three pieces
        after a first delta with the call's id and name, as OpenAI sends them."""
        name = body["tools"][0]["function"]["name"]
        text = json.dumps(TOOL_ARGUMENTS)
        if not body.get("stream"):
            call = {"id": "call_up_0", "type": "function", "function": {"name": name, "arguments": text}}
            return {"id": "chatcmpl-1", "object": "chat.completion", "created": 1, "model": body["model"],
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": None, "tool_calls": [call]},
                                 "finish_reason": "tool_calls"}], "usage": USAGE}

        async def pieces():
            deltas = [{"index": 0, "id": "call_up_0", "type": "function", "function": {"name": name, "arguments": ""}}]
            deltas += [{"index": 0, "function": {"arguments": text[i:i + 8]}} for i in range(0, len(text), 8)]
            for n, delta in enumerate(deltas):
                chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                         "choices": [{"index": 0, "delta": {"tool_calls": [delta]},
                                      "finish_reason": "tool_calls" if n == len(deltas) - 1 else None}]}
                yield f"data: {json.dumps(chunk)}\n\n"
            if (body.get("stream_options") or {}).get("include_usage"):
                usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                         "choices": [], "usage": USAGE}
                yield f"data: {json.dumps(usage)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(pieces(), media_type="text/event-stream")

    async def _stream(self, body: dict):
        for i, word in enumerate(WORDS):
            if self.mode == "drop" and i == 2:
                raise RuntimeError("the upstream dies mid-stream")  # uvicorn cuts the connection
            if self.mode == "stall" and i == 1:
                await asyncio.sleep(30)
            chunk = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                     "choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            yield f"data: {json.dumps(chunk)}\n\n"
            await asyncio.sleep(0)
        if (body.get("stream_options") or {}).get("include_usage"):
            usage = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": body["model"],
                     "choices": [], "usage": USAGE}
            yield f"data: {json.dumps(usage)}\n\n"
        yield "data: [DONE]\n\n"

    async def _models(self):
        failure = await self._failure() if self.mode != "slow" else None
        return failure or {"object": "list", "data": [{"id": "gpt-4o-mini", "object": "model"}]}

    async def _embeddings(self, request: Request):
        body = await request.json()
        self.received.append((dict(request.headers), body))
        failure = await self._failure()
        if failure is not None:
            return failure
        return {"object": "list", "model": body["model"], "usage": {"prompt_tokens": 7, "total_tokens": 7},
                "data": [{"object": "embedding", "index": 0, "embedding": [0.1, 0.2, 0.3]}]}
