"""fit's predictions against a real selfhost run of the demo model (memory only: speed
depends on machine load and belongs to benchmarks/fit_calibration.py)."""

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from selfhost.bench.device_probe import local_cpu_device
from selfhost.bench.fit_calibration import (
    checkpoint_precision,
    measure_in_subprocess,
    model_from_checkpoint,
    predict,
)
from selfhost.catalog import get_device
from selfhost.catalog.hf_config import architecture_from_config
from selfhost.plan import speed as speed_module
from selfhost.plan.memory import memory_breakdown
from selfhost.plan.precision import get_precision
from selfhost.plan.speed import estimate_speed

DEMO = Path(__file__).resolve().parents[2] / "src/selfhost/assets/shakespeare"


def test_architecture_from_config_counts_the_checkpoints_weights():
    arch = architecture_from_config(json.loads((DEMO / "config.json").read_text()))
    assert (arch.layers, arch.hidden, arch.heads, arch.head_dim, arch.tied_embeddings) == (5, 160, 5, 32, True)
    with safe_open(str(DEMO / "model.safetensors"), framework="pt") as f:
        stored = sum(f.get_slice(name).get_shape()[0] * (f.get_slice(name).get_shape() + [1])[1] for name in f.keys())
    # The planner leaves norms out: 11 vectors of 160 here.
    assert arch.total_params() == stored - 11 * 160


def test_demo_model_memory_prediction_is_within_15_percent_of_measured_peak():
    context, new_tokens = 128, 16
    run = measure_in_subprocess(DEMO, context, new_tokens, rounds=0)
    report, _ = predict(DEMO, get_device("x86-desktop"), context, new_tokens)
    assert run.timing is None
    assert run.runtime_bytes < run.peak_bytes
    assert report.memory.total_bytes == pytest.approx(run.peak_bytes, rel=0.15)


def test_quantized_weights_run_under_fp32_activations_on_a_cpu():
    model, int8 = model_from_checkpoint(DEMO), get_precision("int8")
    cpu, gpu = get_device("x86-desktop"), get_device("rtx4090")
    kv_elements = 2 * 5 * 5 * 32 * 100  # K and V x layers x kv heads x head dim x tokens
    assert memory_breakdown(model, cpu, int8, 100, 1).kv_cache_bytes == kv_elements * 4
    assert memory_breakdown(model, gpu, int8, 100, 1).kv_cache_bytes == kv_elements * 2
    assert checkpoint_precision(DEMO).name == "fp32"


def test_a_tiny_model_is_bound_by_per_step_overhead_not_bandwidth(monkeypatch):
    model, fp32 = model_from_checkpoint(DEMO), get_precision("fp32")
    # The 10 MB model sits in a 32 MiB cache: read from there, its weights cost less than the overhead.
    device = local_cpu_device(copy_gb_s=30.0, fp32_gemv_gb_s=30.0, int8_gemv_gb_s=None, fp32_tflops=0.5,
                              cache_bytes=32 * 2**20, cached_gemv_gb_s=75.0)
    speed = estimate_speed(model, device, fp32, 128, 1)
    assert speed.decode_bound == "overhead"
    # Without the overhead term 10 MB at 30 GB/s would promise ~3,000 tokens/s.
    monkeypatch.setattr(speed_module, "DECODE_STEP_OVERHEAD_S", 0.0)
    monkeypatch.setattr(speed_module, "DECODE_LAYER_OVERHEAD_S", 0.0)
    bandwidth_only = estimate_speed(model, device, fp32, 128, 1)
    assert bandwidth_only.decode_tok_s > 2500
    assert speed.decode_tok_s < 0.6 * bandwidth_only.decode_tok_s


def test_a_step_that_fits_in_the_cache_streams_at_cache_speed():
    model, fp32 = model_from_checkpoint(DEMO), get_precision("fp32")
    ram_only = local_cpu_device(copy_gb_s=30.0, fp32_gemv_gb_s=30.0, int8_gemv_gb_s=None, fp32_tflops=0.5)
    cached = local_cpu_device(copy_gb_s=30.0, fp32_gemv_gb_s=30.0, int8_gemv_gb_s=None, fp32_tflops=0.5,
                              cache_bytes=32 * 2**20, cached_gemv_gb_s=75.0)
    tiny_cache = local_cpu_device(copy_gb_s=30.0, fp32_gemv_gb_s=30.0, int8_gemv_gb_s=None, fp32_tflops=0.5,
                                  cache_bytes=2**20, cached_gemv_gb_s=75.0)
    speeds = {name: estimate_speed(model, dev, fp32, 128, 1).decode_tok_s
              for name, dev in (("ram", ram_only), ("cached", cached), ("tiny", tiny_cache))}
    assert speeds["cached"] > 1.2 * speeds["ram"]
    assert speeds["tiny"] == speeds["ram"]  # 10 MB do not fit in 1 MiB: RAM speed
