"""Index files into a collection, incrementally.

A file is identified by its absolute path and versioned by the sha256 of its
bytes, which every one of its chunks carries. Re-running over the same roots:
unchanged files are skipped, changed files are re-chunked and re-embedded (old
chunks deleted only once the new vectors exist), and files that were indexed
under one of the roots but are gone from disk are removed. Files indexed from
other roots are left alone.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np

from selfhost.errors import InvalidParameterError
from selfhost.rag.chunk import ChunkConfig, chunk_text
from selfhost.rag.dense import DenseIndex
from selfhost.rag.embed import Embedder
from selfhost.rag.keyword import KeywordIndex
from selfhost.rag.readers import find_documents, read_document
from selfhost.rag.store import Chunk, VectorStore


@dataclass(frozen=True)
class IngestReport:
    added: list[str] = field(default_factory=list)
    updated: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    unchanged: int = 0
    empty: list[str] = field(default_factory=list)  # readable files with no text (e.g. scanned PDFs)
    num_chunks_written: int = 0
    num_chunks_total: int = 0
    seconds: float = 0.0

    @property
    def changed(self) -> bool:
        return bool(self.added or self.updated or self.removed)


def _under(path: str, roots: Sequence[Path]) -> bool:
    return any(path == str(root) or path.startswith(str(root) + os.sep) for root in roots)


def _open_collection(store: VectorStore, collection: str, embedder: Embedder, chunking: ChunkConfig | None) -> ChunkConfig:
    """Create the collection on first use; afterwards insist on its model and chunk sizes."""
    if chunking is not None and chunking.max_tokens > embedder.max_text_tokens:
        raise InvalidParameterError(
            f"chunks of {chunking.max_tokens} tokens do not fit {embedder.model_name!r}, which reads "
            f"{embedder.max_text_tokens} tokens of text; use at most that"
        )
    if not store.has_collection(collection):
        # A little headroom: joining units can add a token or two to the summed count.
        chunking = chunking or ChunkConfig(max_tokens=min(ChunkConfig.max_tokens, embedder.max_text_tokens - 4))
        settings = {"max_tokens": chunking.max_tokens, "overlap_tokens": chunking.overlap_tokens}
        store.create_collection(collection, embedder.dim, embedder.model_name, settings)
        return chunking
    info = store.info(collection)
    if info.embedding_model != embedder.model_name:
        raise InvalidParameterError(
            f"collection {collection!r} was built with embedding model {info.embedding_model!r}, "
            f"not {embedder.model_name!r}; drop it or index into a new collection"
        )
    recorded = ChunkConfig(**info.settings) if info.settings else ChunkConfig()
    if chunking is not None and chunking != recorded:
        raise InvalidParameterError(
            f"collection {collection!r} uses chunks of {recorded.max_tokens} tokens with {recorded.overlap_tokens} "
            f"overlap, not {chunking.max_tokens}/{chunking.overlap_tokens}; drop it to change chunking"
        )
    return recorded


def ingest(
    paths: Sequence[Path],
    store: VectorStore,
    collection: str,
    embedder: Embedder,
    chunking: ChunkConfig | None = None,
    show_progress: bool = False,
) -> IngestReport:
    """Bring `collection` in line with the readable files under `paths`."""
    started = time.perf_counter()
    roots = [Path(p).expanduser().resolve() for p in paths]
    documents = find_documents(roots)
    chunking = _open_collection(store, collection, embedder, chunking)
    indexed = store.file_hashes(collection)

    added, updated, empty, unchanged = [], [], [], 0
    new_chunks: list[Chunk] = []
    for document in documents:
        path = str(document)
        content_hash = hashlib.sha256(document.read_bytes()).hexdigest()
        if indexed.get(path) == content_hash:
            unchanged += 1
            continue
        texts = chunk_text(read_document(document), embedder.count_tokens, chunking)
        if not texts:
            empty.append(path)
            if path in indexed:  # it had text before; its old chunks are now wrong
                updated.append(path)
            continue
        (updated if path in indexed else added).append(path)
        new_chunks.extend(Chunk(path, i, text, content_hash) for i, text in enumerate(texts))

    present = {str(d) for d in documents}
    removed = sorted(p for p in indexed if _under(p, roots) and p not in present)

    vectors = embedder.embed([c.text for c in new_chunks], show_progress=show_progress).vectors
    side_dir = store.side_dir(collection)
    # Read before it is dropped below: updating it is far cheaper than scrolling every vector back out.
    previous_dense = DenseIndex.load(side_dir) if store.is_embedded else None
    if new_chunks or updated or removed:
        # The side indexes go stale from here on; forgetting them first means a crash
        # mid-way leaves them missing (rebuilt on next use), never silently wrong.
        KeywordIndex.invalidate(side_dir)
        DenseIndex.invalidate(side_dir)
    # Old versions go only after the new vectors exist, so a failed embed loses nothing.
    store.delete_paths(collection, updated + removed)
    if new_chunks:
        store.upsert(collection, new_chunks, vectors.astype(np.float32))

    report = IngestReport(
        added=added,
        updated=updated,
        removed=removed,
        unchanged=unchanged,
        empty=empty,
        num_chunks_written=len(new_chunks),
        num_chunks_total=store.count(collection),
    )
    if report.changed or KeywordIndex.load(side_dir) is None:
        KeywordIndex.build(store.chunks(collection)).save(side_dir)
    if store.is_embedded and (report.changed or previous_dense is None):
        dense = None
        if previous_dense is not None:
            dense = previous_dense.updated(
                set(updated + removed), [c.point_id for c in new_chunks], [c.path for c in new_chunks], vectors
            )
        if dense is None or dense.num_chunks != report.num_chunks_total:
            dense = DenseIndex.build(store.vectors(collection), embedder.dim)
        dense.save(side_dir)
    return replace(report, seconds=time.perf_counter() - started)
