"""Chat completions that answer from a RAG collection (the request's `rag` field).

The last user message is the question. It is searched in the collection
(hybrid dense + BM25, rag/retrieve.py); chunks similar enough to it become
numbered sources in the grounded prompt of rag/answer.py, and the requested
chat model generates as for any chat request. The sources are fitted into the
model's window with room for the answer (rag/fit.py: the lowest-ranked dropped,
the next one cut short). The response is a normal chat completion plus a
top-level `sources` list (and `sources_note` when some were dropped or cut); a
stream carries them in its first chunk (the one with the assistant role), before any text. When nothing
relevant is found the model is not called: the answer says so, with no sources.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass
from pathlib import Path

from selfhost.errors import CollectionNotFoundError, InvalidParameterError, SelfhostError
from selfhost.server import openai_serving as oai
from selfhost.server.embedding_serving import EmbeddingModels, LoadedEmbedder
from selfhost.server.errors import APIError
from selfhost.server.protocol import (
    AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletionChunk, ChatCompletionRequest,
    ChatCompletionResponse, DeltaMessage, UsageInfo,
)
from selfhost.server.rag_protocol import RagOptions, SourceInfo
from selfhost.server.serving import Generation, Serving, sse
from selfhost.server.wire import random_id

log = logging.getLogger(__name__)


class Collections:
    """The vector store chat requests answer from, opened on first use, and a Retriever per collection.

    The embedded store is opened once and held (Qdrant's local mode locks its
    folder, so `selfhost rag index` cannot write to it while the server runs;
    use a Qdrant server via `--vector-url` to index and serve at the same time).
    """

    def __init__(self, store_dir: Path | None, vector_url: str | None, embedders: EmbeddingModels):
        self.store_dir = store_dir
        self.vector_url = vector_url
        self.embedders = embedders
        self._store = None
        self._retrievers: dict[str, tuple[object, LoadedEmbedder]] = {}
        self._open_lock = asyncio.Lock()
        self._store_lock = threading.Lock()  # qdrant-client's local mode is not made for concurrent callers

    async def search(self, options: RagOptions, question: str) -> list:
        """Hybrid top-k hits for `question`; 404 for a collection the store does not hold."""
        retriever, loaded = await self._retriever(options.collection)

        def search():
            with self._store_lock, loaded.lock:
                return retriever.search(question, k=options.top_k, mode="hybrid", path=options.path)

        return await asyncio.to_thread(search)

    async def _retriever(self, name: str):
        if name not in self._retrievers:
            async with self._open_lock:
                if name not in self._retrievers:
                    self._retrievers[name] = await self._open_retriever(name)
        return self._retrievers[name]

    async def _open_retriever(self, name: str):
        from selfhost.rag.retrieve import Retriever

        store = await self._open_store()
        try:
            info = await asyncio.to_thread(self._locked, store.info, name)
        except CollectionNotFoundError as err:
            raise APIError(str(err), 404, param="rag.collection", code="collection_not_found") from err
        loaded = await self.embedders.load(info.embedding_model)
        retriever = await asyncio.to_thread(self._locked, Retriever, store, name, loaded.embedder)
        return retriever, loaded

    async def _open_store(self):
        if self._store is None:
            from selfhost.rag.store import VectorStore

            try:
                self._store = await asyncio.to_thread(
                    VectorStore, self.store_dir, self.vector_url, os.environ.get("QDRANT_API_KEY")
                )
            except SelfhostError as err:  # the folder is locked by another process
                raise APIError(str(err), 503, param="rag.collection", code="vector_store_unavailable") from err
        return self._store

    def _locked(self, fn, *args):
        with self._store_lock:
            return fn(*args)

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None
            self._retrievers.clear()


@dataclass(frozen=True)
class GroundedChat:
    sources: list[SourceInfo]  # empty when nothing relevant was found
    gen: Generation | None  # None when there is nothing to generate from
    refusal: str | None  # the answer when gen is None
    note: str | None = None  # what was dropped or cut to fit the model's window

    def fields(self) -> dict:
        """The top-level fields a grounded response adds to a chat completion."""
        fields = {"sources": [s.model_dump() for s in self.sources]}
        if self.note is not None:
            fields["sources_note"] = self.note
        return fields


async def ground(serving: Serving, collections: Collections, req: ChatCompletionRequest) -> GroundedChat:
    """Search the collection for the last user message and prepare generation from what is relevant."""
    from selfhost.rag.answer import DEFAULT_MIN_SIMILARITY, ground_conversation, nothing_relevant, relevant_sources

    messages = req.message_dicts()
    questions = [m["content"] for m in messages if m["role"] == "user"]
    if not questions or not questions[-1].strip():
        raise APIError("a request with `rag` needs a non-empty user message: the last one is the question",
                       param="messages", code="invalid_value")
    served = await serving.model(req.model)  # an unknown model fails before any search
    options = req.rag
    hits = await collections.search(options, questions[-1])
    min_score = DEFAULT_MIN_SIMILARITY if options.min_score is None else options.min_score
    sources = relevant_sources(hits, min_score)
    if not sources:
        return GroundedChat([], None, nothing_relevant(options.collection))
    sources, note = await _fit_to_window(served, req, messages, sources)
    if note is not None:
        log.info("rag %r: %s", options.collection, note)
    wire = [SourceInfo(number=s.number, path=s.path, chunk_index=s.chunk_index, score=s.score,
                       similarity=s.similarity, text=s.text) for s in sources]
    try:
        gen = await oai.prepare_chat(serving, served, req, ground_conversation(messages, sources))
    except APIError as err:
        if err.code != "context_length_exceeded":
            raise
        raise APIError(f"{err.message} with {len(sources)} sources from {options.collection!r} in the prompt; "
                       "ask for fewer with rag.top_k", err.status, param=err.param, code=err.code) from err
    return GroundedChat(wire, gen, None, note)


async def _fit_to_window(served, req: ChatCompletionRequest, messages: list[dict], sources: list):
    """The sources that fit the model's window with room for the answer, and a note on what did not."""
    from selfhost.rag.answer import ground_conversation
    from selfhost.rag.fit import answer_floor, fit_sources

    tokenizer, window = served.llm.tokenizer, served.llm.max_model_len
    if not tokenizer.has_chat_template:  # prepare_chat answers the request's error
        return sources, None
    # An explicit max_tokens is kept whole (OpenAI semantics); without one the answer gets the rest of
    # the window, of which the sources leave it at least a quarter.
    answer_tokens = req.requested_max_tokens or answer_floor(window, window)
    try:
        fitted = await asyncio.to_thread(
            fit_sources, sources, lambda kept: len(tokenizer.encode_chat(ground_conversation(messages, kept))),
            window, answer_tokens, answer_tokens,
        )
    except InvalidParameterError as err:
        raise APIError(str(err), param="messages", code="context_length_exceeded") from err
    return fitted.sources, fitted.note()


async def chat_completion(serving: Serving, req: ChatCompletionRequest, grounded: GroundedChat) -> dict:
    if grounded.gen is None:
        choices = [ChatChoice(index=i, message=AssistantMessage(content=grounded.refusal), finish_reason="stop")
                   for i in range(req.n)]
        response = ChatCompletionResponse(id=random_id("chatcmpl"), model=req.model, choices=choices,
                                          usage=UsageInfo())
    else:
        response = await oai.chat_completion(serving, req, grounded.gen)
    return {**response.model_dump(mode="json"), **grounded.fields()}


async def chat_completion_stream(
    serving: Serving, req: ChatCompletionRequest, grounded: GroundedChat
) -> AsyncIterator[str]:
    events = _refusal_stream(req, grounded.refusal) if grounded.gen is None else (
        oai.chat_completion_stream(serving, req, grounded.gen))
    is_first = True
    async with aclosing(events) as items:
        async for event in items:
            if is_first:
                event = _with_fields(event, grounded.fields())
                is_first = False
            yield event


def _with_fields(event: str, fields: dict) -> str:
    """More top-level fields in a `data: {...}` server-sent event."""
    body = json.loads(event.removeprefix("data: "))
    body.update(fields)
    return sse(json.dumps(body))


async def _refusal_stream(req: ChatCompletionRequest, text: str) -> AsyncIterator[str]:
    chunk_id, created = random_id("chatcmpl"), int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage: UsageInfo | None = None) -> str:
        return sse(ChatCompletionChunk(id=chunk_id, created=created, model=req.model, choices=choices,
                                       usage=usage).model_dump_json())

    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant", content="")) for i in range(req.n)])
    yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(content=text), finish_reason="stop")
                 for i in range(req.n)])
    if req.include_usage:
        yield chunk([], UsageInfo())
    yield sse("[DONE]")
