"""fit's predictions against a real selfhost run of the demo model (memory only: speed
depends on machine load and belongs to benchmarks/fit_calibration.py)."""

import json
from dataclasses import replace
from pathlib import Path

import pytest
from safetensors import safe_open

from selfhost.bench import device_probe
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
from selfhost.plan.precision import CPU_BF16, get_precision
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


# ---- 16-bit weights on a CPU: what weight_dtype="auto" runs -----------------------------

def test_a_cpu_plans_bf16_weights_at_its_bf16_kernels_rates():
    model, bf16 = model_from_checkpoint(DEMO), CPU_BF16
    # Twice the fp32 model's bytes per second of weights would be the naive guess: the
    # measured bf16 kernel streams 20 GB/s of a 30 GB/s bus, the fp32 one 30.
    device = local_cpu_device(copy_gb_s=30.0, fp32_gemv_gb_s=30.0, int8_gemv_gb_s=None, fp32_tflops=0.5,
                              bf16_gemv_gb_s=20.0, bf16_tflops=2.0)
    assert device.decode_bandwidth(16) == pytest.approx(20e9)
    assert device.decode_bandwidth(32) == pytest.approx(30e9)
    assert device.peak_flops("fp16") == pytest.approx(2e12)
    unmeasured = local_cpu_device(copy_gb_s=30.0, fp32_gemv_gb_s=30.0, int8_gemv_gb_s=None, fp32_tflops=0.5)
    assert unmeasured.decode_bandwidth(16) == pytest.approx(30e9) and unmeasured.peak_flops("fp16") == pytest.approx(0.5e12)
    fast, slow = estimate_speed(model, device, bf16, 4096, 64), estimate_speed(model, unmeasured, bf16, 4096, 64)
    assert fast.prefill_tok_s > 2 * slow.prefill_tok_s  # prompts run at the bf16 peak


@pytest.mark.parametrize("bf16_wins", [True, False])
def test_fit_on_this_cpu_plans_the_precision_run_would_pick(tmp_path, monkeypatch, bf16_wins):
    """`selfhost fit --device local` asks the same cached measurement the loader asks
    (weight_dtype="auto"), so the plan's weights are the bytes `selfhost run` would load."""
    from selfhost import LLM
    from selfhost.cli.plan import _unquantized_precision
    from selfhost.layers.linear import Linear
    from selfhost.models import weight_precision

    spec = model_from_checkpoint(DEMO)
    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    fp32_s, bf16_s = (2.0, 1.0) if bf16_wins else (1.0, 1.0)
    arch = spec.arch
    loaded = LLM(None, kv_cache_memory="16MiB", weight_dtype="float32").model  # the loader's count of the bytes
    streamed = sum(4 * m.weight.numel() for m in loaded.modules() if type(m) is Linear)
    key = weight_precision._cache_key(arch.hidden, arch.intermediate, 1,
                                      weight_precision.copies_for(arch.hidden, arch.intermediate, streamed))
    weight_precision.cache_path().write_text(json.dumps({key: {
        "float32@1": fp32_s, "bfloat16@1": bf16_s, f"float32@{weight_precision.BATCH_ROWS}": fp32_s,
        f"bfloat16@{weight_precision.BATCH_ROWS}": bf16_s}}))
    local = local_cpu_device(copy_gb_s=30.0, fp32_gemv_gb_s=30.0, int8_gemv_gb_s=None, fp32_tflops=0.5)
    precision, why = _unquantized_precision(spec, local)
    assert precision.name == ("bf16" if bf16_wins else "fp32")
    assert precision.bytes_per_weight == (2 if bf16_wins else 4)
    assert "cached measurement" in why
    # Another machine's CPU is not this one: its kind's default, no measurement.
    other = replace(local, id="epyc-9654")
    assert _unquantized_precision(spec, other) == (get_precision("fp32"), None)


def test_bf16_probes_measure_where_the_kernels_exist():
    from selfhost.layers.bf16_linear import best_layout, c_kernel_available, tiles_available

    gemv, tflops = device_probe.measure_bf16_gemv_gb_s(32 * 2**20), device_probe.measure_bf16_matmul_tflops(256)
    if tiles_available() if best_layout() == "tiles" else c_kernel_available():
        assert gemv > 0 and tflops > 0
    else:
        assert gemv is None and tflops is None
