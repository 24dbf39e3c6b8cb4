"""Quantized tiny models against their fp32 selves, and the save -> load round trip.

Tiny random models predict nearly uniformly, so their perplexity moves little
under quantization; the logits and greedy checks carry most of the weight.
Bounds stated here (tiny random Llama/Qwen2, 3 layers, hidden 64):
  int8: greedy continuation identical for 16 tokens; perplexity within 0.5%;
        logits within 2% of the fp32 logit range.
  int4 (group 32, int8 head): teacher-forced top-1 agreement >= 70% (near-ties abound in a
        random model; measured ~80%); perplexity within 3%.
"""

import pytest
import torch

from selfhost import LLM, SamplingParams
from selfhost.errors import InvalidParameterError
from selfhost.quant.apply import quantize_model, weight_bytes
from selfhost.quant.checkpoint import quantize_checkpoint
from selfhost.quant.config import QuantConfig
from selfhost.quant.int4 import Int4Linear
from selfhost.quant.int8 import Int8Embedding, Int8Linear
from selfhost.quant.perplexity import perplexity
from tests.quant.test_kernels import KERNELS_INT8
from tests.tiny_models import _CORPUS

PROMPT = list(range(5, 21))
GREEDY = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)


def _llm(path, **kwargs):
    return LLM(str(path), device="cpu", max_num_seqs=1, kv_cache_memory=1 << 22, **kwargs)


@torch.inference_mode()
def _logits(llm, ids):
    from selfhost.quant.perplexity import _WindowKV

    t = torch.tensor(ids)
    return llm.model.compute_logits(llm.model(t, torch.arange(len(ids)), _WindowKV()))


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # untied + tied embeddings
def family(request, tiny_checkpoint):
    path = tiny_checkpoint(request.param)
    fp32 = _llm(path)
    ids = fp32.tokenizer.encode(_CORPUS[:1500])
    return path, fp32, ids, _logits(fp32, ids)


def test_int8_greedy_logits_and_perplexity_stay_close(family):
    path, fp32, ids, ref_logits = family
    int8 = _llm(path, quantization="int8")
    assert isinstance(int8.model.lm_head, Int8Linear)
    assert isinstance(int8.model.model.embed_tokens, Int8Embedding)
    assert int8.generate([PROMPT], GREEDY)[0].token_ids == fp32.generate([PROMPT], GREEDY)[0].token_ids
    logits = _logits(int8, ids)
    assert (logits - ref_logits).abs().max() < 0.02 * (ref_logits.max() - ref_logits.min())
    base, quant = perplexity(fp32.model, ids, 128, 64).perplexity, perplexity(int8.model, ids, 128, 64).perplexity
    assert abs(quant / base - 1) < 0.005


def test_int4_top1_and_perplexity_stay_close(family):
    path, fp32, ids, ref_logits = family
    int4 = _llm(path)
    quantize_model(int4.model, QuantConfig(method="int4", group_size=32, head_method="int8"))
    assert isinstance(int4.model.model.layers[0].mlp.down_proj, Int4Linear)
    logits = _logits(int4, ids)
    agreement = (logits.argmax(-1) == ref_logits.argmax(-1)).float().mean()
    assert agreement >= 0.7
    base, quant = perplexity(fp32.model, ids, 128, 64).perplexity, perplexity(int4.model, ids, 128, 64).perplexity
    assert abs(quant / base - 1) < 0.03


@pytest.mark.parametrize("method,head_method", [("int8", None), ("int4", None), ("int4", "int8")])
def test_saved_checkpoint_loads_to_identical_outputs(family, method, head_method, tmp_path):
    path, _, ids, _ = family
    config = QuantConfig(method=method, head_method=head_method)
    on_the_fly = _llm(path)
    quantize_model(on_the_fly.model, config)
    quantize_checkpoint(path, tmp_path / "q", config)
    loaded = _llm(tmp_path / "q")
    assert loaded.model.quant_config == on_the_fly.model.quant_config
    assert torch.equal(_logits(loaded, ids[:40]), _logits(on_the_fly, ids[:40]))
    assert loaded.generate([PROMPT], GREEDY)[0].token_ids == on_the_fly.generate([PROMPT], GREEDY)[0].token_ids
    assert weight_bytes(loaded.model) == weight_bytes(on_the_fly.model)


@pytest.mark.parametrize("config,kernel", [(QuantConfig(method="int4", group_size=32), None)]
                         + [(QuantConfig(method="int8"), k) for k in KERNELS_INT8 if k != "dequant"])
def test_dequant_fallback_kernels_agree_with_fast_kernels(family, config, kernel):
    path, _, ids, _ = family
    fast, fallback = _llm(path), _llm(path)
    quantize_model(fast.model, config, kernel=kernel)
    quantize_model(fallback.model, config, kernel="dequant")
    a, b = _logits(fast, ids[:40]), _logits(fallback, ids[:40])
    assert (a - b).abs().max() < 0.01 * (b.max() - b.min())


def test_skip_modules_keep_full_precision(tiny_checkpoint):
    llm = _llm(tiny_checkpoint("llama"))
    quantize_model(llm.model, QuantConfig(method="int8", skip_modules=("model.embed_tokens", "lm_head",
                                                                       "model.layers.0.mlp.down_proj")))
    assert type(llm.model.lm_head).__name__ == "Linear"
    assert type(llm.model.model.layers[0].mlp.down_proj).__name__ == "Linear"
    assert isinstance(llm.model.model.layers[1].mlp.down_proj, Int8Linear)
    with pytest.raises(InvalidParameterError, match="already quantized"):
        quantize_model(llm.model, QuantConfig(method="int8"))


def test_unknown_skip_module_is_named(tiny_checkpoint):
    llm = _llm(tiny_checkpoint("llama"))
    with pytest.raises(InvalidParameterError, match="'model.layers.9.mlp'"):
        quantize_model(llm.model, QuantConfig(method="int8", skip_modules=("model.layers.9.mlp",)))


def test_unknown_method_fails_before_loading(tiny_checkpoint):
    with pytest.raises(InvalidParameterError, match="'int2'"):
        _llm(tiny_checkpoint("llama"), quantization="int2")


@pytest.mark.parametrize("family", ["llama", "qwen2"])
def test_weight_memory_counts_scales_and_tied_heads_once(tiny_checkpoint, family):
    fp32 = _llm(tiny_checkpoint(family))
    int8 = _llm(tiny_checkpoint(family), quantization="int8")
    qkv = int8.model.model.layers[0].self_attn.qkv_proj
    bias = 0 if qkv.bias is None else 4 * qkv.out_features
    assert qkv.storage_bytes == qkv.out_features * qkv.in_features + 4 * qkv.out_features + bias
    embed = int8.model.model.embed_tokens.storage_bytes
    layers = sum(m.storage_bytes for n, m in int8.model.named_modules() if n.startswith("model.layers.")
                 and isinstance(m, Int8Linear))
    norms = sum(p.numel() * 4 for n, p in int8.model.named_parameters())  # all that stays fp32
    tied = int8.model.spec.tie_embeddings
    assert weight_bytes(int8.model) == layers + norms + embed * (1 if tied else 2)
    assert weight_bytes(int8.model) < 0.3 * weight_bytes(fp32.model)


@pytest.mark.parametrize("method", ["int8", "int4"])
def test_quantized_checkpoint_runs_in_bfloat16(tiny_checkpoint, tmp_path, method):
    path = tiny_checkpoint("llama")
    quantize_checkpoint(path, tmp_path / "q", QuantConfig(method=method))
    fp32, bf16 = _llm(tmp_path / "q"), _llm(tmp_path / "q", dtype="bfloat16")
    ids = fp32.tokenizer.encode(_CORPUS[:300])
    assert bf16.model.model.embed_tokens(torch.tensor(ids[:3])).dtype == torch.bfloat16
    a, b = _logits(fp32, ids), _logits(bf16, ids)
    assert (a - b).abs().max() < 0.05 * (a.max() - a.min())
    assert len(bf16.generate([PROMPT], GREEDY)[0].token_ids) == 16
