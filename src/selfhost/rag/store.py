"""The vector database: Qdrant, embedded (a folder) or a server (a URL), one code path.

`qdrant-client` runs the same API in-process against a folder ("local mode")
or over HTTP against a Qdrant server, so everything above this file is the same
for both. Why Qdrant rather than Milvus Lite: measured on this project's 2-core
box with 100k x 384 vectors, an unfiltered top-10 took ~20 ms in Qdrant local
mode (with DOT distance, see below) against ~370 ms in Milvus Lite; see
docs/RAG.md for the figures.

Each point is one chunk; its payload keeps the source path, chunk position,
text and the file's content hash (how ingest knows what changed).
"""

from __future__ import annotations

import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from selfhost.errors import CollectionNotFoundError, InvalidParameterError, SelfhostError

# Vectors are unit length, so DOT ranks exactly like COSINE; local mode
# re-normalises the whole matrix on every COSINE query, which costs ~100 ms at 100k.
_DISTANCE = "Dot"
_UPSERT_BATCH = 256
_SCROLL_BATCH = 2048
# Fixed namespace so a (path, hash, position) always maps to the same point id.
_POINT_NAMESPACE = uuid.UUID("5b0f2f43-54b4-4c8e-9f3b-7d7a1f0b6c21")


@dataclass(frozen=True)
class Chunk:
    """One indexed piece of a document, as stored in the payload."""

    path: str  # absolute path of the source file
    chunk_index: int  # position of the chunk in its file, from 0
    text: str
    content_hash: str  # sha256 of the whole file, shared by all its chunks

    @property
    def point_id(self) -> str:
        return str(uuid.uuid5(_POINT_NAMESPACE, f"{self.path}\0{self.content_hash}\0{self.chunk_index}"))

    def payload(self) -> dict:
        # `dirs` lists every ancestor folder so "filter by folder" is one keyword match.
        dirs = [str(p) for p in Path(self.path).parents]
        return {
            "path": self.path,
            "dirs": dirs,
            "chunk_index": self.chunk_index,
            "text": self.text,
            "content_hash": self.content_hash,
        }

    @classmethod
    def from_payload(cls, payload: dict) -> "Chunk":
        return cls(payload["path"], int(payload["chunk_index"]), payload["text"], payload["content_hash"])


@dataclass(frozen=True)
class CollectionInfo:
    name: str
    num_chunks: int
    embedding_model: str
    dim: int
    settings: dict  # what ingest recorded at creation (chunk sizes), so re-indexing stays consistent


def default_store_dir() -> Path:
    """Where the embedded database lives: $SELFHOST_RAG_DIR, else ~/.local/share/selfhost/rag."""
    configured = os.environ.get("SELFHOST_RAG_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".local" / "share" / "selfhost" / "rag"


def path_filter(prefix: str | None):
    """A Qdrant filter matching one file or everything under one folder; None for no filter."""
    if prefix is None:
        return None
    from qdrant_client import models

    target = str(Path(prefix).expanduser().resolve())
    return models.Filter(
        should=[
            models.FieldCondition(key="path", match=models.MatchValue(value=target)),
            models.FieldCondition(key="dirs", match=models.MatchValue(value=target)),
        ]
    )


class VectorStore:
    """Collections of chunks in Qdrant: embedded at `path`, or the server at `url`."""

    def __init__(self, path: Path | None = None, url: str | None = None, api_key: str | None = None):
        from qdrant_client import QdrantClient
        from qdrant_client.http import models

        self._models = models
        if url is not None:
            self.client = QdrantClient(url=url, api_key=api_key)
            self.location = url
            # Side files (the BM25 index) cannot live on the server; keep them per URL.
            slug = re.sub(r"[^A-Za-z0-9]+", "_", url).strip("_")
            self._side_dir = Path.home() / ".cache" / "selfhost" / "rag-keyword" / slug
        else:
            root = Path(path) if path is not None else default_store_dir()
            root.mkdir(parents=True, exist_ok=True)
            try:
                self.client = QdrantClient(path=str(root / "qdrant"))
            except RuntimeError as err:  # local mode holds an exclusive lock on the folder
                raise SelfhostError(f"vector store {root} is in use by another process ({err})") from err
            self.location = str(root)
            self._side_dir = root / "keyword"
        self.is_embedded = url is None

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> "VectorStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- collections -----------------------------------------------------
    def has_collection(self, name: str) -> bool:
        return self.client.collection_exists(name)

    def require(self, name: str) -> None:
        if not self.has_collection(name):
            known = ", ".join(c.name for c in self.collections()) or "none"
            raise CollectionNotFoundError(
                f"no collection {name!r} in {self.location} (collections: {known}); create it with "
                f"`selfhost rag index PATH --collection {name}`"
            )

    def create_collection(self, name: str, dim: int, embedding_model: str, settings: dict | None = None) -> None:
        if not name or not name.replace("-", "").replace("_", "").isalnum():
            raise InvalidParameterError(
                f"collection name must be letters, digits, '-' or '_', got {name!r}"
            )
        m = self._models
        self.client.create_collection(
            name,
            vectors_config=m.VectorParams(size=dim, distance=m.Distance(_DISTANCE)),
            metadata={"embedding_model": embedding_model, "settings": settings or {}},
        )
        if not self.is_embedded:
            # Server only: keyword indexes make the path filters and deletes fast.
            for field in ("path", "dirs"):
                self.client.create_payload_index(name, field, m.PayloadSchemaType.KEYWORD)
            self.client.create_payload_index(name, "chunk_index", m.PayloadSchemaType.INTEGER)

    def info(self, name: str) -> CollectionInfo:
        self.require(name)
        described = self.client.get_collection(name)
        metadata = described.config.metadata or {}
        return CollectionInfo(
            name=name,
            num_chunks=self.count(name),
            embedding_model=metadata.get("embedding_model", "?"),
            dim=described.config.params.vectors.size,
            settings=metadata.get("settings", {}),
        )

    def collections(self) -> list[CollectionInfo]:
        names = sorted(c.name for c in self.client.get_collections().collections)
        return [self.info(name) for name in names]

    def drop(self, name: str) -> None:
        self.require(name)
        self.client.delete_collection(name)
        shutil.rmtree(self.side_dir(name), ignore_errors=True)

    def side_dir(self, name: str) -> Path:
        """A local folder for files that belong to collection `name` but not in the database."""
        return self._side_dir / name

    def count(self, name: str) -> int:
        return self.client.count(name, exact=True).count

    # -- points ------------------------------------------------------------
    def upsert(self, name: str, chunks: Sequence[Chunk], vectors: np.ndarray) -> None:
        assert len(chunks) == len(vectors), (len(chunks), vectors.shape)
        m = self._models
        for start in range(0, len(chunks), _UPSERT_BATCH):
            batch = chunks[start : start + _UPSERT_BATCH]
            self.client.upsert(
                name,
                points=m.Batch(
                    ids=[c.point_id for c in batch],
                    vectors=vectors[start : start + len(batch)].tolist(),
                    payloads=[c.payload() for c in batch],
                ),
                wait=True,
            )

    def delete_paths(self, name: str, paths: Sequence[str]) -> None:
        m = self._models
        for path in paths:
            condition = m.FieldCondition(key="path", match=m.MatchValue(value=path))
            self.client.delete(name, points_selector=m.FilterSelector(filter=m.Filter(must=[condition])), wait=True)

    def file_hashes(self, name: str) -> dict[str, str]:
        """path -> content hash of every file in the collection (read from each file's first chunk)."""
        m = self._models
        first = m.Filter(must=[m.FieldCondition(key="chunk_index", match=m.MatchValue(value=0))])
        points = self._scroll(name, payload=["path", "content_hash"], scroll_filter=first)
        return {p.payload["path"]: p.payload["content_hash"] for p in points}

    def chunks(self, name: str) -> Iterator[tuple[str, Chunk]]:
        """Every (point id, chunk) in the collection, in the database's order."""
        for point in self._scroll(name, payload=True):
            yield str(point.id), Chunk.from_payload(point.payload)

    def get(self, name: str, point_ids: Sequence[str]) -> dict[str, tuple[Chunk, np.ndarray]]:
        """Chunk and vector of each id that exists."""
        points = self.client.retrieve(name, ids=list(point_ids), with_payload=True, with_vectors=True)
        return {str(p.id): (Chunk.from_payload(p.payload), np.asarray(p.vector, dtype=np.float32)) for p in points}

    def get_chunks(self, name: str, point_ids: Sequence[str]) -> dict[str, Chunk]:
        """Chunk of each id that exists, without its vector."""
        points = self.client.retrieve(name, ids=list(point_ids), with_payload=True, with_vectors=False)
        return {str(p.id): Chunk.from_payload(p.payload) for p in points}

    def vectors(self, name: str) -> Iterator[tuple[str, str, np.ndarray]]:
        """Every (point id, path, vector) in the collection, in the database's order."""
        offset = None
        while True:
            points, offset = self.client.scroll(
                name, limit=_SCROLL_BATCH, offset=offset, with_payload=["path"], with_vectors=True
            )
            if points:
                batch = np.asarray([p.vector for p in points], dtype=np.float32)  # (batch, dim)
                for point, vector in zip(points, batch):
                    yield str(point.id), point.payload["path"], vector
            if offset is None:
                return

    def search(self, name: str, vector: np.ndarray, limit: int, path_prefix: str | None = None) -> list[tuple[str, float, Chunk]]:
        """Nearest chunks by dot product: (point id, score, chunk), best first."""
        response = self.client.query_points(
            name,
            query=vector.tolist(),
            limit=limit,
            query_filter=path_filter(path_prefix),
            with_payload=True,
        )
        return [(str(p.id), float(p.score), Chunk.from_payload(p.payload)) for p in response.points]

    def _scroll(self, name: str, payload, scroll_filter=None) -> Iterator:
        offset = None
        while True:
            points, offset = self.client.scroll(
                name, scroll_filter=scroll_filter, limit=_SCROLL_BATCH, offset=offset,
                with_payload=payload, with_vectors=False,
            )
            yield from points
            if offset is None:
                return
