"""Retrieval quality of a collection: recall@k, MRR@10 and nDCG@10 per search mode.

Judgements are about documents, as in BEIR and TREC: a retrieved chunk counts
for the document it came from, whose id is the file name without its suffix
(index a BEIR corpus as one `<doc-id>.txt` per document). Chunk rankings are
collapsed to document rankings by first appearance.

Accepted inputs:
- queries JSONL, one object per line with an id (`_id`, `id` or `query_id`),
  a text (`text` or `query`) and optionally inline judgements (`relevant`: a
  list of doc ids or an object doc id -> grade);
- or, with a separate qrels file: BEIR TSV (`query-id  corpus-id  score`, header
  optional) or TREC (`qid 0 docid grade`).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from selfhost.errors import InvalidParameterError
from selfhost.rag.retrieve import MODES, Retriever

Qrels = dict[str, dict[str, int]]  # query id -> doc id -> grade (> 0 is relevant)


@dataclass(frozen=True)
class EvalSet:
    queries: dict[str, str]  # query id -> text
    qrels: Qrels


def _first(record: dict, keys: tuple[str, ...], line_no: int, source: Path) -> str:
    for key in keys:
        if key in record:
            return str(record[key])
    raise InvalidParameterError(f"{source}:{line_no}: expected one of {', '.join(keys)} in {sorted(record)}")


def read_qrels(path: Path) -> Qrels:
    qrels: Qrels = {}
    for line_no, line in enumerate(path.read_text().splitlines(), start=1):
        fields = line.split()
        if not fields or (line_no == 1 and len(fields) == 3 and not fields[-1].lstrip("-").isdigit()):
            continue  # blank line or BEIR header (query-id corpus-id score)
        if len(fields) == 3:
            query_id, doc_id, grade = fields
        elif len(fields) == 4:
            query_id, _, doc_id, grade = fields
        else:
            raise InvalidParameterError(
                f"{path}:{line_no}: expected 3 (BEIR) or 4 (TREC) columns, got {len(fields)}: {line!r}"
            )
        qrels.setdefault(query_id, {})[doc_id] = int(grade)
    return qrels


def read_eval_set(queries_path: Path, qrels_path: Path | None = None) -> EvalSet:
    if not queries_path.is_file():
        raise InvalidParameterError(f"queries file {queries_path} does not exist")
    queries: dict[str, str] = {}
    inline: Qrels = {}
    for line_no, line in enumerate(queries_path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise InvalidParameterError(f"{queries_path}:{line_no}: not JSON ({err.msg})") from err
        query_id = _first(record, ("_id", "id", "query_id"), line_no, queries_path)
        queries[query_id] = _first(record, ("text", "query"), line_no, queries_path)
        relevant = record.get("relevant")
        if isinstance(relevant, list):
            inline[query_id] = {str(doc): 1 for doc in relevant}
        elif isinstance(relevant, dict):
            inline[query_id] = {str(doc): int(grade) for doc, grade in relevant.items()}
    qrels = read_qrels(qrels_path) if qrels_path is not None else inline
    judged = {q: docs for q, docs in qrels.items() if q in queries and any(g > 0 for g in docs.values())}
    if not judged:
        raise InvalidParameterError(
            f"no query in {queries_path} has a relevance judgement"
            + (f" in {qrels_path}" if qrels_path else "; add `relevant` or pass --qrels")
        )
    return EvalSet({q: queries[q] for q in judged}, judged)


def recall_at(ranking: list[str], relevant: dict[str, int], k: int) -> float:
    wanted = {d for d, g in relevant.items() if g > 0}
    return len(wanted.intersection(ranking[:k])) / len(wanted)


def mrr_at(ranking: list[str], relevant: dict[str, int], k: int = 10) -> float:
    for rank, doc in enumerate(ranking[:k], start=1):
        if relevant.get(doc, 0) > 0:
            return 1.0 / rank
    return 0.0


def ndcg_at(ranking: list[str], relevant: dict[str, int], k: int = 10) -> float:
    """Linear gain (grade / log2(rank + 1)), as pytrec_eval computes it for BEIR."""
    dcg = sum(relevant.get(doc, 0) / math.log2(rank + 1) for rank, doc in enumerate(ranking[:k], start=1))
    ideal = sorted((g for g in relevant.values() if g > 0), reverse=True)[:k]
    idcg = sum(g / math.log2(rank + 1) for rank, g in enumerate(ideal, start=1))
    return dcg / idcg if idcg else 0.0


def doc_id_of(path: str) -> str:
    return Path(path).stem


def evaluate(
    retriever: Retriever,
    eval_set: EvalSet,
    k: int = 10,
    modes: tuple[str, ...] = MODES,
    on_query: Callable[[], None] | None = None,
) -> dict[str, dict[str, float]]:
    """mode -> {f"recall@{k}", "mrr@10", "ndcg@10"}, averaged over judged queries."""
    depth = max(k, 10)
    totals = {mode: {f"recall@{k}": 0.0, "mrr@10": 0.0, "ndcg@10": 0.0} for mode in modes}
    for query_id, text in eval_set.queries.items():
        relevant = eval_set.qrels[query_id]
        for mode in modes:
            # Several chunks may come from one document; fetch extra so `depth` documents remain.
            hits = retriever.search(text, k=depth * 3, mode=mode)
            ranking: list[str] = []
            for hit in hits:
                doc = doc_id_of(hit.chunk.path)
                if doc not in ranking:
                    ranking.append(doc)
            scores = totals[mode]
            scores[f"recall@{k}"] += recall_at(ranking, relevant, k)
            scores["mrr@10"] += mrr_at(ranking, relevant)
            scores["ndcg@10"] += ndcg_at(ranking, relevant)
        if on_query is not None:
            on_query()
    n = len(eval_set.queries)
    return {mode: {name: value / n for name, value in scores.items()} for mode, scores in totals.items()}
