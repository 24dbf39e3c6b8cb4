import json
import subprocess
import sys

import pytest
import typer
from typer.testing import CliRunner

from selfhost.cli.rag import register
from selfhost.errors import CollectionNotFoundError
from tests.rag.corpus import QUERIES, write_corpus


@pytest.fixture(scope="module")
def cli(tmp_path_factory):
    """Run `selfhost rag ...` in-process against a store indexed through the CLI itself."""
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)  # keep `rag` a sub-command, as in the real app
    root = tmp_path_factory.mktemp("cli")
    docs = write_corpus(root / "docs")
    store = str(root / "store")
    runner = CliRunner()

    def run(*args):
        return runner.invoke(app, ["rag", *args, "--store", store], catch_exceptions=True)

    result = run("index", str(docs), "-c", "topics")
    assert result.exit_code == 0, result.output
    assert "30 added" in result.output
    return run, docs


def test_list_search_and_reindex(cli):
    run, docs = cli
    listed = run("list")
    assert "topics" in listed.output and "all-MiniLM-L6-v2" in listed.output
    found = run("search", "what does a seismograph measure", "-c", "topics", "-k", "2", "--json")
    assert found.exit_code == 0, found.output
    hits = [json.loads(line) for line in found.output.splitlines()]
    assert hits[0]["path"].endswith("earthquakes.txt") and len(hits) == 2
    again = run("index", str(docs), "-c", "topics")
    assert "0 added, 0 updated, 0 removed, 30 unchanged" in again.output


def test_ask_with_a_local_selfhost_model_returns_answer_and_sources(cli, tiny_checkpoint):
    run, _ = cli
    model = str(tiny_checkpoint("llama"))
    result = run("ask", "what is the event horizon", "-c", "topics", "--model", model, "--max-tokens", "8", "--json")
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output.splitlines()[-1])
    assert isinstance(payload["answer"], str)
    assert payload["sources"] and payload["sources"][0]["path"].endswith("black_holes.txt")
    assert [s["number"] for s in payload["sources"]] == list(range(1, len(payload["sources"]) + 1))


def test_eval_writes_json(cli, tmp_path):
    run, _ = cli
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"_id": doc, "text": q}) + "\n" for q, doc in QUERIES.items()))
    qrels = tmp_path / "qrels.tsv"
    qrels.write_text("query-id\tcorpus-id\tscore\n" + "".join(f"{doc}\t{doc}\t1\n" for doc in QUERIES.values()))
    out = tmp_path / "res.json"
    result = run("eval", "-c", "topics", "--queries", str(queries), "--qrels", str(qrels), "--out", str(out))
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())
    assert saved["num_queries"] == 30 and saved["results"]["hybrid"]["recall@10"] == 1.0


def test_eval_logs_run_params_and_metrics_to_mlflow(cli, tmp_path, monkeypatch):
    from mlflow import MlflowClient

    run, _ = cli
    monkeypatch.chdir(tmp_path)  # a sqlite store keeps its artifacts under ./mlruns
    queries = tmp_path / "q.jsonl"
    queries.write_text("".join(json.dumps({"_id": doc, "text": q, "relevant": [doc]}) + "\n" for q, doc in QUERIES.items()))
    out, uri = tmp_path / "res.json", f"sqlite:///{tmp_path / 'mlflow.db'}"
    result = run("eval", "-c", "topics", "--queries", str(queries), "--out", str(out), "-k", "5", "--tracking-uri", uri)
    assert result.exit_code == 0, result.output
    saved = json.loads(out.read_text())

    client = MlflowClient(tracking_uri=uri)
    [logged] = client.search_runs([client.get_experiment_by_name("selfhost-rag-eval").experiment_id])
    assert logged.info.run_id == saved["tracking"]["run_id"] and logged.info.status == "FINISHED"
    assert logged.data.tags["selfhost.kind"] == "rag-eval"
    params = logged.data.params
    assert params["collection"] == "topics" and params["embedding_model"] == "all-MiniLM-L6-v2"
    assert params["num_queries"] == "30" and params["k"] == "5" and params["num_chunks"] == "30"
    expected = {f"{mode}.{name.replace('@', '_at_')}": value
                for mode, scores in saved["results"].items() for name, value in scores.items()}
    assert set(expected) >= {"hybrid.recall_at_5", "dense.mrr_at_10", "keyword.ndcg_at_10"}
    assert logged.data.metrics == pytest.approx(expected)
    assert [a.path for a in client.list_artifacts(logged.info.run_id)] == ["res.json"]


def test_eval_without_tracking_writes_no_store(cli, tmp_path, monkeypatch):
    run, _ = cli
    monkeypatch.chdir(tmp_path)
    queries = tmp_path / "q.jsonl"
    queries.write_text(json.dumps({"_id": "tcp", "text": "three-way handshake", "relevant": ["tcp"]}) + "\n")
    result = run("eval", "-c", "topics", "--queries", str(queries), "--out", str(tmp_path / "r.json"))
    assert result.exit_code == 0, result.output
    assert "tracking" not in json.loads((tmp_path / "r.json").read_text())
    assert not (tmp_path / "mlflow.db").exists() and not (tmp_path / "mlruns").exists()


def test_unknown_collection_is_a_clear_error(cli):
    run, _ = cli
    result = run("ask", "anything", "-c", "nope")
    assert isinstance(result.exception, CollectionNotFoundError)
    assert "no collection 'nope'" in str(result.exception)
    dropped = run("drop", "nope")
    assert isinstance(dropped.exception, CollectionNotFoundError)


def test_entry_point_prints_one_line_and_exits_1(tmp_path):
    done = subprocess.run(
        [sys.executable, "-c", "from selfhost.cli.main import main; main()",
         "rag", "search", "x", "-c", "nope", "--store", str(tmp_path)],
        capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 1
    assert done.stderr.strip().startswith("error: no collection 'nope'")
    assert len(done.stderr.strip().splitlines()) == 1


def test_ask_through_an_openai_endpoint_prints_answer_and_cited_sources(cli, chat_server):
    run, _ = cli
    url, received = chat_server
    result = run("ask", "what is the event horizon", "-c", "topics", "--url", url, "--model", "m")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "From the sources [1]."
    assert "Sources" in lines
    assert any(line.startswith("*[1] ") and "black_holes.txt chunk 0" in line for line in lines)
    assert received[0][1]["model"] == "m"


def test_ask_with_nothing_relevant_says_so(cli):
    run, _ = cli
    result = run("ask", "qwxz plorf vantablim", "-c", "topics", "--min-score", "0.6")
    assert result.exit_code == 0, result.output
    assert "nothing relevant" in result.output and "Sources" not in result.output


def test_ask_with_the_embedded_demo_model(cli):
    run, _ = cli
    result = run("ask", "what is the event horizon", "-c", "topics", "--max-tokens", "12")
    assert result.exit_code == 0, result.output
    answer, _, sources = result.output.partition("\nSources\n")
    assert answer.strip()  # the demo model writes pseudo-Shakespeare, but it writes
    assert "black_holes.txt chunk 0" in sources


NOTES = {
    f"note{i}.txt": f"Note {i}: the planning meeting for project Alpha is on Tuesday at ten in room {i}. "
    "Bring the quarterly budget figures, the draft roadmap and the list of open hiring requests."
    for i in range(1, 5)
}


def test_ask_with_the_demo_model_fits_four_short_notes_into_its_window(tmp_path):
    """The default path on a fresh install: four short notes overflow the demo model's 256 tokens unfitted."""
    app = typer.Typer()
    register(app)
    app.command("noop")(lambda: None)
    docs = tmp_path / "notes"
    docs.mkdir()
    for name, text in NOTES.items():
        (docs / name).write_text(text + "\n")
    runner = CliRunner()
    store = ["--store", str(tmp_path / "store")]
    indexed = runner.invoke(app, ["rag", "index", str(docs), "-c", "notes", *store])
    assert indexed.exit_code == 0, indexed.output
    result = runner.invoke(app, ["rag", "ask", "when is the project Alpha meeting?", "-c", "notes", "-k", "4",
                                 "--max-tokens", "12", "--json", *store])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout.splitlines()[-1])
    assert isinstance(payload["answer"], str) and 1 <= len(payload["sources"]) < 4
    said = " ".join(result.stderr.split())
    assert said.startswith("note: to fit the model's 256-token context: ")
    assert f"{4 - len(payload['sources'])} of 4 sources dropped" in said
    assert payload["note"] == said.removeprefix("note: ")
