"""Find the chunks that answer a query: dense, keyword (BM25), or both fused.

Hybrid search asks each side for `candidates` results and fuses the two rank
lists by reciprocal rank (RRF): score = sum over lists of 1 / (RRF_K + rank).
RRF needs no score calibration between cosine and BM25, which live on
unrelated scales. Every hit also carries its cosine similarity to the query,
the one absolute number the answer step can use to decide "nothing relevant".

On the embedded store the dense side is an in-memory matrix (rag/dense.py) and
only the final k chunks are read from Qdrant; on a Qdrant server, Qdrant searches.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfhost.errors import InvalidParameterError
from selfhost.rag.dense import DenseIndex
from selfhost.rag.embed import Embedder
from selfhost.rag.keyword import KeywordIndex
from selfhost.rag.store import Chunk, VectorStore

MODES = ("dense", "keyword", "hybrid")
DEFAULT_CANDIDATES = 50  # results each side contributes to the fusion
RRF_K = 60  # the constant from Cormack et al. (2009); damps the weight of the very first ranks


@dataclass(frozen=True)
class Hit:
    point_id: str
    chunk: Chunk
    score: float  # the ranking score of the chosen mode (RRF for hybrid)
    similarity: float  # cosine between query and chunk
    keyword_score: float | None  # BM25, None when BM25 did not return this chunk


def load_keyword_index(store: VectorStore, collection: str) -> KeywordIndex:
    """The saved BM25 index, rebuilt (and saved) when missing or not matching the collection."""
    folder = store.side_dir(collection)
    index = KeywordIndex.load(folder)
    if index is None or index.num_chunks != store.count(collection):
        index = KeywordIndex.build(store.chunks(collection))
        index.save(folder)
    return index


def load_dense_index(store: VectorStore, collection: str, dim: int) -> DenseIndex:
    """The saved vector matrix, rebuilt (and saved) when missing or not matching the collection."""
    folder = store.side_dir(collection)
    index = DenseIndex.load(folder)
    if index is None or index.num_chunks != store.count(collection):
        index = DenseIndex.build(store.vectors(collection), dim)
        index.save(folder)
    return index


class Retriever:
    """Search one collection. Loads the embedder named in the collection unless given one.

    `in_memory` picks the dense search: the in-memory matrix (the default for an
    embedded store) or Qdrant's own query (the default, and only choice, for a server).
    """

    def __init__(
        self, store: VectorStore, collection: str, embedder: Embedder | None = None, in_memory: bool | None = None
    ):
        info = store.info(collection)  # raises CollectionNotFoundError
        if embedder is None:
            embedder = Embedder(info.embedding_model)
        if embedder.dim != info.dim:
            raise InvalidParameterError(
                f"collection {collection!r} holds {info.dim}-d vectors from {info.embedding_model!r}; "
                f"embedder {embedder.model_name!r} makes {embedder.dim}-d vectors"
            )
        self.store = store
        self.collection = collection
        self.embedder = embedder
        self.keyword = load_keyword_index(store, collection)
        if in_memory and not store.is_embedded:
            raise InvalidParameterError("the in-memory dense index is for the embedded store, not a Qdrant server")
        use_matrix = store.is_embedded if in_memory is None else in_memory
        self.dense = load_dense_index(store, collection, info.dim) if use_matrix else None

    def search(
        self,
        query: str,
        k: int = 10,
        mode: str = "hybrid",
        path: str | None = None,
        candidates: int | None = None,
    ) -> list[Hit]:
        """Top-k hits, best first; `path` keeps only that file or folder."""
        if mode not in MODES:
            raise InvalidParameterError(f"search mode must be one of {', '.join(MODES)}, got {mode!r}")
        if k < 1:
            raise InvalidParameterError(f"k must be >= 1, got {k}")
        # A fixed pool (not a multiple of k) so the top 3 of a k=30 search equal a k=3 search.
        candidates = max(k, candidates or DEFAULT_CANDIDATES)
        query_vector = self.embedder.embed_query(query)
        dense_limit = candidates if mode == "hybrid" else k
        filter_path = None if path is None else _absolute(path)
        known: dict[str, Chunk] = {}  # chunks that came back with the dense results
        # One product with the whole matrix gives the cosine of every chunk, keyword-only hits included.
        all_scores = self.dense.scores(query_vector) if self.dense is not None else None
        dense: list[tuple[str, float]] = []
        if mode != "keyword":
            if self.dense is not None:
                dense = self.dense.top(all_scores, dense_limit, filter_path)
            else:
                for pid, score, chunk in self.store.search(self.collection, query_vector, dense_limit, path):
                    dense.append((pid, score))
                    known[pid] = chunk
        keyword = []
        if mode != "dense":
            keyword = self.keyword.search(query, dense_limit, filter_path)

        keyword_scores = dict(keyword)
        if mode == "dense":
            ranked = dense
        elif mode == "keyword":
            ranked = keyword
        else:
            fused: dict[str, float] = {}
            for ranking in ([pid for pid, _ in dense], [pid for pid, _ in keyword]):
                for rank, pid in enumerate(ranking, start=1):
                    fused[pid] = fused.get(pid, 0.0) + 1.0 / (RRF_K + rank)
            ranked = sorted(fused.items(), key=lambda item: item[1], reverse=True)
        ranked = ranked[:k]

        dense_scores = dict(dense)
        missing = [pid for pid, _ in ranked if pid not in known]
        if not missing:
            fetched = {}
        elif self.dense is not None:  # the matrix has the vectors; read only the payloads
            fetched = {pid: (chunk, None) for pid, chunk in self.store.get_chunks(self.collection, missing).items()}
        else:
            fetched = self.store.get(self.collection, missing)
        hits = []
        for pid, score in ranked:
            if pid in known:
                chunk, similarity = known[pid], dense_scores[pid]
            elif pid in fetched:
                chunk, vector = fetched[pid]
                if vector is not None:
                    similarity = float(vector @ query_vector)
                else:
                    similarity = self.dense.score_of(all_scores, pid)
                    assert similarity is not None, pid  # ingest rebuilds the matrix whenever points change
            else:  # deleted since the keyword index was saved
                continue
            hits.append(Hit(pid, chunk, float(score), float(similarity), keyword_scores.get(pid)))
        return hits


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())
