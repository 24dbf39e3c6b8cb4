"""`serve --speculative`: the same completions over HTTP, and the acceptance figures in /metrics and /stats."""

from __future__ import annotations

import httpx
import pytest

from selfhost import LLM, SamplingParams
from selfhost.server.settings import ServerSettings
from tests.server.conftest import MODEL, LoopbackServer
from tests.speculative.conftest import always


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return str(tiny_checkpoint("llama"))


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory):
    settings = ServerSettings(models=[f"{MODEL}={checkpoint}"], kv_cache_memory="16MiB", weight_dtype="float32",
                              speculative="ngram", num_speculative_tokens=5,
                              rag_store=tmp_path_factory.mktemp("rag"),
                              responses_db=tmp_path_factory.mktemp("responses") / "responses.db")
    srv = LoopbackServer(settings).start()
    yield srv
    srv.stop()


def test_completions_match_the_plain_engine_and_metrics_report_acceptance(server, checkpoint):
    always(server.app.state.models.models[MODEL].llm)  # speculation happens whatever this machine's speed
    prompt = [5, 6, 7, 8, 5, 6, 7, 8, 5, 6, 7, 8, 5, 6]
    want = LLM(checkpoint).generate([prompt], SamplingParams(max_tokens=48, temperature=0, ignore_eos=True))[0]
    with httpx.Client(base_url=server.url, timeout=60) as http:
        body = http.post("/v1/completions", json={"model": MODEL, "prompt": prompt, "max_tokens": 48,
                                                  "temperature": 0, "ignore_eos": True}).json()
        assert body["choices"][0]["text"] == want.text
        stats = http.get("/stats").json()["models"][MODEL]
        assert stats["speculative"] == "ngram" and 0 < stats["spec_acceptance_rate"] <= 1
        assert stats["spec_mean_accepted_length"] > 1
        metrics = http.get("/metrics").text
    engine = server.engine_stats()
    assert f'selfhost_spec_decode_num_accepted_tokens_total{{model="{MODEL}"}} {float(engine.spec_accepted_tokens)}' \
        in metrics
    assert "selfhost_spec_decode_acceptance_rate" in metrics and "selfhost_spec_decode_mean_accepted_length" in metrics


def test_a_bad_speculative_setting_is_one_clear_line(checkpoint):
    import subprocess
    import sys

    def run(*args):
        return subprocess.run([sys.executable, "-m", "selfhost.cli", "run", checkpoint, *args], capture_output=True,
                              text=True, timeout=120)

    bad = run("hello", "--speculative", "medusa", "-n", "4")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines()[-1] == "error: speculative='medusa': choose 'ngram' or 'draft:PATH'"
    bad = run("hello", "--speculative", "ngram", "--num-speculative-tokens", "0", "-n", "4")
    assert bad.returncode == 1 and "num_speculative_tokens=0" in bad.stderr and "Traceback" not in bad.stderr
    good = run("to be or not to be, to be or not", "--speculative", "ngram", "-n", "8", "--temperature", "0")
    assert good.returncode == 0, good.stderr
