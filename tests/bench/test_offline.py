"""Offline mode: the same workload through the in-process engine (tiny checkpoint, CPU)."""

import json

import pytest
import typer
from typer.testing import CliRunner

from selfhost.bench.dist import parse_length_dist
from selfhost.bench.tokens import TokenizerLoadError, load_token_counter
from selfhost.bench.workload import synthetic_workload
from selfhost.cli.bench import register
from selfhost.errors import InvalidParameterError


@pytest.fixture
def cli():
    app = typer.Typer()
    register(app)
    return app


@pytest.mark.parametrize("api", ["chat", "completions"])
def test_offline_run_counts_engine_tokens(cli, tiny_checkpoint, tmp_path, api):
    args = ["bench", "--offline", str(tiny_checkpoint("llama")), "--api", api, "--concurrency", "1,2",
            "--requests", "4", "--prompt-tokens", "fixed:8", "--output-tokens", "uniform:2-4",
            "--out", str(tmp_path / "o"), "--no-track"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    data = json.loads((tmp_path / "o" / "result.json").read_text())
    assert data["mode"] == "offline" and data["endpoint"]["url"] is None
    workload = synthetic_workload(4, parse_length_dist("fixed:8"), parse_length_dist("uniform:2-4"), seed=0)
    expected = sum(r.max_tokens for r in workload.requests)  # ignore_eos: every reply runs to max_tokens
    for level in data["levels"]:
        assert level["num_ok"] == 4 and level["total_output_tokens"] == expected
        assert level["tokens_source"] == "engine" and level["ttft_s"] is None
    assert data["output_tok_s"] > 0


def test_offline_rejects_request_rates(cli, tiny_checkpoint):
    args = ["bench", "--offline", "x", "--request-rate", "2", "--no-track"]
    result = CliRunner().invoke(cli, args)
    assert isinstance(result.exception, InvalidParameterError) and "r2" in str(result.exception)


def test_tokenizer_makes_exact_prompt_lengths(tiny_checkpoint, tmp_path):
    counter = load_token_counter(str(tiny_checkpoint("llama")))
    workload = synthetic_workload(5, parse_length_dist("uniform:10-40"), parse_length_dist("fixed:4"), 0, counter)
    for request in workload.requests:
        assert counter.count(request.messages[0][1]) == request.planned_prompt_tokens
    with pytest.raises(TokenizerLoadError, match="no-such"):
        load_token_counter(str(tmp_path / "no-such"))
