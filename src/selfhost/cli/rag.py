"""`selfhost rag`: index documents, search them, and answer from them with citations."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import typer
from selfhost.cli.console import make_console
from rich.table import Table
from rich.text import Text

rag_app = typer.Typer(
    help="Ground answers in your own documents: index, search, ask, evaluate.",
    no_args_is_help=True,
)
console = make_console()

# Options shared by every command that opens the vector store.
StoreOpt = typer.Option(
    None, "--store", help="Folder of the embedded vector database [default: $SELFHOST_RAG_DIR or ~/.local/share/selfhost/rag]."
)
VectorUrlOpt = typer.Option(None, "--vector-url", help="A Qdrant server URL instead of the embedded database.")
CollectionOpt = typer.Option("default", "--collection", "-c", help="Collection name.")


def _open_store(store: Optional[Path], vector_url: Optional[str]):
    from selfhost.rag.store import VectorStore

    return VectorStore(path=store, url=vector_url, api_key=os.environ.get("QDRANT_API_KEY"))


def _quiet_transformers() -> None:
    # Weight-loading bars from transformers would interleave with ours; its warning that a
    # prompt is over the window fires while `rag ask` measures one to fit it.
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def _display_path(path: str) -> str:
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


@rag_app.command("index")
def index(
    paths: list[Path] = typer.Argument(..., help="Files or folders (.txt .md .html .pdf ...)."),
    collection: str = CollectionOpt,
    embedding_model: Optional[str] = typer.Option(
        None, "--embedding-model", help="Sentence-transformers / HF id or folder [default: all-MiniLM-L6-v2]."
    ),
    chunk_tokens: Optional[int] = typer.Option(None, help="Tokens per chunk (new collections only) [default: 200]."),
    overlap_tokens: Optional[int] = typer.Option(None, help="Tokens shared by consecutive chunks [default: 40]."),
    batch_size: int = typer.Option(32, help="Texts per embedding batch."),
    store: Optional[Path] = StoreOpt,
    vector_url: Optional[str] = VectorUrlOpt,
) -> None:
    """Index files into a collection; re-runs only touch what changed."""
    from selfhost.rag.chunk import ChunkConfig
    from selfhost.rag.embed import Embedder
    from selfhost.rag.ingest import ingest

    _quiet_transformers()
    with _open_store(store, vector_url) as vector_store:
        if embedding_model is None and vector_store.has_collection(collection):
            embedding_model = vector_store.info(collection).embedding_model
        chunking = None
        if chunk_tokens is not None or overlap_tokens is not None:
            chunking = ChunkConfig(
                max_tokens=chunk_tokens or ChunkConfig.max_tokens, overlap_tokens=overlap_tokens or ChunkConfig.overlap_tokens
            )
        embedder = Embedder(embedding_model, batch_size=batch_size)
        report = ingest(paths, vector_store, collection, embedder, chunking, show_progress=True)
    console.print(
        f"[bold]{collection}[/]: {len(report.added)} added, {len(report.updated)} updated, "
        f"{len(report.removed)} removed, {report.unchanged} unchanged; {report.num_chunks_written} chunks embedded, "
        f"{report.num_chunks_total} in collection ({report.seconds:.1f} s)"
    )
    for path in report.empty:
        console.print(f"[yellow]no text extracted from[/] {_display_path(path)}")


@rag_app.command("list")
def list_collections(store: Optional[Path] = StoreOpt, vector_url: Optional[str] = VectorUrlOpt) -> None:
    """Collections with their size and embedding model."""
    with _open_store(store, vector_url) as vector_store:
        infos = vector_store.collections()
        location = vector_store.location
    if not infos:
        console.print(f"no collections in {location}")
        return
    table = Table("collection", "chunks", "embedding model", "dim", title=location)
    for info in infos:
        table.add_row(info.name, str(info.num_chunks), info.embedding_model, str(info.dim))
    console.print(table)


@rag_app.command("drop")
def drop(
    collection: str = typer.Argument(..., help="Collection to delete."),
    store: Optional[Path] = StoreOpt,
    vector_url: Optional[str] = VectorUrlOpt,
) -> None:
    """Delete a collection and its keyword index."""
    with _open_store(store, vector_url) as vector_store:
        vector_store.drop(collection)
    console.print(f"dropped {collection}")


@rag_app.command("search")
def search(
    query: str = typer.Argument(...),
    collection: str = CollectionOpt,
    k: int = typer.Option(10, "-k", help="How many chunks."),
    mode: str = typer.Option("hybrid", help="dense, keyword or hybrid."),
    path: Optional[str] = typer.Option(None, help="Only this file or folder."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON lines instead of a table."),
    store: Optional[Path] = StoreOpt,
    vector_url: Optional[str] = VectorUrlOpt,
) -> None:
    """Top-k chunks for a query, with scores."""
    from selfhost.rag.retrieve import Retriever

    _quiet_transformers()
    with _open_store(store, vector_url) as vector_store:
        hits = Retriever(vector_store, collection).search(query, k=k, mode=mode, path=path)
    if as_json:
        for hit in hits:
            record = {
                "path": hit.chunk.path, "chunk": hit.chunk.chunk_index, "score": hit.score,
                "similarity": hit.similarity, "bm25": hit.keyword_score, "text": hit.chunk.text,
            }
            print(json.dumps(record))
        return
    table = Table("#", "score", "cos", "source", "text")
    for rank, hit in enumerate(hits, start=1):
        snippet = " ".join(hit.chunk.text.split())[:100]
        source = f"{_display_path(hit.chunk.path)} #{hit.chunk.chunk_index}"
        # Document text may contain [brackets] that rich would read as markup.
        table.add_row(str(rank), f"{hit.score:.4f}", f"{hit.similarity:.3f}", Text(source), Text(snippet))
    console.print(table)


@rag_app.command("ask")
def ask(
    question: str = typer.Argument(...),
    collection: str = CollectionOpt,
    model: Optional[str] = typer.Option(
        None, "--model", help="selfhost model to generate with; with --url, the model name sent to the server."
    ),
    url: Optional[str] = typer.Option(None, "--url", help="OpenAI-compatible endpoint, e.g. http://localhost:8000/v1."),
    k: int = typer.Option(5, "-k", help="Chunks to retrieve."),
    min_score: Optional[float] = typer.Option(None, help="Cosine below which a chunk is not relevant [default: 0.25]."),
    max_tokens: int = typer.Option(256, help="Answer length limit."),
    path: Optional[str] = typer.Option(None, help="Only search this file or folder."),
    as_json: bool = typer.Option(False, "--json", help="Print the answer and sources as JSON."),
    store: Optional[Path] = StoreOpt,
    vector_url: Optional[str] = VectorUrlOpt,
) -> None:
    """Answer a question from a collection, citing numbered sources."""
    from selfhost.rag.answer import DEFAULT_MIN_SIMILARITY, LocalGenerator, answer_question, http_generator
    from selfhost.rag.retrieve import Retriever

    _quiet_transformers()
    with _open_store(store, vector_url) as vector_store:
        retriever = Retriever(vector_store, collection)  # fails fast on an unknown collection
        budget = None  # a remote endpoint's window is unknown: its prompt goes as it is
        if url is not None:
            generate = http_generator(url, model, os.environ.get("OPENAI_API_KEY"), max_tokens)
        else:
            generate = LocalGenerator(model, max_tokens)  # loads the model only if something is relevant
            budget = generate.budget
        threshold = DEFAULT_MIN_SIMILARITY if min_score is None else min_score
        result = answer_question(question, retriever, generate, k=k, min_similarity=threshold, path=path,
                                 budget=budget)
    if result.note is not None:
        typer.echo(f"note: {result.note}", err=True)
    if as_json:
        sources = [
            {"number": s.number, "path": s.path, "chunk": s.chunk_index, "similarity": s.similarity, "text": s.text}
            for s in result.sources
        ]
        print(json.dumps({"answer": result.text, "sources": sources, "cited": result.cited, "note": result.note}))
        return
    console.print(result.text, highlight=False, markup=False)
    if result.sources:
        console.print("\nSources", style="bold")
        for source in result.sources:
            mark = "*" if source.number in result.cited else " "
            console.print(
                f"{mark}[{source.number}] {_display_path(source.path)} chunk {source.chunk_index} "
                f"(cos {source.similarity:.2f})",
                highlight=False,
                markup=False,
            )


@rag_app.command("eval")
def eval_retrieval(
    collection: str = CollectionOpt,
    queries: Path = typer.Option(..., "--queries", help="Queries JSONL (BEIR style), optionally with `relevant`."),
    qrels: Optional[Path] = typer.Option(None, "--qrels", help="Judgements TSV (BEIR) or TREC qrels."),
    k: int = typer.Option(10, "-k", help="Cut-off for recall@k."),
    out: Path = typer.Option(Path("rag-eval.json"), "--out", help="Where to write the JSON results."),
    store: Optional[Path] = StoreOpt,
    vector_url: Optional[str] = VectorUrlOpt,
    track: bool = typer.Option(False, "--track", help="Log the run to MLflow (params, metrics, the JSON file)."),
    tracking_uri: Optional[str] = typer.Option(
        None, "--tracking-uri", help="MLflow store (implies --track): sqlite:///file.db or http://host:5000 "
        "[default: sqlite:///mlflow.db, as selfhost bench]."
    ),
    experiment: str = typer.Option("selfhost-rag-eval", "--experiment", help="MLflow experiment name."),
) -> None:
    """recall@k, MRR@10 and nDCG@10 for dense, keyword and hybrid search."""
    from rich.progress import Progress

    from selfhost.rag.evaluate import evaluate, read_eval_set
    from selfhost.rag.retrieve import Retriever

    _quiet_transformers()
    eval_set = read_eval_set(queries, qrels)
    with _open_store(store, vector_url) as vector_store:
        retriever = Retriever(vector_store, collection)
        tracked = None
        if track or tracking_uri is not None:
            from selfhost.rag.tracking import DEFAULT_TRACKING_URI, start_eval_run

            info = vector_store.info(collection)
            tracked = start_eval_run(tracking_uri or DEFAULT_TRACKING_URI, experiment, {
                "collection": collection, "store": vector_store.location, "embedding_model": info.embedding_model,
                "num_chunks": info.num_chunks, "queries": str(queries), "qrels": str(qrels) if qrels else None,
                "num_queries": len(eval_set.queries), "k": k,
            })
        try:
            with Progress(transient=True) as progress:
                task = progress.add_task("evaluating", total=len(eval_set.queries))
                results = evaluate(retriever, eval_set, k=k, on_query=lambda: progress.advance(task))
        except BaseException:
            if tracked is not None:
                tracked.fail()
            raise
    table = Table("mode", *next(iter(results.values())).keys(), title=f"{collection}: {len(eval_set.queries)} queries")
    for mode, scores in results.items():
        table.add_row(mode, *(f"{v:.3f}" for v in scores.values()))
    console.print(table)
    record = {"collection": collection, "num_queries": len(eval_set.queries), "results": results}
    if tracked is not None:
        record["tracking"] = tracked.describe()
    out.write_text(json.dumps(record, indent=2))
    console.print(f"wrote {out}")
    if tracked is not None:
        from selfhost.rag.tracking import finish_eval_run

        finish_eval_run(tracked, results, out)
        console.print(f"MLflow run {tracked.run_id} in {tracked.client.tracking_uri} (experiment {experiment})")


def register(app: typer.Typer) -> None:
    app.add_typer(rag_app, name="rag")
