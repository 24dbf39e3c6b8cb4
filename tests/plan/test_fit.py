import pytest

from selfhost.catalog import DeviceSpec, get_device, get_model
from selfhost.errors import InvalidParameterError
from selfhost.plan.fit import is_edge_capable, plan_fit, rank_fits
from selfhost.plan.memory import kv_cache_bytes, kv_elements_per_token, weights_bytes
from selfhost.plan.precision import get_precision

FP16, FP32, INT8, INT4 = (get_precision(p) for p in ("fp16", "fp32", "int8", "int4"))


def test_llama_8b_fp16_weights_are_about_16_gb():
    # 8.03B params x 2 bytes; embeddings are fp16 anyway.
    assert weights_bytes(get_model("llama3.1:8b"), FP16) / 1e9 == pytest.approx(16.06, abs=0.01)


def test_llama_8b_kv_cache_is_128_kib_per_token_at_fp16():
    # 2 (K,V) x 32 layers x 8 KV heads x 128 head_dim x 2 bytes = 131,072 bytes
    model = get_model("llama3.1:8b")
    assert kv_cache_bytes(model, FP16, context=1, concurrency=1) == 128 * 1024
    assert kv_cache_bytes(model, FP16, context=1000, concurrency=3) == 3000 * 128 * 1024


def test_seed_7b_numbers():
    # The seed: 7B needs 28 GB at fp32 and 7 GB quantized to 8 bits.
    mistral = get_model("mistral:7b")
    assert weights_bytes(mistral, FP32) / 1e9 == pytest.approx(29.0, abs=0.1)  # 7.25B x 4
    # 7.25B x 1.0156 B/weight (embedding tables are quantized with the rest) = 7.36 GB
    assert weights_bytes(mistral, INT8) / 1e9 == pytest.approx(7.36, abs=0.01)
    assert INT8.bytes_per_weight == pytest.approx(1 + 2 / 128)
    assert INT4.bytes_per_weight == pytest.approx(0.5 + 4 / 128)


def test_sliding_window_layers_cap_their_kv():
    gemma = get_model("gemma2:9b")  # 21 of 42 layers slide over 4096 tokens
    per_token_full = 2 * gemma.arch.kv_heads * gemma.arch.head_dim * gemma.arch.layers
    assert kv_elements_per_token(gemma, 4096) == per_token_full
    at_8k = kv_elements_per_token(gemma, 8192)
    assert at_8k == pytest.approx(per_token_full * (21 * 8192 + 21 * 4096) / (42 * 8192))


def test_mla_caches_one_latent_per_layer():
    v3 = get_model("deepseek-v3")
    assert kv_elements_per_token(v3, 4096) == 61 * (512 + 64)


def test_fit_report_fits_and_headroom():
    report = plan_fit(get_model("llama3.1:8b"), get_device("rtx4090"), FP16, 4096, 1)
    assert report.fits
    assert report.headroom_bytes == pytest.approx(get_device("rtx4090").usable_bytes - report.memory.total_bytes)
    assert report.max_context > 4096 and report.max_concurrency >= 1
    assert report.speed.decode_bound == "memory"
    # 1008 GB/s x 0.7 over ~16.6 GB read per token
    assert 40 < report.speed.decode_tok_s < 50


def test_largest_context_and_concurrency_are_tight():
    model, device = get_model("llama3.1:8b"), get_device("rtx4090")
    report = plan_fit(model, device, FP16, 4096, 2)
    assert plan_fit(model, device, FP16, report.max_context, 2).fits
    assert not plan_fit(model, device, FP16, report.max_context + 1, 2).fits
    assert not plan_fit(model, device, FP16, 4096, report.max_concurrency + 1).fits


def test_too_big_model_does_not_fit():
    report = plan_fit(get_model("llama3.1:405b"), get_device("h100"), INT4, 4096, 1)
    assert not report.fits and report.max_context == 0


def test_moe_decode_reads_active_params_only():
    mixtral, a100 = get_model("mixtral:8x7b"), get_device("a100-80gb")
    moe = plan_fit(mixtral, a100, INT8, 2048, 1).speed.decode_tok_s
    dense_equivalent = 0.7 * 2039e9 / (46.7e9 * INT8.bytes_per_weight)
    assert moe > 3 * dense_equivalent  # 12.9B of 46.7B read per token


def test_gpt_oss_20b_by_hand():
    """Weights from all 32 experts, KV from 12 full layers plus 12 kept to 128 tokens, and one
    sequence's decode reading 4 experts a layer and the head but not the input embedding."""
    from selfhost.plan.speed import decode_weight_bytes

    model = get_model("gpt-oss:20b")
    attention = 2 * 2880 * 4096 + 2 * 2880 * 512 + (4096 + 2 * 512)  # q/o, k/v, q/k/v biases
    expert, router, table = 3 * 2880 * 2880, 2880 * 32, 201_088 * 2880
    total = 24 * (attention + 32 * expert + router) + 2 * table  # 20.91B
    assert weights_bytes(model, FP16) == 2 * total
    full_layer_kv = 2 * 8 * 64  # K and V, 8 heads of 64
    assert kv_elements_per_token(model, 4096) == pytest.approx(full_layer_kv * (12 + 12 * 128 / 4096))
    assert kv_cache_bytes(model, FP16, 4096, 1) == pytest.approx(2 * 4096 * full_layer_kv * (12 + 12 * 128 / 4096))
    assert decode_weight_bytes(model, FP16, 1) == pytest.approx(2 * (24 * (attention + 4 * expert + router) + table))
    assert decode_weight_bytes(model, FP16, 1) / 2 / 1e9 == pytest.approx(model.active_params_b, rel=0.01)  # 3.6B


def test_rank_fits_only_lists_fitting_models():
    reports = rank_fits(get_device("jetson-orin-nano-8gb"), 2048, 1)
    assert reports and all(r.fits for r in reports)
    assert not any(r.request.model.alias == "llama3.1:70b" for r in reports)


def test_edge_capability():
    assert is_edge_capable(get_model("qwen2.5:0.5b"))
    assert not is_edge_capable(get_model("qwen2.5:72b"))


def test_bad_requests_raise_clear_errors():
    with pytest.raises(InvalidParameterError, match="context"):
        plan_fit(get_model("gemma2:2b"), get_device("rtx4090"), FP16, 100_000, 1)
    with pytest.raises(InvalidParameterError, match="concurrency"):
        plan_fit(get_model("gemma2:2b"), get_device("rtx4090"), FP16, 100, 0)
    with pytest.raises(InvalidParameterError, match="bandwidth_gb_s"):
        DeviceSpec(id="custom", name="x", kind="gpu", memory_gb=16, bandwidth_gb_s=0,
                   peak_fp16_tflops=1, peak_int8_tops=1, peak_fp32_tflops=1)
    with pytest.raises(InvalidParameterError, match="did you mean 'int8'"):
        get_precision("int9")


def test_speculative_estimate_follows_acceptance_and_the_bound():
    from selfhost.plan.speed import decode_step, estimate_speculative, expected_tokens_per_step

    assert expected_tokens_per_step(0.0, 4) == 1.0  # every proposal rejected: the target's own token
    assert expected_tokens_per_step(1.0, 4) == 5.0
    assert expected_tokens_per_step(0.5, 2) == pytest.approx(1 + 0.5 + 0.25)
    model, gpu, fp16 = get_model("llama3.1:8b"), get_device("rtx4090"), get_precision("fp16")
    one = estimate_speculative(model, gpu, fp16, 2048, 1, 0.7, 4)
    # One stream on a GPU is bound by reading the weights: five queries cost what one does.
    plain_s, bound = decode_step(model, gpu, fp16, 2048, 1)
    assert bound == "memory"
    assert one.speedup == pytest.approx(expected_tokens_per_step(0.7, 4), rel=0.02)
    # A draft's own steps are paid for: a smaller gain than free prompt lookup at the same acceptance.
    drafted = estimate_speculative(model, gpu, fp16, 2048, 1, 0.7, 4, get_model("llama3.2:1b"))
    assert 1 < drafted.speedup < one.speedup
    # Many short sequences make the step compute-bound: proposals then cost their full share.
    crowded = estimate_speculative(model, gpu, fp16, 256, 256, 0.3, 4)
    assert decode_step(model, gpu, fp16, 256, 256, queries_per_seq=5)[1] == "compute"
    assert crowded.speedup < 1


def test_an_int8_kv_cache_costs_a_byte_per_element_and_its_scales():
    # llama3.1:8b: 2 x 32 layers x 8 KV heads x 128 dims per token; int8: 1 + 4/128 bytes each
    model, device = get_model("llama3.1:8b"), get_device("rtx4090")
    int8_kv = FP16.with_kv_cache("int8")
    assert int8_kv.name == "fp16 + int8 KV" and FP16.with_kv_cache("auto") is FP16
    assert kv_cache_bytes(model, int8_kv, context=1, concurrency=1) == 2 * 32 * 8 * 128 * (1 + 4 / 128)
    fp16, int8 = plan_fit(model, device, FP16, 4096, 1), plan_fit(model, device, int8_kv, 4096, 1)
    assert int8.max_context > 1.9 * fp16.max_context  # 2 bytes -> 1.03 per element: ~1.94x the tokens
    assert int8.memory.weights_bytes == fp16.memory.weights_bytes
    with pytest.raises(InvalidParameterError, match="unknown KV cache dtype 'int4'"):
        FP16.with_kv_cache("int4")
    with pytest.raises(InvalidParameterError, match="latent attention"):
        kv_cache_bytes(get_model("deepseek-v3"), int8_kv, context=1, concurrency=1)
