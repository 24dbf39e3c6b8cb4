"""gpt-oss against transformers: attention sinks, alternating sliding/full layers, clamped SwiGLU
experts with biases, a router with a bias, YaRN; and its MXFP4 expert weights."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from selfhost import LLM
from selfhost.engine.sink_cache import SinkKVCache
from selfhost.models.loader import load_model
from selfhost.models.mxfp4 import FP4_VALUES, dequantize_mxfp4
from tests.models.one_sequence import (
    assert_batching_engine_matches,
    assert_greedy_and_logprobs_match,
    one_sequence_logits,
    reference_greedy,
)
from tests.quant.int8_parity import assert_stored_int8_matches_on_the_fly
from tests.tiny_models import COMMON, save_tiny_tokenizer

PROMPT_LEN = 40  # five times the sliding window
DECODE_STEPS = 32
TOL = 1e-4
WINDOW = 8
LIMIT = 0.1  # small enough that the clamps bite on these random weights

CONFIG = {
    **COMMON, "intermediate_size": 32, "head_dim": 16, "num_local_experts": 8, "num_experts_per_tok": 2,
    "sliding_window": WINDOW, "swiglu_limit": LIMIT, "num_hidden_layers": 3, "initializer_range": 0.05,
    "rope_parameters": {"rope_type": "yarn", "rope_theta": 150000.0, "factor": 8.0, "beta_fast": 32.0,
                        "beta_slow": 1.0, "truncate": False, "original_max_position_embeddings": 64},
}


def _reference_model(seed: int = 0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(transformers.GptOssConfig(**CONFIG), dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # init leaves norms at 1 and biases at 0
                param.add_(torch.randn_like(param) * 0.1)
            elif name.endswith("bias"):  # small: one shared offset must not pin every token to the same experts
                param.add_(torch.randn_like(param) * 0.02)
            if name.endswith("sinks"):  # std 0.02 at init: make the sinks take a visible share
                param.copy_(torch.randn_like(param))
    return model.eval()


@pytest.fixture(scope="module")
def gpt_oss(tmp_path_factory):
    model = _reference_model()
    out = tmp_path_factory.mktemp("gpt_oss")
    model.save_pretrained(out, safe_serialization=True)
    save_tiny_tokenizer(out)
    return out, model, LLM(str(out), kv_cache_memory="16MiB")


def test_spec_alternates_windows_and_turns_on_sinks(gpt_oss):
    _, _, llm = gpt_oss
    spec = llm.model.spec
    assert spec.layer_windows == (WINDOW, None, WINDOW)
    assert spec.attn_sinks and spec.activation == "clamped_swiglu" and spec.swiglu_limit == LIMIT
    assert isinstance(llm.engine.cache, SinkKVCache) and not llm.engine.cache.use_cpu_kernel


def test_logits_match_transformers_at_prefill_and_decode(gpt_oss):
    _, ref, llm = gpt_oss
    model = llm.model
    prompt = torch.randint(3, model.spec.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0))
    ref_tokens, ref_prefill, ref_steps = reference_greedy(ref, prompt, DECODE_STEPS)
    cache = SinkKVCache(model.spec, 8, 16, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        logits = one_sequence_logits(model, cache, 8, prompt, ref_tokens[:-1])  # teacher-forced
    assert (logits[:PROMPT_LEN] - ref_prefill).abs().max().item() <= TOL
    decode = torch.cat([logits[PROMPT_LEN - 1 : PROMPT_LEN], logits[PROMPT_LEN:]])
    assert (decode - ref_steps).abs().max().item() <= TOL


def test_greedy_continuation_and_logprobs_match(gpt_oss):
    _, ref, llm = gpt_oss
    assert_greedy_and_logprobs_match(ref, llm, PROMPT_LEN, DECODE_STEPS, TOL)


def test_routing_spreads_and_the_clamps_bite(gpt_oss):
    """Watched on the reference: tokens use most experts, and expert pre-activations pass the limit."""
    _, ref, _ = gpt_oss
    seen = []
    experts = ref.model.layers[1].mlp.experts
    handle = experts.register_forward_hook(lambda module, args, out: seen.append(args))
    with torch.no_grad():
        ref(torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(2)))
    handle.remove()
    hidden, chosen, _ = seen[0]
    assert len(set(chosen.flatten().tolist())) >= 6  # of 8
    pre = torch.einsum("th,ehi->eti", hidden, experts.gate_up_proj) + experts.gate_up_proj_bias[:, None]
    assert (pre[..., 0::2] > LIMIT).float().mean() > 0.1  # gates clamped above
    assert (pre[..., 1::2].abs() > LIMIT).float().mean() > 0.1  # ups clamped both ways


def test_batching_engine_matches_transformers_through_preemption_and_prefix_hits(gpt_oss):
    folder, ref, roomy = gpt_oss
    assert_batching_engine_matches(ref, folder, roomy, SinkKVCache, DECODE_STEPS)


def test_mxfp4_dequantizes_a_hand_worked_block():
    # Row 0, scale byte 128 = 2^1: 0x21 -> codes 1 (0.5) then 2 (1.0); 0xF8 -> 8 (-0.0) then 15 (-6.0);
    # 0x7A -> 10 (-1.0) then 7 (6.0). Row 1, scale 125 = 2^-2: 0x53 -> 3 (1.5) then 5 (3.0).
    blocks = torch.zeros(2, 1, 16, dtype=torch.uint8)
    blocks[0, 0, :3] = torch.tensor([0x21, 0xF8, 0x7A])
    blocks[1, 0, 0] = 0x53
    scales = torch.tensor([[128], [125]], dtype=torch.uint8)
    got = dequantize_mxfp4(blocks, scales)
    assert got.shape == (2, 32)
    assert got[0, :6].tolist() == [1.0, 2.0, -0.0, -12.0, -2.0, 12.0]
    assert got[1, :2].tolist() == [0.375, 0.75]
    assert not got[0, 6:].any() and not got[1, 2:].any()
    assert torch.signbit(got[0, 2])  # code 8 is negative zero


def _encode_mxfp4(codes: torch.Tensor, exponents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """codes (..., cols) in 0..15, exponents (..., cols / 32) -> the checkpoint's blocks and scales."""
    pairs = codes.view(*codes.shape[:-1], -1, 16, 2)
    return (pairs[..., 0] | (pairs[..., 1] << 4)).to(torch.uint8), (exponents + 127).to(torch.uint8)


def _mxfp4_twins(tmp_path):
    """(reference model, its fp32 folder, the same model in OpenAI's MXFP4 layout)."""
    ref = _reference_model(seed=3)
    full = tmp_path / "fp32"
    generator = torch.Generator().manual_seed(4)
    lut = torch.tensor(FP4_VALUES)
    packed = {}
    with torch.no_grad():
        for i, layer in enumerate(ref.model.layers):
            experts = layer.mlp.experts
            for kind, param in (("gate_up_proj", experts.gate_up_proj), ("down_proj", experts.down_proj)):
                num_experts, cols, rows = param.shape  # stored (E, in, out); MXFP4 is (E, out, in)
                codes = torch.randint(0, 16, (num_experts, rows, cols), generator=generator)
                exponents = torch.randint(-6, -3, (num_experts, rows, cols // 32), generator=generator)
                weight = torch.ldexp(lut[codes], exponents.repeat_interleave(32, dim=-1))
                param.copy_(weight.transpose(1, 2))
                blocks, scales = _encode_mxfp4(codes, exponents)
                packed[f"model.layers.{i}.mlp.experts.{kind}_blocks"] = blocks
                packed[f"model.layers.{i}.mlp.experts.{kind}_scales"] = scales
    ref.save_pretrained(full, safe_serialization=True)
    quantized = tmp_path / "mxfp4"
    quantized.mkdir()
    tensors = {k: v for k, v in load_file(full / "model.safetensors").items()
               if not k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    save_file({**tensors, **packed}, quantized / "model.safetensors")
    config = json.loads((full / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "mxfp4", "modules_to_not_convert": ["router", "lm_head"]}
    (quantized / "config.json").write_text(json.dumps(config))
    return ref, full, quantized


def test_mxfp4_checkpoint_loads_like_its_full_precision_twin(tmp_path):
    """OpenAI's layout: experts as *_blocks/*_scales (output-major) and quantization_config mxfp4. Expert
    weights drawn from the FP4 grid make the fp32 checkpoint the same model, so both load to equal logits."""
    ref, full, quantized = _mxfp4_twins(tmp_path)
    prompt = torch.randint(3, 512, (24,), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = ref(prompt[None]).logits[0]
    for folder in (full, quantized):
        model = load_model(folder, torch.float32, torch.device("cpu"))
        cache = SinkKVCache(model.spec, 4, 16, torch.float32, torch.device("cpu"))
        with torch.inference_mode():
            got = one_sequence_logits(model, cache, 4, prompt, [])
        assert (got - expected).abs().max().item() <= TOL, folder.name


def test_quantize_reads_the_mxfp4_release_like_the_loader(tmp_path):
    """`selfhost quantize` on OpenAI's MXFP4 layout writes the int8 model on-the-fly int8 of the twin gives."""
    from selfhost.quant.checkpoint import quantize_checkpoint
    from selfhost.quant.config import QuantConfig

    _, full, quantized = _mxfp4_twins(tmp_path)
    save_tiny_tokenizer(full)
    save_tiny_tokenizer(quantized)
    quantize_checkpoint(quantized, tmp_path / "int8", QuantConfig(method="int8"))
    assert_stored_int8_matches_on_the_fly(tmp_path / "int8", full)
