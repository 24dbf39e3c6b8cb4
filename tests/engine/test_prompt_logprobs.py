"""Prompt logprobs (`SamplingParams.prompt_logprobs`) against transformers' own logits."""

import pytest
import torch
import transformers

from selfhost import LLM, SamplingParams
from selfhost.errors import InvalidParameterError

PROMPT_LEN = 40
TOP = 3
TOL = 1e-4


@pytest.fixture(scope="module")
def reference(tiny_checkpoint):
    path = tiny_checkpoint("llama")
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def random_prompt(seed: int, length: int = PROMPT_LEN) -> list[int]:
    return torch.randint(3, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def reference_logprobs(ref, prompt: list[int]) -> torch.Tensor:
    """(len - 1, vocab): row i is the distribution of prompt token i + 1 given tokens 0..i."""
    with torch.no_grad():
        return ref(torch.tensor([prompt])).logits[0, :-1].float().log_softmax(dim=-1)


def assert_matches(ref_lp: torch.Tensor, prompt: list[int], entries, top: int = TOP):
    assert len(entries) == len(prompt)
    assert entries[0] is None  # nothing predicts the first token
    for i, entry in enumerate(entries[1:]):
        assert entry.token_id == prompt[i + 1]
        assert abs(entry.logprob - ref_lp[i, prompt[i + 1]].item()) <= TOL
        ref_vals, ref_ids = ref_lp[i].topk(top)
        assert list(entry.top) == ref_ids.tolist()
        assert max(abs(entry.top[t] - v) for t, v in zip(ref_ids.tolist(), ref_vals.tolist())) <= TOL


def greedy(prompt_logprobs=None, max_tokens=4) -> SamplingParams:
    return SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, prompt_logprobs=prompt_logprobs)


def test_prompt_logprobs_equal_transformers(tiny_llm, reference):
    prompt = random_prompt(0)
    out = tiny_llm.generate(prompt, greedy(TOP))[0]
    assert_matches(reference_logprobs(reference, prompt), prompt, out.prompt_logprobs)
    # Asking for them changes nothing about the generated tokens.
    assert out.token_ids == tiny_llm.generate(prompt, greedy())[0].token_ids
    assert tiny_llm.generate(prompt, greedy())[0].prompt_logprobs is None


def test_requests_without_prompt_logprobs_never_score_prompt_rows(tiny_llm, monkeypatch):
    def fail(*args):
        raise AssertionError("prompt rows were scored for a request that did not ask")

    monkeypatch.setattr(tiny_llm.engine.runner, "_score_prompts", fail)
    out = tiny_llm.generate([random_prompt(7), random_prompt(8, 3)], greedy(max_tokens=8))
    assert all(len(o.token_ids) == 8 and o.prompt_logprobs is None for o in out)


def test_chunked_prefill_batched_with_others(tiny_checkpoint, reference):
    # 7 tokens per step: every 40-token prompt is split across several steps and chunks share steps.
    llm = LLM(str(tiny_checkpoint("llama")), device="cpu", max_num_batched_tokens=7, kv_cache_memory="8MiB")
    prompts = [random_prompt(1), random_prompt(2, 23), random_prompt(3)]
    params = [greedy(TOP), greedy(), greedy(1)]
    outs = [llm.engine.add_request(f"r{i}", p, sp) for i, (p, sp) in enumerate(zip(prompts, params))]
    while any(not s.is_finished for s in outs):
        llm.engine.step()
    assert_matches(reference_logprobs(reference, prompts[0]), prompts[0], outs[0].to_output().prompt_logprobs)
    assert outs[1].to_output().prompt_logprobs is None
    assert_matches(reference_logprobs(reference, prompts[2]), prompts[2], outs[2].to_output().prompt_logprobs, top=1)


def test_prefix_cache_hit_is_not_used_for_prompt_logprobs(tiny_checkpoint, reference):
    llm = LLM(str(tiny_checkpoint("llama")), device="cpu", kv_cache_memory="8MiB")
    prompt = random_prompt(4, 50)  # three full 16-token blocks before the last token
    llm.generate(prompt, greedy())  # caches the prompt's full blocks
    before = llm.engine.block_manager.prefix_hit_tokens
    out = llm.generate(prompt, greedy(TOP))[0]
    assert llm.engine.block_manager.prefix_hit_tokens == before  # computed in full
    assert_matches(reference_logprobs(reference, prompt), prompt, out.prompt_logprobs)
    llm.generate(prompt, greedy())  # and plain requests still hit the cache
    assert llm.engine.block_manager.prefix_hit_tokens == before + 48


def test_request_preempted_mid_prompt_scores_each_token_once(tiny_checkpoint, reference):
    # 6 blocks of 16 tokens, 16 tokens per step: while the first request decodes, the second is
    # preempted half-way through its 50-token prompt and later recomputes it from the start.
    llm = LLM(str(tiny_checkpoint("llama")), device="cpu", kv_cache_memory=6 * llm_block_bytes(tiny_checkpoint),
              max_num_batched_tokens=16)
    prompts = [random_prompt(5), random_prompt(6, 50)]
    outs = llm.generate(prompts, greedy(TOP, max_tokens=40))
    assert llm.engine.scheduler.num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert_matches(reference_logprobs(reference, prompt), prompt, out.prompt_logprobs)


def llm_block_bytes(tiny_checkpoint) -> int:
    from selfhost.engine.paged_cache import PagedKVCache

    llm = LLM(str(tiny_checkpoint("llama")), device="cpu", kv_cache_memory="1MiB")
    return PagedKVCache.bytes_per_block(llm.model.spec, llm.engine_config.block_size, llm.dtype)


@pytest.mark.parametrize("value", [-1, 21])
def test_prompt_logprobs_out_of_range_is_rejected(value):
    with pytest.raises(InvalidParameterError, match="prompt_logprobs"):
        SamplingParams(prompt_logprobs=value)
