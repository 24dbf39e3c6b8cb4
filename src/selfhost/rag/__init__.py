"""Retrieval-augmented generation: embed, store, ingest, retrieve, answer, evaluate.

    from selfhost.rag import Embedder, VectorStore, Retriever, ingest
    with VectorStore() as store:                      # embedded Qdrant; VectorStore(url=...) for a server
        ingest(["docs/"], store, "notes", Embedder())
        hits = Retriever(store, "notes").search("how do I rotate the keys?", k=5)

The path of a document: readers -> chunk -> embed -> store (+ keyword) at
ingest; embed -> store + keyword -> retrieve (fusion) -> answer at query time.
"""

from __future__ import annotations

# Names are resolved on first use: importing torch and qdrant-client takes
# seconds, and `selfhost --help` should not pay for it.
_EXPORTS = {
    "Embedder": "selfhost.rag.embed",
    "Embeddings": "selfhost.rag.embed",
    "VectorStore": "selfhost.rag.store",
    "Retriever": "selfhost.rag.retrieve",
    "Hit": "selfhost.rag.retrieve",
    "ingest": "selfhost.rag.ingest",
    "answer_question": "selfhost.rag.answer",
    "ChunkConfig": "selfhost.rag.chunk",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(name)
    import importlib

    return getattr(importlib.import_module(_EXPORTS[name]), name)
