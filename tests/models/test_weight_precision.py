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


@pytest.mark.parametrize("copies", [1, 3])
def test_the_real_measurement_times_both_precisions(copies):
    measured = weight_precision.measure(64, 96, threads=1, copies=copies)
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


def test_the_probe_sweeps_as_many_copies_as_the_model_streams(monkeypatch, tmp_path):
    """A decode step streams every weight once, so the probe times a product among as many copies as the
    model's linear weights fill (a power of two, capped), not one product left hot in the core's cache."""
    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    one = 4 * 64 * 128  # fp32 bytes of one copy
    assert weight_precision.copies_for(64, 128, None) == 1
    assert [weight_precision.copies_for(64, 128, n * one) for n in (1, 2, 3, 5, 8, 9)] == [1, 2, 2, 4, 8, 8]
    most = weight_precision.copies_for(64, 128, 10**15)
    assert most * one <= weight_precision.WORKING_SET_CAP < 2 * most * one
    calls = []
    monkeypatch.setattr(weight_precision, "measure", lambda *args: calls.append(args) or seconds(2.0, 1.0, 4.0, 1.0))
    choose_weight_dtype(64, 128, streamed_bytes=5 * one)
    choose_weight_dtype(64, 128, streamed_bytes=7 * one)  # the same copies: the cached answer
    choose_weight_dtype(64, 128)
    assert calls == [(64, 128, 1, 4), (64, 128, 1, 1)]


def test_auto_probes_the_loaded_models_own_bytes(monkeypatch, tmp_path):
    from selfhost import LLM
    from selfhost.layers.linear import Linear

    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    calls = []
    monkeypatch.setattr(weight_precision, "measure", lambda *args: calls.append(args) or seconds(2.0, 1.0, 4.0, 1.0))
    llm = LLM(None, kv_cache_memory="16MiB", weight_dtype="auto")
    exact = LLM(None, kv_cache_memory="16MiB", weight_dtype="float32").model
    streamed = sum(4 * m.weight.numel() for m in exact.modules() if type(m) is Linear)
    spec = exact.spec
    assert calls == [(spec.hidden_size, spec.intermediate_size, 1,
                      weight_precision.copies_for(spec.hidden_size, spec.intermediate_size, streamed))]
    assert calls[0][3] > 1 and llm.weight_precision.weight_dtype == "bfloat16"
