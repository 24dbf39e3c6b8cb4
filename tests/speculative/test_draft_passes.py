"""A draft model's greedy passes in one C call (DecodeLayers.greedy_passes) against the pass-by-pass path."""

from __future__ import annotations

import numpy as np
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


def call(runner, head, head_kind, lengths, wanted, froms, tables, proposals, catch_up, passes=3):
    """greedy_passes on a buffer laid out as the C call reads it; the buffer back."""
    n, width = len(lengths), len(tables[0])
    fields = np.array([*lengths, *wanted, *froms, *[b for row in tables for b in row], *proposals, *catch_up],
                      dtype=np.int64)
    runner.greedy_passes(head, head_kind, fields.ctypes.data, n, passes, width, len(catch_up), 1)
    return fields


@needs_runner
def test_fused_passes_refuse_lengths_positions_blocks_or_ids_out_of_range(target):
    llm = LLM(target, speculative=f"draft:{target}", kv_cache_memory="4MiB")
    proposer = llm.engine.speculator.draft
    runner, head_kind = proposer._fused_runner()
    head, vocab, bs = proposer.model.lm_head, llm.model.spec.vocab_size, proposer.blocks.block_size
    given = [5, 0, 0, 6, 0, 0]  # first proposals given (no catch-up rows)
    fine = dict(lengths=[4, 4], wanted=[3, 3], froms=[3, 3], tables=[[0], [1]], proposals=given, catch_up=[])
    assert call(runner, head, head_kind, **fine)[-6:].tolist() != given  # in range: passes 1 and 2 ran
    for change, message in (
        (dict(wanted=[1, 3]), "out of range"),  # not largest first
        (dict(wanted=[3, 0]), "out of range"),  # a sequence that wants nothing
        (dict(lengths=[runner.rotary_rows, 4], tables=[[0] * 64, [1] * 64]), "out of range"),  # past the rotary table
        (dict(lengths=[bs, 4]), "out of range"),  # past the block table's width
        (dict(tables=[[proposer.cache.num_blocks], [1]]), "names no block"),
        (dict(proposals=[vocab, 0, 0, 6, 0, 0]), "out of range"),  # a given first proposal that is no token
        (dict(froms=[2, 3], catch_up=[7, vocab, 8]), "outside the embedding"),
        (dict(froms=[2, 3], catch_up=[7, 8]), "do not add up"),
    ):
        with pytest.raises(ValueError, match=message):
            call(runner, head, head_kind, **{**fine, **change})
