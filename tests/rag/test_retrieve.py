import pytest

from selfhost.errors import CollectionNotFoundError, InvalidParameterError
from selfhost.rag.retrieve import Retriever
from tests.rag.corpus import QUERIES


def _doc(hit):
    return hit.chunk.path.rsplit("/", 1)[-1].removesuffix(".txt")


@pytest.mark.parametrize("query", sorted(QUERIES))
def test_hybrid_finds_the_relevant_document_in_top_3(retriever, query):
    hits = retriever.search(query, k=3, mode="hybrid")
    assert QUERIES[query] in [_doc(h) for h in hits]


def test_modes_return_scored_hits_best_first(retriever):
    for mode in ("dense", "keyword", "hybrid"):
        hits = retriever.search("gravitational pull of the moon", k=5, mode=mode)
        assert _doc(hits[0]) == "tides"
        scores = [h.score for h in hits]
        assert scores == sorted(scores, reverse=True)
        assert all(-1.0 <= h.similarity <= 1.0 for h in hits)
    hybrid = retriever.search("gravitational pull of the moon", k=1, mode="hybrid")[0]
    assert hybrid.keyword_score is not None and hybrid.keyword_score > 0


def test_keyword_search_ignores_documents_without_shared_terms(retriever):
    assert retriever.search("zzzunknownword", k=5, mode="keyword") == []


def test_path_filter_keeps_one_file_or_folder(retriever, corpus_store):
    _, docs = corpus_store
    only = docs / "chess.txt"
    for mode in ("dense", "keyword", "hybrid"):
        hits = retriever.search("lava and magma", k=5, mode=mode, path=str(only))
        assert {h.chunk.path for h in hits} <= {str(only)}
    assert len(retriever.search("lava", k=50, mode="dense", path=str(docs))) == 30


def test_bad_arguments(retriever, corpus_store):
    with pytest.raises(InvalidParameterError, match="mode"):
        retriever.search("x", mode="sparse")
    with pytest.raises(InvalidParameterError, match="k must be"):
        retriever.search("x", k=0)
    store, _ = corpus_store
    with pytest.raises(CollectionNotFoundError, match="no collection 'nope'.*topics"):
        Retriever(store, "nope")
