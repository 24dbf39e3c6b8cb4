"""Mixture-of-experts families against transformers: logits of a prompt and greedy continuations."""

from __future__ import annotations

import pytest
import torch
import transformers

from selfhost import LLM, SamplingParams
from tests.tiny_models import COMMON, MOE_CONFIGS, save_tiny_tokenizer


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


def _reference_moe(moe, x: torch.Tensor) -> torch.Tensor:
    """Token by token, expert by expert: the definition the grouped forward must equal."""
    out = torch.zeros_like(x)
    probs = (x @ moe.gate.weight.T).softmax(-1)
    for t in range(x.shape[0]):
        weights, experts = probs[t].topk(moe.top_k)
        if moe.normalize_top_k:
            weights = weights / weights.sum()
        for w, e in zip(weights, experts.tolist()):
            expert = moe.experts[e]
            gate, up = (x[t] @ expert.gate_up_proj.weight.T).chunk(2)
            out[t] += w * ((torch.nn.functional.silu(gate) * up) @ expert.down_proj.weight.T)
    return out


@pytest.mark.parametrize("case", ["spread", "one_expert", "single_token"])
def test_expert_grouping_equals_the_per_token_definition(case):
    from selfhost.layers.moe import SparseMoE

    torch.manual_seed(3)
    moe = SparseMoE(hidden_size=16, expert_size=8, num_experts=6, top_k=2, normalize_top_k=True, activation="silu")
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if case == "one_expert":  # every token's router prefers experts 4 then 1: the others get no token
            moe.gate.weight.zero_()
            moe.gate.weight[4] += 10.0 / 16
            moe.gate.weight[1] += 5.0 / 16
    x = torch.randn(1 if case == "single_token" else 9, 16)
    if case == "one_expert":
        x = x.abs()  # positive activations, so the biased router rows win for every token
    with torch.inference_mode():
        got = moe.forward(x)
    assert torch.allclose(got, _reference_moe(moe, x), atol=1e-5)
    if case == "spread":
        assert len(set((x @ moe.gate.weight.T).topk(2).indices.flatten().tolist())) >= 4  # several experts used


def test_moe_through_preemption_and_prefix_hits_matches_a_plain_run(moe_checkpoint):
    """The batching engine's paths (prefix-cache hits, preemption under a tiny KV cache) keep MoE outputs."""
    _, folder, _ = moe_checkpoint
    shared = [1, 17, 42, 99, 7, 250, 31, 8, 64, 300, 12, 5, 77, 3, 90, 11, 23, 45]
    prompts = [shared + [i, i + 1] for i in range(4, 10)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    roomy = LLM(str(folder), kv_cache_memory="16MiB")
    expected = [o.token_ids for o in roomy.generate(prompts, params)]
    assert [o.token_ids for o in roomy.generate(prompts, params)] == expected  # second run: prefix hits
    assert roomy.engine.block_manager.prefix_hit_tokens > 0
    spec = roomy.model.spec
    block_bytes = 16 * spec.kv_bytes_per_token * 4  # 16-token blocks, fp32
    tight = LLM(str(folder), kv_cache_memory=8 * block_bytes)  # room for 2-3 of the 6 requests: preemption
    assert [o.token_ids for o in tight.generate(prompts, params)] == expected
    assert tight.engine.scheduler.num_preemptions > 0


def test_moe_bf16_weights_run_experts_in_one_call_like_the_expert_loop(moe_checkpoint, monkeypatch):
    """weight_dtype="bfloat16": experts hold bf16 weights (AMX tiles where the CPU has them) and the
    layer's one C call gives the expert loop's greedy tokens and logprobs."""
    from selfhost.layers import moe as moe_module
    from selfhost.layers.bf16_linear import Bf16Linear, tiles_available

    name, folder, reference = moe_checkpoint
    llm = LLM(str(folder), kv_cache_memory="16MiB", weight_dtype="bfloat16")
    layers = [layer.mlp for layer in llm.model.model.layers if isinstance(layer.mlp, moe_module.SparseMoE)]
    assert all(type(e.gate_up_proj) is Bf16Linear for moe in layers for e in moe.experts)
    prompts = [[1, 17, 42, 99, 7], [1, 250, 31, 8, 64, 300, 12, 5, 77, 3]]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
    monkeypatch.setattr(moe_module, "USE_EXPERT_KERNEL", False)
    loop = llm.generate(prompts, params)
    monkeypatch.setattr(moe_module, "USE_EXPERT_KERNEL", True)
    one_call = llm.generate(prompts, params)
    if moe_module.USE_EXPERT_KERNEL and tiles_available():
        assert all(moe.expert_kernel() is not None for moe in layers)
    for a, b in zip(loop, one_call):
        assert a.token_ids == b.token_ids
        for top_a, top_b in zip(a.logprobs, b.logprobs):
            for token, logprob in top_a.top.items():
                assert abs(top_b.top[token] - logprob) < 1e-3
    with torch.no_grad():  # and bf16 weights stay close to the fp32 reference
        expected = reference(torch.tensor([prompts[1]])).logits[0, -1].log_softmax(-1)
    first = one_call[1].logprobs[0].top
    for token, logprob in first.items():
        assert abs(logprob - float(expected[token])) < 0.05


def test_moe_int8_experts_run_in_one_call_like_the_expert_loop(moe_checkpoint, tmp_path, monkeypatch):
    """An int8 checkpoint's experts (Int8Linear on its avx2 kernel) run in the layer's one C call where this
    CPU has it: the expert loop's greedy tokens and logprobs, and greedy tokens the fp32 model also picks."""
    from selfhost.layers import moe as moe_module
    from selfhost.quant import int8
    from selfhost.quant.checkpoint import quantize_checkpoint
    from selfhost.quant.config import QuantConfig

    _, folder, _ = moe_checkpoint
    quantize_checkpoint(folder, tmp_path / "int8", QuantConfig("int8"))
    # the fp32 cache the full model has ("auto" gives quantized weights bf16 on AMX): the experts' rounding alone
    llm = LLM(str(tmp_path / "int8"), kv_cache_memory="16MiB", kv_cache_dtype="float32")
    layers = [layer.mlp for layer in llm.model.model.layers if isinstance(layer.mlp, moe_module.SparseMoE)]
    if moe_module.USE_EXPERT_KERNEL and int8.avx2_available() and moe_module._moe_cpu.available(2):
        assert all(moe.expert_kernel().kind == moe_module.EXPERT_KINDS["int8"] for moe in layers)
    prompts = [[1, 17, 42, 99, 7], [1, 250, 31, 8, 64, 300, 12, 5, 77, 3]]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True, logprobs=3)
    one_call = llm.generate(prompts, params)
    monkeypatch.setattr(moe_module, "USE_EXPERT_KERNEL", False)
    loop = llm.generate(prompts, params)
    for a, b in zip(loop, one_call):
        assert a.token_ids == b.token_ids
        for top_a, top_b in zip(a.logprobs, b.logprobs):
            for token, logprob in top_a.top.items():
                assert abs(top_b.top[token] - logprob) < 1e-4
    full = LLM(str(folder), kv_cache_memory="16MiB").generate(prompts, params)
    for a, b in zip(full, one_call):  # tiny random models have near-ties: only the first tokens are sure to agree
        assert a.token_ids[:4] == b.token_ids[:4]
