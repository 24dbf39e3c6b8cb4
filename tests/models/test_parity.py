"""Every native family against transformers on the same tiny random weights."""

import pytest
import torch
import transformers

from selfhost import LLM, SamplingParams
from selfhost.engine.kv_cache import ContiguousKVCache
from tests.tiny_models import TINY_CONFIGS
from tests.models.one_sequence import reference_greedy

PROMPT_LEN = 40  # longer than every tiny sliding window (16, 20)
DECODE_STEPS = 32
TOL = 1e-4


@pytest.fixture(scope="module", params=sorted(TINY_CONFIGS))
def pair(request, tiny_checkpoint):
    path = tiny_checkpoint(request.param)
    ref = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return LLM(str(path), device="cpu"), ref


def test_logits_match_transformers_at_prefill_and_decode(pair):
    llm, ref = pair
    prompt = torch.randint(3, llm.model.spec.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(0))
    ref_tokens, ref_prefill, ref_steps = reference_greedy(ref, prompt, DECODE_STEPS)

    model = llm.model
    kv = ContiguousKVCache(model.spec, 128, torch.float32, torch.device("cpu"))
    with torch.inference_mode():
        kv.begin_step(PROMPT_LEN)
        prefill = model.compute_logits(model(prompt, torch.arange(PROMPT_LEN), kv))
        kv.end_step(PROMPT_LEN)
        decode = [prefill[-1]]
        # Teacher-force the reference's tokens so every step compares like with like.
        for i, token in enumerate(ref_tokens[:-1]):
            pos = PROMPT_LEN + i
            kv.begin_step(1)
            decode.append(model.compute_logits(model(torch.tensor([token]), torch.tensor([pos]), kv))[0])
            kv.end_step(1)
    assert (prefill - ref_prefill).abs().max().item() <= TOL
    assert (torch.stack(decode) - ref_steps).abs().max().item() <= TOL


def test_greedy_continuation_and_logprobs_match(pair):
    llm, ref = pair
    prompt = torch.randint(3, llm.model.spec.vocab_size, (PROMPT_LEN,), generator=torch.Generator().manual_seed(1))
    ref_tokens, _, ref_steps = reference_greedy(ref, prompt, DECODE_STEPS)

    params = SamplingParams(max_tokens=DECODE_STEPS, temperature=0, ignore_eos=True, logprobs=5)
    out = llm.generate(prompt.tolist(), params)[0]
    assert out.token_ids == ref_tokens
    assert out.finish_reason == "length"

    ref_logprobs = ref_steps.log_softmax(dim=-1)
    for step, lp in enumerate(out.logprobs):
        assert abs(lp.logprob - ref_logprobs[step, lp.token_id].item()) <= TOL
        top_ref = ref_logprobs[step].topk(5)
        assert list(lp.top) == top_ref.indices.tolist()
        assert max(abs(a - b) for a, b in zip(lp.top.values(), top_ref.values.tolist())) <= TOL
