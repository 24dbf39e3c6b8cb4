"""Mixture-of-experts families against transformers: logits of a prompt and greedy continuations."""

from __future__ import annotations

import pytest
import torch
import transformers

from selfhost import LLM, SamplingParams
from tests.tiny_models import COMMON, save_tiny_tokenizer

MOE_CONFIGS = {
    "mixtral": ("MixtralConfig", dict(num_local_experts=4, num_experts_per_tok=2, sliding_window=None)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                                         shared_expert_intermediate_size=48, norm_topk_prob=False,
                                         decoder_sparse_step=1, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16,
                                         norm_topk_prob=True)),
}


@pytest.fixture(scope="module", params=sorted(MOE_CONFIGS))
def moe_checkpoint(request, tmp_path_factory):
    config_cls, overrides = MOE_CONFIGS[request.param]
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # random init leaves norms at 1: perturb them so a wrong norm cannot pass
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out, safe_serialization=True)
    save_tiny_tokenizer(out)
    return request.param, out, model.eval()


def test_moe_logits_match_transformers(moe_checkpoint):
    _, folder, reference = moe_checkpoint
    llm = LLM(str(folder), kv_cache_memory="16MiB")
    prompt = [1, 17, 42, 99, 7, 250, 31, 8, 64, 300, 12, 5]
    with torch.no_grad():
        expected = reference(torch.tensor([prompt])).logits[0, -1]
    out = llm.generate([prompt], SamplingParams(max_tokens=1, temperature=0, logprobs=5))[0]
    top = out.logprobs[0].top
    expected_logprobs = expected.log_softmax(-1)
    for token, logprob in top.items():
        assert abs(logprob - float(expected_logprobs[token])) < 1e-4
    assert out.token_ids[0] == int(expected.argmax())


def test_moe_greedy_continuation_matches_transformers(moe_checkpoint):
    _, folder, reference = moe_checkpoint
    llm = LLM(str(folder), kv_cache_memory="16MiB")
    prompts = [[1, 17, 42, 99, 7], [1, 250, 31, 8, 64, 300, 12, 5, 77, 3]]
    outs = llm.generate(prompts, SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))
    for prompt, out in zip(prompts, outs):
        expected = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False,
                                      eos_token_id=None, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == expected


def test_moe_checkpoint_quantizes_and_runs_close_to_full_precision(moe_checkpoint, tmp_path):
    """Experts are ordinary Linear modules: int8 quantizes them (Mixtral's w1/w3/w2 names included)."""
    from selfhost.quant.checkpoint import quantize_checkpoint
    from selfhost.quant.config import QuantConfig

    _, folder, _ = moe_checkpoint
    plan = quantize_checkpoint(folder, tmp_path / "int8", QuantConfig("int8"))
    assert any(".experts.0.gate_up_proj" in module for module in plan)
    prompt, params = [1, 17, 42, 99, 7], SamplingParams(max_tokens=1, temperature=0, logprobs=5)
    full = LLM(str(folder), kv_cache_memory="16MiB").generate([prompt], params)[0].logprobs[0].top
    int8 = LLM(str(tmp_path / "int8"), kv_cache_memory="16MiB").generate([prompt], params)[0].logprobs[0].top
    for token, logprob in full.items():
        assert abs(int8.get(token, logprob - 1) - logprob) < 0.05
