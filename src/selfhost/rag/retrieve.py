"""Find the chunks that answer a query: dense, keyword (BM25), or both fused.

Hybrid search asks each side for `candidates` results and fuses the two rank
lists by reciprocal rank (RRF): score = sum over lists of 1 / (RRF_K + rank).
RRF needs no score calibration between cosine and BM25, which live on
unrelated scales. Every hit also carries its cosine similarity to the query,
the one absolute number the answer step can use to decide "nothing relevant".
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from selfhost.errors import InvalidParameterError
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


class Retriever:
    """Search one collection. Loads the embedder named in the collection unless given one."""

    def __init__(self, store: VectorStore, collection: str, embedder: Embedder | None = None):
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
        dense = []
        if mode != "keyword":
            dense = self.store.search(self.collection, query_vector, candidates if mode == "hybrid" else k, path)
        keyword = []
        if mode != "dense":
            filter_path = None if path is None else _absolute(path)
            keyword = self.keyword.search(query, candidates if mode == "hybrid" else k, filter_path)

        keyword_scores = dict(keyword)
        if mode == "dense":
            ranked = [(pid, score) for pid, score, _ in dense]
        elif mode == "keyword":
            ranked = keyword
        else:
            fused: dict[str, float] = {}
            for ranking in ([pid for pid, _, _ in dense], [pid for pid, _ in keyword]):
                for rank, pid in enumerate(ranking, start=1):
                    fused[pid] = fused.get(pid, 0.0) + 1.0 / (RRF_K + rank)
            ranked = sorted(fused.items(), key=lambda item: item[1], reverse=True)
        ranked = ranked[:k]

        # Dense hits came back with payloads; fetch only the keyword-only ones.
        known = {pid: (chunk, score) for pid, score, chunk in dense}
        missing = [pid for pid, _ in ranked if pid not in known]
        fetched = self.store.get(self.collection, missing) if missing else {}
        hits = []
        for pid, score in ranked:
            if pid in known:
                chunk, similarity = known[pid]
            elif pid in fetched:
                chunk, vector = fetched[pid]
                similarity = float(vector @ query_vector)
            else:  # deleted since the keyword index was saved
                continue
            hits.append(Hit(pid, chunk, float(score), float(similarity), keyword_scores.get(pid)))
        return hits


def _absolute(path: str) -> str:
    return str(Path(path).expanduser().resolve())
