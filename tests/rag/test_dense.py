"""The in-memory dense index gives the same results as Qdrant's own search, and follows ingest."""

import numpy as np
import pytest

from selfhost.rag.dense import DenseIndex
from selfhost.rag.ingest import ingest
from selfhost.rag.retrieve import MODES, Retriever
from selfhost.rag.store import VectorStore
from tests.rag.corpus import QUERIES, write_corpus


@pytest.fixture(scope="module")
def both(corpus_store, embedder):
    store, docs = corpus_store
    return Retriever(store, "topics", embedder), Retriever(store, "topics", embedder, in_memory=False), docs


@pytest.mark.parametrize("mode", MODES)
def test_results_equal_qdrant_search(both, mode):
    in_memory, qdrant, docs = both
    assert in_memory.dense is not None and qdrant.dense is None
    for query in QUERIES:
        for path in (None, str(docs / "tides.txt"), str(docs)):
            ours = in_memory.search(query, k=10, mode=mode, path=path)
            theirs = qdrant.search(query, k=10, mode=mode, path=path)
            assert [h.point_id for h in ours] == [h.point_id for h in theirs], (query, path)
            assert [h.chunk for h in ours] == [h.chunk for h in theirs]
            np.testing.assert_allclose([h.score for h in ours], [h.score for h in theirs], atol=1e-6)
            np.testing.assert_allclose([h.similarity for h in ours], [h.similarity for h in theirs], atol=1e-6)
            assert [h.keyword_score for h in ours] == [h.keyword_score for h in theirs]


def test_top_is_exact_against_a_full_sort():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((500, 16), dtype=np.float32)
    paths = [f"/docs/{'a' if i % 3 else 'b'}/{i}.txt" for i in range(500)]
    index = DenseIndex([f"id{i}" for i in range(500)], paths, vectors)
    query = rng.standard_normal(16, dtype=np.float32)
    scores = index.scores(query)
    np.testing.assert_allclose(scores, vectors.astype(np.float64) @ query, rtol=1e-5, atol=1e-5)
    assert [pid for pid, _ in index.top(scores, 7)] == [f"id{i}" for i in np.argsort(-scores)[:7]]
    in_b = [i for i in np.argsort(-scores) if paths[i].startswith("/docs/b/")][:5]
    assert [pid for pid, _ in index.top(scores, 5, "/docs/b")] == [f"id{i}" for i in in_b]
    assert index.top(scores, 3, "/elsewhere") == []
    assert len(index.top(scores, 10_000)) == 500


def test_ingest_keeps_the_saved_matrix_in_step(tmp_path, embedder, monkeypatch):
    docs = write_corpus(tmp_path / "docs")
    with VectorStore(tmp_path / "store") as store:
        ingest([docs], store, "c", embedder)
        (docs / "tides.txt").write_text("Tides rise and fall with the moon.\n")
        (docs / "volcanoes.txt").unlink()
        (docs / "kites.txt").write_text("Kites fly on a string in steady wind.\n")
        with monkeypatch.context() as patch:  # the saved matrix is updated, not scrolled back out of Qdrant
            patch.setattr(DenseIndex, "build", lambda *a: pytest.fail("rebuilt from the store"))
            ingest([docs], store, "c", embedder)
        saved = DenseIndex.load(store.side_dir("c"))
        in_store = {pid: chunk for pid, chunk in store.chunks("c")}
        assert sorted(saved.point_ids) == sorted(in_store)
        rows = {pid: row for row, pid in enumerate(saved.point_ids)}
        for pid, (chunk, vector) in store.get("c", list(in_store)).items():
            np.testing.assert_array_equal(saved.vectors[rows[pid]], vector)
            assert saved.paths[rows[pid]] == chunk.path
        hits = Retriever(store, "c", embedder).search("paper toy on a string in the wind", k=1)
        assert hits[0].chunk.path.endswith("kites.txt")


def test_a_missing_or_stale_matrix_is_rebuilt(tmp_path, embedder):
    docs = write_corpus(tmp_path / "docs")
    with VectorStore(tmp_path / "store") as store:
        ingest([docs], store, "c", embedder)
        side = store.side_dir("c")
        DenseIndex.invalidate(side)
        assert DenseIndex.load(side) is None
        assert Retriever(store, "c", embedder).dense.num_chunks == store.count("c")
        assert DenseIndex.load(side).num_chunks == store.count("c")
        DenseIndex(["stale"], ["/x"], np.zeros((1, 384), dtype=np.float32)).save(side)
        assert Retriever(store, "c", embedder).dense.num_chunks == store.count("c")


def test_a_server_store_keeps_qdrant_search(corpus_store, embedder):
    store, _ = corpus_store
    store.is_embedded = False  # what VectorStore(url=...) sets
    try:
        with pytest.raises(ValueError, match="embedded store"):
            Retriever(store, "topics", embedder, in_memory=True)
        assert Retriever(store, "topics", embedder).dense is None
    finally:
        store.is_embedded = True
