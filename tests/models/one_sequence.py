"""Helpers for parity tests that drive a paged cache by hand: one sequence, prefill then decode steps."""

from __future__ import annotations

import torch

from selfhost.engine.paged_cache import StepMetadata


def reference_greedy(ref, prompt: torch.Tensor, steps: int):
    """Greedy continuation recomputing the whole sequence each step (no cache to get wrong):
    (tokens, prefill logits (P, vocab), each step's logits (steps, vocab))."""
    ids, step_logits = prompt.clone(), []
    with torch.no_grad():
        for _ in range(steps):
            logits = ref(ids[None]).logits[0, -1]
            step_logits.append(logits)
            ids = torch.cat([ids, logits.argmax().view(1)])
        prefill = ref(prompt[None]).logits[0]
    return ids[len(prompt):].tolist(), prefill, torch.stack(step_logits)


def one_sequence_logits(model, cache, num_blocks: int, prompt: torch.Tensor, tokens: list[int]) -> torch.Tensor:
    """Prefill `prompt` as one chunk in blocks 0..num_blocks-1, then feed `tokens` one per step as single-token
    queries (the decode path); logits of every prompt row, then of every fed token."""
    table = torch.arange(num_blocks)
    cache.meta = StepMetadata(slot_mapping=torch.arange(len(prompt)), num_single=0, single_block_tables=None,
                              single_context_lens=None, chunks=[(0, len(prompt), 0, table)])
    rows = [model.compute_logits(model(prompt, torch.arange(len(prompt)), cache))]
    for i, token in enumerate(tokens):
        pos = len(prompt) + i
        cache.meta = StepMetadata(slot_mapping=torch.tensor([pos]), num_single=1,
                                  single_block_tables=table[None, : pos // cache.block_size + 1],
                                  single_context_lens=torch.tensor([pos + 1]), chunks=[])
        rows.append(model.compute_logits(model(torch.tensor([token]), torch.tensor([pos]), cache)))
    cache.meta = None
    return torch.cat(rows)


def assert_greedy_and_logprobs_match(ref, llm, prompt_len: int, steps: int, tol: float) -> None:
    """`llm.generate`'s greedy tokens equal the reference's, and its logprobs are the reference's within `tol`."""
    from selfhost import SamplingParams

    prompt = torch.randint(3, llm.model.spec.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1))
    ref_tokens, _, ref_steps = reference_greedy(ref, prompt, steps)
    out = llm.generate(prompt.tolist(), SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True,
                                                       logprobs=3))[0]
    assert out.token_ids == ref_tokens
    ref_logprobs = ref_steps.log_softmax(dim=-1)
    for step, lp in enumerate(out.logprobs):
        assert abs(lp.logprob - ref_logprobs[step, lp.token_id].item()) <= tol


def assert_batching_engine_matches(ref, folder, roomy, cache_type, steps: int) -> None:
    """Mixed lengths in one batch, a repeated prompt (prefix-cache hits), and a cache too small for all of
    them at once (preemption, recomputation) give transformers' own greedy tokens; `cache_type`: the
    engine's KV store for this model."""
    from selfhost import LLM, SamplingParams

    shared = [1, 17, 42, 99, 7, 250, 31, 8, 64, 300, 12, 5, 77, 3, 90, 11, 23, 45]
    prompts = [shared + [i, i + 1] for i in range(4, 8)] + [[1, 250, 31, 8, 64], shared[:9], shared + shared]
    params = SamplingParams(max_tokens=steps, temperature=0, ignore_eos=True)
    expected = []
    with torch.no_grad():
        for prompt in prompts:
            out = ref.generate(torch.tensor([prompt]), max_new_tokens=steps, do_sample=False,
                               eos_token_id=None, pad_token_id=0)
            expected.append(out[0, len(prompt):].tolist())
    assert [o.token_ids for o in roomy.generate(prompts, params)] == expected
    hits = roomy.engine.block_manager.prefix_hit_tokens
    assert [o.token_ids for o in roomy.generate(prompts, params)] == expected  # again: served from cached blocks
    assert roomy.engine.block_manager.prefix_hit_tokens > hits
    block_bytes = cache_type.bytes_per_block(roomy.model.spec, 16, torch.float32)
    tight = LLM(str(folder), kv_cache_memory=10 * block_bytes)  # a few of the 7 sequences at a time
    assert isinstance(tight.engine.cache, cache_type)
    assert [o.token_ids for o in tight.generate(prompts, params)] == expected
    assert tight.engine.scheduler.num_preemptions > 0
