"""BM25 over a collection's chunk texts (bm25s), saved beside the vector database.

Neither Qdrant's local mode nor every server version scores BM25 itself, so the
keyword side lives here: rebuilt from the collection's payloads after every
ingest that changes something, and saved so a query process only loads it. The
saved index records how many chunks it covered; a mismatch with the collection
(another machine ingested into a shared server) triggers a rebuild.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

import numpy as np

from selfhost.rag.store import Chunk

_META_FILE = "selfhost_keyword.json"


def _tokenize(texts: list[str]) -> list[list[str]]:
    import bm25s
    from bm25s.stopwords import STOPWORDS_EN_PLUS

    # The longer (NLTK) stop list: with bm25s' short default, words like "where",
    # "each" and "how" match everywhere and drag unrelated chunks into the fusion.
    return bm25s.tokenize(texts, stopwords=list(STOPWORDS_EN_PLUS), return_ids=False, show_progress=False)


class KeywordIndex:
    """BM25 scores for a query over every chunk; results are point ids."""

    def __init__(self, retriever, point_ids: list[str], paths: list[str]):
        self._retriever = retriever
        self.point_ids = point_ids
        self._paths = paths

    @property
    def num_chunks(self) -> int:
        return len(self.point_ids)

    @classmethod
    def build(cls, items: Iterable[tuple[str, Chunk]]) -> "KeywordIndex":
        import bm25s

        point_ids, paths, texts = [], [], []
        for point_id, chunk in items:
            point_ids.append(point_id)
            paths.append(chunk.path)
            texts.append(chunk.text)
        retriever = bm25s.BM25()
        if texts:
            retriever.index(_tokenize(texts), show_progress=False)
        return cls(retriever, point_ids, paths)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.point_ids:
            self._retriever.save(str(folder))
        meta = {"point_ids": self.point_ids, "paths": self._paths}
        (folder / _META_FILE).write_text(json.dumps(meta))

    @staticmethod
    def invalidate(folder: Path) -> None:
        """Forget the saved index (before the collection changes under it)."""
        (folder / _META_FILE).unlink(missing_ok=True)

    @classmethod
    def load(cls, folder: Path) -> "KeywordIndex | None":
        """The saved index, or None when there is none."""
        import bm25s

        meta_file = folder / _META_FILE
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        retriever = bm25s.BM25.load(str(folder)) if meta["point_ids"] else bm25s.BM25()
        return cls(retriever, meta["point_ids"], meta["paths"])

    def search(self, query: str, limit: int, path_prefix: str | None = None) -> list[tuple[str, float]]:
        """(point id, BM25 score) best first; chunks sharing no term with the query are left out."""
        if not self.point_ids or limit < 1:
            return []
        query_tokens = _tokenize([query])
        if not query_tokens[0]:
            return []
        mask = None
        if path_prefix is not None:
            folder_prefix = path_prefix.rstrip("/") + "/"
            mask = np.fromiter(
                (p == path_prefix or p.startswith(folder_prefix) for p in self._paths), dtype=np.float32,
                count=len(self._paths),
            )
        limit = min(limit, self.num_chunks)
        # n_threads=0 scores in this thread; any other value starts a thread pool per query.
        docs, scores = self._retriever.retrieve(
            query_tokens, k=limit, show_progress=False, n_threads=0, weight_mask=mask
        )
        return [(self.point_ids[d], float(s)) for d, s in zip(docs[0], scores[0]) if s > 0]
