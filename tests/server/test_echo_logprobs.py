"""/v1/completions with `echo` and `logprobs`: the echoed prompt is scored like the engine scores it."""

from __future__ import annotations

import pytest

from selfhost import SamplingParams
from tests.server.conftest import MODEL

PROMPT = "To be, or not to be, that is the question"
TOL = 1e-5


@pytest.fixture(scope="module")
def engine_scores(tiny_llm):
    """The offline engine's prompt logprobs (top 2) and greedy continuation for PROMPT: what the server must echo."""
    params = SamplingParams(max_tokens=3, temperature=0, ignore_eos=True, prompt_logprobs=2, logprobs=2)
    return tiny_llm.generate(PROMPT, params)[0]


def check_echo(lp, expected, tokenizer, num_generated: int = 3):
    prompt_ids = expected.prompt_token_ids
    n = len(prompt_ids)
    assert lp.tokens[:n] == [tokenizer.token_text(t) for t in prompt_ids]
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None  # nothing predicts the first token
    for i in range(1, n):
        entry = expected.prompt_logprobs[i]
        assert abs(lp.token_logprobs[i] - entry.logprob) <= TOL
        want = {tokenizer.token_text(t): v for t, v in entry.top.items()}
        assert lp.top_logprobs[i].keys() == want.keys()
        assert all(abs(lp.top_logprobs[i][k] - v) <= TOL for k, v in want.items())
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == n + num_generated
    # Offsets index the returned text (prompt + completion); BOS is not in it and takes no room.
    text = PROMPT + expected.text
    for token, token_id, at in zip(lp.tokens, prompt_ids + expected.token_ids, lp.text_offset):
        assert token_id in tokenizer.hf.all_special_ids or text[at:].startswith(token)
    assert lp.text_offset[n] == len(PROMPT)
    generated = [e.logprob for e in expected.logprobs]
    assert all(abs(a - b) <= TOL for a, b in zip(lp.token_logprobs[n:], generated))


def test_echo_logprobs_score_the_prompt(openai_client, server, engine_scores):
    tokenizer = server.app.state.models.models[MODEL].llm.tokenizer
    kwargs = dict(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2,
                  extra_body={"ignore_eos": True})
    for _ in range(2):  # the second request's prompt blocks are in the prefix cache; it is still scored in full
        out = openai_client.completions.create(**kwargs)
        choice = out.choices[0]
        assert choice.text == PROMPT + engine_scores.text
        check_echo(choice.logprobs, engine_scores, tokenizer)


def test_echo_logprobs_stream(openai_client, server, engine_scores):
    tokenizer = server.app.state.models.models[MODEL].llm.tokenizer
    chunks = list(openai_client.completions.create(
        model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=2, stream=True,
        extra_body={"ignore_eos": True}))
    first = chunks[0].choices[0]
    assert first.text == PROMPT
    merged = type(first.logprobs)(tokens=[], token_logprobs=[], top_logprobs=[], text_offset=[])
    for c in chunks:
        for field in ("tokens", "token_logprobs", "top_logprobs", "text_offset"):
            getattr(merged, field).extend(getattr(c.choices[0].logprobs, field))
    assert "".join(c.choices[0].text for c in chunks) == PROMPT + engine_scores.text
    check_echo(merged, engine_scores, tokenizer)


def test_logprobs_without_echo_do_not_score_the_prompt(openai_client):
    out = openai_client.completions.create(model=MODEL, prompt=PROMPT, max_tokens=3, temperature=0, logprobs=1,
                                           extra_body={"ignore_eos": True})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 3 and None not in lp.token_logprobs
