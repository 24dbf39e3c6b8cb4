"""Greedy identity where bf16 products switch to AMX tiles (which round the activations to bf16) past a
few rows: a step with verifications picks its kernels for its number of sequences, as a plain decode step
of those sequences does, so each checked position gets the plain step's bits."""

import pytest

from selfhost import LLM, SamplingParams
from selfhost.layers.bf16_linear import amx_available
from selfhost.models import bf16_weights

QUOTE = ("To be, or not to be, that is the question: Whether 'tis nobler in the mind to suffer The slings and "
         "arrows of outrageous fortune, Or to take arms against a sea of troubles")
PROMPTS = [QUOTE, QUOTE[:60], "ROMEO:\nWhat light", QUOTE + " " + QUOTE]


@pytest.mark.skipif(not amx_available(), reason="the few-row/AMX switch exists only on CPUs with AMX")
def test_single_streams_keep_their_greedy_output_when_two_rows_already_take_amx(monkeypatch):
    monkeypatch.setattr(bf16_weights, "measure_few_rows_max", lambda *args, **kwargs: 1)  # AMX from 2 rows
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    plain = LLM(None, weight_dtype="bfloat16")
    speculative = LLM(None, weight_dtype="bfloat16", speculative="ngram", num_speculative_tokens=4)
    batched = [o.token_ids for o in speculative.generate(PROMPTS, params)]  # 4 sequences: AMX in both
    assert batched == [o.token_ids for o in plain.generate(PROMPTS, params)]
    for prompt in PROMPTS:  # one stream (prompts now cached): plain steps of 1 row, verifications up to 5
        assert speculative.generate([prompt], params)[0].token_ids == plain.generate([prompt], params)[0].token_ids
    assert speculative.engine.stats().spec_accepted_tokens > 0  # verifications ran
