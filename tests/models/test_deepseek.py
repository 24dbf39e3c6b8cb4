"""DeepSeek V2 and V3 (latent attention, routed + shared experts) against transformers, and the latent cache.

The tiny checkpoints switch on what the families do differently: a dense first layer
(first_k_dense_replace), two shared experts, group-limited routing (V2: softmax, max per group;
V3: sigmoid with a non-zero score-correction bias, top-2 sum per group), routed_scaling_factor,
V2 without a query bottleneck (q_lora_rank None, as V2-Lite) and V3 with one, interleaved rope
pairs, and YaRN with distinct mscale / mscale_all_dim (so both the cos/sin factor and the softmax
scale differ from plain rope).
"""

from __future__ import annotations

import pytest
import torch
import transformers

from selfhost import LLM, SamplingParams
from selfhost.engine.latent_cache import LatentKVCache
from selfhost.layers.latent_attention import LatentAttention, absorbed_attention, expanded_attention
from tests.models.one_sequence import (
    assert_batching_engine_matches, assert_greedy_and_logprobs_match, one_sequence_logits, reference_greedy,
)
from tests.tiny_models import COMMON, save_tiny_tokenizer

PROMPT_LEN = 40
DECODE_STEPS = 32
TOL = 1e-4

_MLA = dict(kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, moe_intermediate_size=32,
            n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, n_group=4, topk_group=2,
            first_k_dense_replace=1, num_key_value_heads=4,
            rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=128,
                                 mscale=1.0, mscale_all_dim=0.8, beta_fast=32, beta_slow=1))
DEEPSEEK_CONFIGS = {
    # top-3 from the best 2 of 4 groups: with top-2 the two best experts' groups always rank first
    "deepseek_v2": ("DeepseekV2Config", dict(_MLA, q_lora_rank=None, topk_method="group_limited_greedy",
                                             num_experts_per_tok=3, routed_scaling_factor=1.5)),
    "deepseek_v3": ("DeepseekV3Config", dict(_MLA, q_lora_rank=48, routed_scaling_factor=2.5, norm_topk_prob=True,
                                             num_mtp_layers=0)),
}


@pytest.fixture(scope="module", params=sorted(DEEPSEEK_CONFIGS))
def deepseek(request, tmp_path_factory):
    config_cls, overrides = DEEPSEEK_CONFIGS[request.param]
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:  # random init leaves norms at 1: perturb them so a wrong norm cannot pass
                param.add_(torch.randn_like(param) * 0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):  # zeros at init: V3's biased choice must matter
                buffer.copy_(torch.randn_like(buffer) * 0.05)
    out = tmp_path_factory.mktemp(request.param)
    model.save_pretrained(out, safe_serialization=True)
    save_tiny_tokenizer(out)
    return request.param, out, model.eval(), LLM(str(out), kv_cache_memory="16MiB")


def test_an_int8_kv_cache_is_refused_with_latent_attention(deepseek):
    from selfhost.errors import InvalidParameterError

    _, out, _, _ = deepseek
    with pytest.raises(InvalidParameterError, match="kv_cache_dtype='int8' needs keys and values"):
        LLM(str(out), kv_cache_dtype="int8", kv_cache_memory="16MiB")


def test_logits_match_transformers_at_prefill_and_decode(deepseek):
    _, _, ref, llm = deepseek
    model = llm.model
    prompt = torch.randint(3, model.spec.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0))
    ref_tokens, ref_prefill, ref_steps = reference_greedy(ref, prompt, DECODE_STEPS)
    cache = LatentKVCache(model.spec, 8, 16, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        logits = one_sequence_logits(model, cache, 8, prompt, ref_tokens[:-1])  # teacher-forced: like with like
    assert (logits[:PROMPT_LEN] - ref_prefill).abs().max().item() <= TOL
    decode = torch.cat([logits[PROMPT_LEN - 1 : PROMPT_LEN], logits[PROMPT_LEN:]])
    assert (decode - ref_steps).abs().max().item() <= TOL


def test_greedy_continuation_and_logprobs_match(deepseek):
    _, _, ref, llm = deepseek
    assert_greedy_and_logprobs_match(ref, llm, PROMPT_LEN, DECODE_STEPS, TOL)


def test_routing_spreads_is_group_limited_and_bias_corrected(deepseek):
    """The parity above means something for MoE only if tokens spread over experts and the group
    limit (and V3's bias) change choices; watched on the reference's own router."""
    name, _, ref, _ = deepseek
    seen = []
    router = ref.model.layers[1].mlp.gate
    handle = router.register_forward_hook(lambda module, args, out: seen.append(out))
    with torch.no_grad():
        ref(torch.randint(3, 512, (1, 64), generator=torch.Generator().manual_seed(2)))
    handle.remove()
    logits, _, chosen = seen[0]
    assert len(set(chosen.flatten().tolist())) >= 6  # of 8 experts
    scores = logits.sigmoid() if name == "deepseek_v3" else logits.softmax(-1)
    unlimited = scores.topk(chosen.shape[1], dim=-1).indices.sort(-1).values
    assert (unlimited != chosen.sort(-1).values).any(dim=-1).sum() >= 3  # the group limit moved some tokens
    assert not isinstance(ref.model.layers[0].mlp, type(ref.model.layers[1].mlp))  # the first layer is dense
    if name == "deepseek_v3":
        bias = router.e_score_correction_bias
        groups = (scores + bias).view(-1, 4, 2).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
        no_bias = scores.view(-1, 4, 2).topk(2, dim=-1).values.sum(-1).topk(2, dim=-1).indices
        assert (groups.sort(-1).values != no_bias.sort(-1).values).any()  # the bias changed a group choice


def test_batching_engine_matches_transformers_through_preemption_and_prefix_hits(deepseek):
    _, folder, ref, roomy = deepseek
    assert_batching_engine_matches(ref, folder, roomy, LatentKVCache, DECODE_STEPS)


def test_latent_cache_holds_rank_plus_rope_per_token_and_layer(deepseek):
    _, folder, _, llm = deepseek
    spec = llm.model.spec
    per_token = (32 + 8) * spec.num_layers * 4  # (kv_lora_rank + qk_rope_head_dim) x layers x fp32
    assert LatentKVCache.bytes_per_block(spec, 16, torch.float32) == 16 * per_token
    assert LatentKVCache.bytes_per_block(spec, 16, torch.bfloat16) == 16 * per_token // 2
    assert spec.kv_bytes_per_token * 4 == per_token  # what the planner and the server's figures read
    small = LLM(str(folder), kv_cache_memory=100 * 16 * per_token + 5)
    cache = small.engine.cache
    assert isinstance(cache, LatentKVCache) and small.engine.block_manager.num_blocks == 100
    assert cache.entries.numel() * cache.entries.element_size() == 100 * 16 * per_token
    # Against full keys and values for every head: 4 heads x (16 + 8 key + 24 value) = 192 numbers, not 40.
    assert spec.num_heads * (spec.qk_nope_head_dim + spec.qk_rope_head_dim + spec.v_head_dim) == 192


def test_decode_steps_never_expand_the_cache(deepseek, monkeypatch):
    """Decode-only steps go through the absorbed form: no head's keys or values are rebuilt."""
    _, _, _, llm = deepseek
    engine = llm.engine
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    engine.add_request("a", [1, 17, 42, 99, 7, 250, 31], params)
    engine.add_request("b", [1, 300, 12, 5], params)
    engine.step()  # both prompts (expanded), each sampling its first token
    calls = []
    monkeypatch.setattr(LatentAttention, "expand", lambda self, *a: calls.append(1) or (_ for _ in ()).throw(
        AssertionError("a decode step expanded the latent cache")))
    while engine.has_work:
        engine.step()
    assert not calls


@pytest.mark.parametrize("kv_b", ["fp32", "int8"])
def test_absorbed_decode_equals_expanded_attention(kv_b):
    """One query per sequence over ragged contexts: absorbed (latent space) == expanded (per-head keys)."""
    torch.manual_seed(0)
    attn = LatentAttention(0, hidden_size=32, num_heads=4, q_lora_rank=None, kv_lora_rank=24, qk_nope_head_dim=16,
                           qk_rope_head_dim=8, v_head_dim=12, scale=0.2, bias=False, rope_interleave=False)
    with torch.no_grad():
        for p in attn.parameters():
            p.normal_(0, 0.3)
    if kv_b == "int8":  # a quantized up-projection: the absorbed weights are read back through its product
        from selfhost.quant.int8 import Int8Linear

        attn.kv_b_proj = Int8Linear.from_float(attn.kv_b_proj)
    lengths, padded = [5, 23, 1], 32
    entries = torch.randn(len(lengths), padded, 24 + 8)
    q_nope, q_rope = torch.randn(len(lengths), 4, 16), torch.randn(len(lengths), 4, 8)
    mask = torch.full((len(lengths), 1, padded), float("-inf"))
    for i, n in enumerate(lengths):
        mask[i, :, :n] = 0
    with torch.inference_mode():
        absorbed = absorbed_attention(q_nope, q_rope, entries, mask, *attn.absorbed_weights(), 0.2)
        for i, n in enumerate(lengths):
            expanded = expanded_attention(q_nope[i : i + 1], q_rope[i : i + 1], entries[i, :n, :24], entries[i, :n, 24:],
                                          attn, n - 1, 0.2)
            assert (absorbed[i] - expanded[0]).abs().max().item() < 1e-5
