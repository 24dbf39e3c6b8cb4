"""Exact dense search over an embedded collection: its vectors as one float32 matrix.

Qdrant's local mode answers a query by multiplying the query with its whole
vector matrix (held as float64, so 300 MB at 100k x 384), in a multi-threaded
BLAS call, and then sorting every score. On this project's shared 2-core box
that was the largest share of a 100k-chunk search after the query embedding.
Here the same exact search is one float32 matrix-vector product on one BLAS
thread (multi-threaded BLAS collapses when another process wants a core; see
layers/linear.py) and an argpartition of the candidates.

Qdrant stays the store of record. The matrix is a cache of it, saved beside the
keyword index (`<store>/keyword/<collection>/dense.npy`): ingest drops it before
changing the collection and saves the updated one afterwards (the old rows minus
changed files plus the new vectors, or rebuilt from Qdrant when that does not add
up), and a cache whose size does not match the collection is rebuilt on load. A Qdrant server searches itself
(HNSW), so this is for the embedded store only.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Iterable

import numpy as np

_MATRIX_FILE = "dense.npy"
_META_FILE = "dense.json"


class _OneBlasThread:
    """numpy's BLAS on one thread for the duration of a `with` block, then as it was."""

    def __init__(self):
        from threadpoolctl import ThreadpoolController

        self._libs = ThreadpoolController().select(user_api="blas").lib_controllers
        self._lock = threading.Lock()  # the setting is process-wide
        self._previous: list[int] = []

    def __enter__(self) -> None:
        self._lock.acquire()
        self._previous = [lib.get_num_threads() for lib in self._libs]
        for lib in self._libs:
            lib.set_num_threads(1)

    def __exit__(self, *exc) -> None:
        for lib, threads in zip(self._libs, self._previous):
            lib.set_num_threads(threads)
        self._lock.release()


_one_blas_thread: _OneBlasThread | None = None


def one_blas_thread() -> _OneBlasThread:
    global _one_blas_thread
    if _one_blas_thread is None:
        _one_blas_thread = _OneBlasThread()
    return _one_blas_thread


class DenseIndex:
    """Every vector of a collection, one row per point, for exact top-k by dot product."""

    def __init__(self, point_ids: list[str], paths: list[str], vectors: np.ndarray):
        assert vectors.ndim == 2 and len(vectors) == len(point_ids) == len(paths), (vectors.shape, len(point_ids))
        self.point_ids = point_ids
        self.paths = paths
        self.vectors = np.ascontiguousarray(vectors, dtype=np.float32)  # (N, dim)
        self._row_of = {pid: row for row, pid in enumerate(point_ids)}

    @property
    def num_chunks(self) -> int:
        return len(self.point_ids)

    @classmethod
    def build(cls, points: Iterable[tuple[str, str, np.ndarray]], dim: int) -> "DenseIndex":
        """From (point id, path, vector) triples, e.g. VectorStore.vectors()."""
        point_ids, paths, rows = [], [], []
        for point_id, path, vector in points:
            point_ids.append(point_id)
            paths.append(path)
            rows.append(vector)
        vectors = np.stack(rows).astype(np.float32) if rows else np.zeros((0, dim), dtype=np.float32)
        return cls(point_ids, paths, vectors)

    def updated(
        self, removed_paths: set[str], point_ids: list[str], paths: list[str], vectors: np.ndarray
    ) -> "DenseIndex":
        """A new index without the rows of `removed_paths` and with the given rows added (what ingest changed)."""
        keep = np.fromiter((p not in removed_paths for p in self.paths), dtype=bool, count=len(self.paths))
        rows = np.flatnonzero(keep)
        return DenseIndex(
            [self.point_ids[r] for r in rows] + list(point_ids),
            [self.paths[r] for r in rows] + list(paths),
            np.concatenate([self.vectors[rows], np.asarray(vectors, dtype=np.float32).reshape(-1, self.vectors.shape[1])]),
        )

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / _MATRIX_FILE, self.vectors)
        # The metadata goes last: a folder with it holds a complete index.
        (folder / _META_FILE).write_text(json.dumps({"point_ids": self.point_ids, "paths": self.paths}))

    @classmethod
    def load(cls, folder: Path) -> "DenseIndex | None":
        """The saved index, or None when there is none (or it is incomplete)."""
        meta_file, matrix_file = folder / _META_FILE, folder / _MATRIX_FILE
        if not meta_file.is_file() or not matrix_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        vectors = np.load(matrix_file)
        if len(vectors) != len(meta["point_ids"]):
            return None
        return cls(meta["point_ids"], meta["paths"], vectors)

    @staticmethod
    def invalidate(folder: Path) -> None:
        """Forget the saved index (before the collection changes under it)."""
        (folder / _META_FILE).unlink(missing_ok=True)

    def scores(self, query_vector: np.ndarray) -> np.ndarray:
        """(N,) dot product of the query with every chunk; cosine, as both sides are unit length."""
        query = np.ascontiguousarray(query_vector, dtype=np.float32)
        with one_blas_thread():
            return self.vectors @ query

    def top(self, scores: np.ndarray, limit: int, path_prefix: str | None = None) -> list[tuple[str, float]]:
        """The `limit` best (point id, score), best first; `path_prefix` keeps one file or folder."""
        if path_prefix is not None:
            folder_prefix = path_prefix.rstrip("/") + "/"
            keep = np.fromiter(
                (p == path_prefix or p.startswith(folder_prefix) for p in self.paths), dtype=bool, count=len(self.paths)
            )
            rows = np.flatnonzero(keep)
            candidates = scores[rows]
        else:
            rows, candidates = None, scores
        limit = min(limit, len(candidates))
        if limit < 1:
            return []
        best = np.argpartition(candidates, len(candidates) - limit)[-limit:]
        best = best[np.argsort(-candidates[best], kind="stable")]
        if rows is not None:
            best = rows[best]
        return [(self.point_ids[row], float(scores[row])) for row in best]

    def score_of(self, scores: np.ndarray, point_id: str) -> float | None:
        row = self._row_of.get(point_id)
        return None if row is None else float(scores[row])
