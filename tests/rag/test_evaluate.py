import json

import pytest

from selfhost.errors import InvalidParameterError
from selfhost.rag.evaluate import evaluate, mrr_at, ndcg_at, read_eval_set, read_qrels, recall_at
from tests.rag.corpus import QUERIES


def test_metrics_on_a_hand_computed_ranking():
    ranking = ["a", "b", "c", "d"]
    relevant = {"b": 1, "d": 1, "z": 1}
    assert recall_at(ranking, relevant, 2) == pytest.approx(1 / 3)
    assert mrr_at(ranking, relevant) == pytest.approx(1 / 2)
    dcg = 1 / 1.5849625 + 1 / 2.3219281  # ranks 2 and 4
    idcg = 1 + 1 / 1.5849625 + 1 / 2
    assert ndcg_at(ranking, relevant) == pytest.approx(dcg / idcg, rel=1e-6)
    assert ndcg_at(["x"], {"x": 2}) == pytest.approx(1.0)


def test_qrels_beir_tsv_and_trec(tmp_path):
    beir = tmp_path / "test.tsv"
    beir.write_text("query-id\tcorpus-id\tscore\nq1\tdoc1\t1\nq1\tdoc2\t2\n")
    trec = tmp_path / "qrels.txt"
    trec.write_text("q1 0 doc1 1\nq2 0 doc3 0\n")
    assert read_qrels(beir) == {"q1": {"doc1": 1, "doc2": 2}}
    assert read_qrels(trec) == {"q1": {"doc1": 1}, "q2": {"doc3": 0}}
    bad = tmp_path / "bad.tsv"
    bad.write_text("q1 doc1\n")
    with pytest.raises(InvalidParameterError, match="3 \\(BEIR\\) or 4 \\(TREC\\)"):
        read_qrels(bad)


def test_queries_with_inline_judgements_and_errors(tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text('{"_id": "1", "text": "a", "relevant": ["d1"]}\n{"id": "2", "query": "b"}\n')
    eval_set = read_eval_set(queries)
    assert eval_set.queries == {"1": "a"} and eval_set.qrels == {"1": {"d1": 1}}
    queries.write_text('{"_id": "1"}\n')
    with pytest.raises(InvalidParameterError, match="text, query"):
        read_eval_set(queries)


def test_evaluate_all_modes_on_the_topic_corpus(retriever, tmp_path):
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"_id": str(i), "text": q, "relevant": [doc]}) + "\n" for i, (q, doc) in enumerate(QUERIES.items())))
    results = evaluate(retriever, read_eval_set(queries), k=3)
    assert set(results) == {"dense", "keyword", "hybrid"}
    assert results["hybrid"]["recall@3"] == 1.0
    assert results["hybrid"]["ndcg@10"] > 0.8
    assert all(0.0 <= v <= 1.0 for scores in results.values() for v in scores.values())
