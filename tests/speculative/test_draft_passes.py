"""A draft model's greedy passes in one C call (DecodeLayers.greedy_passes) against the pass-by-pass path."""

from __future__ import annotations

import pytest
import torch

from selfhost import LLM
from selfhost.engine.decode_layers import DecodeLayers, runner_available
from selfhost.speculative.draft import DraftProposer
from tests.speculative.conftest import always
from tests.speculative.test_engine import run_batch, workload

needs_runner = pytest.mark.skipif(not runner_available("fp32"),
                                  reason="the one-call decode runner: AVX-512 and selfhost's compiled kernels")


@pytest.fixture(scope="module")
def draft(noisy_copy, target):
    return noisy_copy(target, noise=0.5, seed=11)


def recorded_run(target, draft, fused: bool, monkeypatch):
    """Outputs, every proposal made, the draft's cache and how many fused calls ran, of one batch."""
    llm = always(LLM(target, speculative=f"draft:{draft}", num_speculative_tokens=4, kv_cache_memory="4MiB"))
    proposer = llm.engine.speculator.draft
    if not fused:
        proposer._fused = None  # pass by pass, through the engine's runner
    proposals, calls = [], []
    propose, passes = DraftProposer.propose, DecodeLayers.greedy_passes

    def recording(self, seqs, lengths):
        made = propose(self, seqs, lengths)
        proposals.append([p.tokens for p in made])
        return made

    monkeypatch.setattr(DraftProposer, "propose", recording)
    monkeypatch.setattr(DecodeLayers, "greedy_passes", lambda self, *args: calls.append(1) or passes(self, *args))
    prompts, params = workload(n=6, seed=3)
    outputs = [o.token_ids for o in run_batch(llm, prompts, params)]
    return outputs, proposals, (proposer.cache.k.clone(), proposer.cache.v.clone()), len(calls)


@needs_runner
def test_fused_passes_propose_and_cache_what_the_pass_by_pass_path_does(target, draft, monkeypatch):
    out_ref, proposals_ref, cache_ref, fused_ref = recorded_run(target, draft, False, monkeypatch)
    monkeypatch.undo()
    out, proposals, cache, fused_calls = recorded_run(target, draft, True, monkeypatch)
    assert fused_ref == 0 and fused_calls > 0  # the fused path ran, and only where asked
    assert out == out_ref
    assert proposals == proposals_ref  # the same tokens, step by step, several sequences of several lengths
    assert any(len({len(t) for t in step if t}) > 1 for step in proposals)  # lengths differed within a step
    assert torch.equal(cache[0], cache_ref[0]) and torch.equal(cache[1], cache_ref[1])


@needs_runner
def test_fused_passes_refuse_lengths_or_positions_out_of_range(target):
    llm = LLM(target, speculative=f"draft:{target}", kv_cache_memory="4MiB")
    proposer = llm.engine.speculator.draft
    runner, head_kind = proposer._fused_runner()
    head = proposer.model.lm_head
    tokens = torch.zeros(2, 3, dtype=torch.int64)
    tables = torch.zeros(2, 1, dtype=torch.int64)
    starts = torch.tensor([4, 4])
    last = torch.zeros(2, dtype=torch.int64)
    for wanted, at, why in (([1, 3], starts, "longest first"), ([3, 0], starts, "at least one"),
                            ([3, 3], torch.tensor([runner.rotary_rows, 4]), "past the rotary table"),
                            ([3, 3], torch.tensor([proposer.blocks.block_size, 4]), "past the block table")):
        with pytest.raises(ValueError, match="out of range"):
            runner.greedy_passes(head, head_kind, None, last, tokens, at, tables, torch.tensor(wanted), 1)
    tokens[0, 0] = llm.model.spec.vocab_size  # a given first proposal that is no token
    with pytest.raises(ValueError, match="out of range"):
        runner.greedy_passes(head, head_kind, None, last, tokens, starts, tables, torch.tensor([3, 3]), 1)
