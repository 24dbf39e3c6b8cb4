"""Embedding models the server holds, and the logic behind POST /v1/embeddings.

The models named by `--embedding-model` (default: the bundled all-MiniLM-L6-v2)
are served under those names and load on their first request, off the event
loop; nothing is loaded at start-up, so a server that never embeds pays nothing.
Chat requests that name a RAG collection borrow the same instances: an embedder
is shared by every user of the same model.

An Embedder is not safe to call from two threads at once (its tokenizer is
not), and on CPU two concurrent forwards only fight over the same cores, so each
embedder has a lock and its calls queue.
"""

from __future__ import annotations

import asyncio
import base64
import threading
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np

from selfhost.server.embedding_protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, EmbeddingUsage
from selfhost.server.errors import APIError

T = TypeVar("T")


@dataclass(frozen=True)
class LoadedEmbedder:
    embedder: object  # selfhost.rag.Embedder
    lock: threading.Lock

    def call(self, fn: Callable[..., T], *args) -> T:
        """Run fn(*args) with this embedder to itself (call it in a worker thread)."""
        with self.lock:
            return fn(*args)


def split_name(arg: str) -> tuple[str, str]:
    """'NAME=REF' -> (NAME, REF); 'REF' -> (REF, REF)."""
    name, sep, ref = arg.partition("=")
    return (name, ref) if sep else (arg, arg)


class EmbeddingModels:
    """Served embedding models by name; instances cached by the model they load."""

    def __init__(self, args: list[str]):
        self.refs = dict(split_name(arg) for arg in args)  # served name -> model reference
        self._loaded: dict[str, LoadedEmbedder] = {}  # canonical model name -> instance
        self._load_lock = asyncio.Lock()

    def names(self) -> list[str]:
        return list(self.refs)

    async def get(self, name: str) -> LoadedEmbedder:
        """The embedder served as `name`; 404 when this server does not serve one by that name."""
        ref = self.refs.get(name)
        if ref is None:
            served = ", ".join(self.refs) or "none"
            raise APIError(f"embedding model {name!r} is not served here (embedding models: {served}); "
                           "start the server with --embedding-model to add one",
                           404, param="model", code="model_not_found")
        return await self.load(ref)

    async def load(self, ref: str | None) -> LoadedEmbedder:
        """An embedder for any model reference (a collection's recorded model), loaded once."""
        from selfhost.rag.embed import canonical_model_name

        key = canonical_model_name(ref)
        if key not in self._loaded:
            async with self._load_lock:  # two first requests must not load the model twice
                if key not in self._loaded:
                    self._loaded[key] = await asyncio.to_thread(_load, ref)
        return self._loaded[key]


def _load(ref: str | None) -> LoadedEmbedder:
    from selfhost.rag.embed import Embedder

    return LoadedEmbedder(Embedder(ref), threading.Lock())


def encode_vector(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        # OpenAI's wire format: the raw little-endian float32 bytes, base64-encoded.
        return base64.b64encode(np.ascontiguousarray(vector, dtype="<f4").tobytes()).decode("ascii")
    return vector.tolist()


async def create_embeddings(models: EmbeddingModels, chat_model_names: list[str], req: EmbeddingRequest) -> EmbeddingResponse:
    if req.model not in models.refs and req.model in chat_model_names:
        raise APIError(f"model {req.model!r} is a chat model, not an embedding model; embedding models here: "
                       f"{', '.join(models.names()) or 'none'}", 400, param="model", code="not_an_embedding_model")
    loaded = await models.get(req.model)
    embedder = loaded.embedder
    if req.dimensions is not None and req.dimensions != embedder.dim:
        raise APIError(f"dimensions={req.dimensions} is not supported: {req.model!r} makes {embedder.dim}-d vectors "
                       "and cannot shorten them", param="dimensions", code="invalid_value")
    inputs = req.inputs()
    if req.is_tokens:
        out = await asyncio.to_thread(loaded.call, embedder.embed_token_ids, inputs)
    else:
        out = await asyncio.to_thread(loaded.call, embedder.embed, inputs)
    data = [EmbeddingData(index=i, embedding=encode_vector(v, req.encoding_format)) for i, v in enumerate(out.vectors)]
    usage = EmbeddingUsage(prompt_tokens=out.total_tokens, total_tokens=out.total_tokens)
    return EmbeddingResponse(data=data, model=req.model, usage=usage)
