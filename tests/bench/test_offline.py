"""Offline mode: the workload through the in-process AsyncEngine, timed token by token (demo model, CPU)."""

import json

import pytest
import typer
from typer.testing import CliRunner

from selfhost.bench.dist import parse_length_dist
from selfhost.bench.tokens import TokenizerLoadError, load_token_counter
from selfhost.bench.workload import synthetic_workload
from selfhost.cli.bench import BenchFailedError, register
from selfhost.hub import EMBEDDED_MODEL_DIR, EMBEDDED_MODEL_NAME
from selfhost.tokenizer import Tokenizer


@pytest.fixture
def cli():
    app = typer.Typer()
    register(app)
    return app


def run_offline(cli, out, *args):
    result = CliRunner().invoke(cli, ["bench", "--offline", EMBEDDED_MODEL_NAME, "--out", str(out), "--no-track", *args])
    assert result.exit_code == 0, result.output + repr(result.exception)
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    return json.loads((out / "result.json").read_text()), records


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_offline_times_every_token_and_counts_exactly(cli, tmp_path, api):
    data, records = run_offline(cli, tmp_path / "o", "--api", api, "--concurrency", "1,3", "--requests", "6",
                                "--prompt-tokens", "fixed:12", "--output-tokens", "uniform:3-8")
    assert data["mode"] == "offline" and data["endpoint"]["url"] is None
    workload = synthetic_workload(6, parse_length_dist("fixed:12"), parse_length_dist("uniform:3-8"), 0, num_levels=2)
    tokenizer = Tokenizer(EMBEDDED_MODEL_DIR)
    levels = {"c1": 0, "c3": 1}
    assert len(records) == 12
    for record in records:
        request = workload.per_level[levels[record["level"]]][record["index"]]
        if api == "chat":  # what /v1/chat/completions would count: the chat template applied
            expected_prompt = len(tokenizer.encode_chat(request.chat_messages()))
        else:
            expected_prompt = len(tokenizer.encode(request.prompt_text()))
        assert record["prompt_tokens"] == expected_prompt
        assert record["output_tokens"] == request.max_tokens  # ignore_eos: every reply runs to max_tokens
        # One text-carrying delta per engine step, so one gap per token after the first.
        assert len(record["itl_s"]) == record["output_tokens"] - 1
        assert 0 < record["ttft_s"] <= record["ttft_s"] + sum(record["itl_s"]) <= record["e2e_s"]
        assert record["tpot_s"] == pytest.approx((record["e2e_s"] - record["ttft_s"]) / (record["output_tokens"] - 1))
    for level, concurrency in zip(data["levels"], (1, 3)):
        assert level["num_ok"] == 6 and level["tokens_source"] == "engine"
        assert level["max_in_flight"] == concurrency
        assert level["total_output_tokens"] == sum(r.max_tokens for r in workload.requests)
        for metric in ("ttft_s", "tpot_s", "itl_s", "e2e_s"):
            assert level[metric]["count"] > 0 and level[metric]["p50"] > 0


def test_offline_replays_request_rates(cli, tmp_path):
    data, records = run_offline(cli, tmp_path / "o", "--request-rate", "20,40", "--concurrency", "2",
                                "--requests", "5", "--prompt-tokens", "fixed:8", "--output-tokens", "fixed:3")
    assert [level["label"] for level in data["levels"]] == ["r20", "r40"]
    for level in data["levels"]:
        assert level["num_ok"] == 5 and level["request_rate"] in (20, 40)
        assert level["max_in_flight"] <= 2  # the cap holds offline too


def test_requests_the_engine_refuses_are_counted_not_fatal(cli, tmp_path):
    # The demo model's context is 256 tokens: a server would answer 400, the engine raises.
    out = tmp_path / "o"
    result = CliRunner().invoke(cli, ["bench", "--offline", EMBEDDED_MODEL_NAME, "--out", str(out), "--no-track",
                                      "--concurrency", "2", "--requests", "3", "--prompt-tokens", "fixed:300",
                                      "--output-tokens", "fixed:2"])
    # Every request failed: the run still writes its files and says why, then exits non-zero.
    assert isinstance(result.exception, BenchFailedError), result.output + repr(result.exception)
    assert "c2: 3 of 3 requests failed:" in result.output and "warning: prompts (fixed:300)" in result.output
    data = json.loads((out / "result.json").read_text())
    records = [json.loads(line) for line in (out / "requests.jsonl").read_text().splitlines()]
    level = data["levels"][0]
    assert level["num_ok"] == 0 and level["errors"]["engine"] == 3
    assert all("context" in record["error_detail"] for record in records)
    assert data["output_tok_s"] is None


def test_tokenizer_makes_exact_prompt_lengths(tiny_checkpoint, tmp_path):
    counter = load_token_counter(str(tiny_checkpoint("llama")))
    workload = synthetic_workload(5, parse_length_dist("uniform:10-40"), parse_length_dist("fixed:4"), 0, counter)
    for request in workload.requests:
        assert counter.count(request.messages[0][1]) == request.planned_prompt_tokens
    with pytest.raises(TokenizerLoadError, match="no-such"):
        load_token_counter(str(tmp_path / "no-such"))
