"""weight_dtype="auto": the measured choice between fp32 and bf16 weights, and its cache."""

import json

import pytest
import torch

from selfhost.models import weight_precision
from selfhost.models.weight_precision import BATCH_ROWS, choose_weight_dtype


def seconds(fp32_one, bf16_one, fp32_batch, bf16_batch):
    return {"float32@1": fp32_one, "bfloat16@1": bf16_one,
            f"float32@{BATCH_ROWS}": fp32_batch, f"bfloat16@{BATCH_ROWS}": bf16_batch}


@pytest.mark.parametrize("measured,expected", [
    (seconds(2.0, 1.0, 4.0, 1.0), "bfloat16"),   # faster at both sizes
    (seconds(2.0, 1.0, 1.0, 1.5), "float32"),    # faster decode, slower prompts: keep exact weights
    (seconds(1.0, 2.0, 4.0, 1.0), "float32"),
    (seconds(1.05, 1.0, 1.05, 1.0), "float32"),  # within the margin: a tie keeps fp32
])
def test_bf16_is_chosen_only_where_it_wins_both_sizes(monkeypatch, tmp_path, measured, expected):
    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(weight_precision, "measure", lambda *args: measured)
    choice = choose_weight_dtype(64, 128)
    assert choice.weight_dtype == expected and not choice.cached
    assert "weights " + expected in choice.describe()


def test_the_measurement_is_cached_per_cpu_and_shape(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(weight_precision, "measure", lambda *args: calls.append(args) or seconds(2.0, 1.0, 4.0, 1.0))
    first, again, other = choose_weight_dtype(64, 128), choose_weight_dtype(64, 128), choose_weight_dtype(64, 256)
    assert (first.cached, again.cached, other.cached) == (False, True, False)
    assert len(calls) == 2 and first.seconds == again.seconds
    entries = json.loads((tmp_path / "weight_precision.json").read_text())
    assert len(entries) == 2 and all("64x128" in k or "64x256" in k for k in entries)


def test_a_damaged_cache_is_measured_again(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    (tmp_path / "weight_precision.json").write_text("{not json")
    monkeypatch.setattr(weight_precision, "measure", lambda *args: seconds(1.0, 2.0, 1.0, 2.0))
    assert choose_weight_dtype(64, 128).weight_dtype == "float32"
    assert json.loads((tmp_path / "weight_precision.json").read_text())  # rewritten whole


def test_the_real_measurement_times_both_precisions():
    measured = weight_precision.measure(64, 96, threads=1)
    assert set(measured) == set(seconds(1, 1, 1, 1)) and all(v > 0 for v in measured.values())


def test_auto_loads_what_it_chose_and_reports_it():
    from selfhost import LLM

    llm = LLM(None, kv_cache_memory="64MiB", weight_dtype="auto")
    choice = llm.weight_precision
    assert choice is not None
    stats = llm.engine.stats()
    assert stats.weight_dtype == choice.weight_dtype
    assert stats.kv_cache_dtype == choice.weight_dtype  # "auto" cache follows the weights
    assert stats.linear_kernels.startswith("bf16" if choice.weight_dtype == "bfloat16" else "fp32")
    exact = LLM(None, kv_cache_memory="64MiB", weight_dtype="float32")
    assert exact.weight_precision is None and exact.engine.stats().weight_dtype == "float32"
    assert exact.engine.cache.k.dtype == torch.float32


def test_auto_leaves_models_without_the_option_as_they_are(tiny_checkpoint):
    from selfhost import LLM

    llm = LLM(str(tiny_checkpoint("llama")), kv_cache_memory="16MiB", weight_dtype="auto", quantization="int8")
    assert llm.weight_precision is None and llm.engine.stats().weight_dtype == "int8"
