"""The official `openai` client against a real server: chat, completions, streaming, n, stop, seed, logprobs."""

from __future__ import annotations


from tests.server.conftest import MODEL

MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "To be, or not"}]


def test_models(openai_client):
    assert [m.id for m in openai_client.models.list()] == [MODEL]
    assert openai_client.models.retrieve(MODEL).id == MODEL


def test_chat_usage_counts_tokens_exactly(openai_client, server):
    out = openai_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0,
                                                extra_body={"ignore_eos": True})
    tokenizer = server.app.state.models.models[MODEL].llm.tokenizer
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-") and out.created > 0
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(MESSAGES))
    assert out.usage.completion_tokens == 12 and out.choices[0].finish_reason == "length"
    assert out.usage.total_tokens == out.usage.prompt_tokens + 12
    assert out.choices[0].message.role == "assistant" and out.choices[0].message.content


def test_chat_stream_matches_non_stream(openai_client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_completion_tokens=10, temperature=0)
    whole = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    stream = openai_client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens <= 10
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] in (
        ["length"], ["stop"])


def test_n_choices_and_seed_reproducibility(openai_client):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=8, temperature=1.0, seed=1234, n=2)
    first = openai_client.chat.completions.create(**kwargs)
    second = openai_client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert first.choices[0].message.content != first.choices[1].message.content  # seed + i per choice
    assert 2 <= first.usage.completion_tokens <= 16


def test_n_choices_streamed(openai_client):
    stream = openai_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, n=2, seed=3,
                                                   stream=True)
    finished = {c.choices[0].index for c in stream if c.choices and c.choices[0].finish_reason}
    assert finished == {0, 1}


def test_stop_string_ends_the_text(openai_client):
    base = openai_client.completions.create(model=MODEL, prompt="To be", max_tokens=24, temperature=0,
                                            extra_body={"ignore_eos": True}).choices[0].text
    stop = base[len(base) // 2 :][:3]
    assert stop.strip(), base
    out = openai_client.completions.create(model=MODEL, prompt="To be", max_tokens=24, temperature=0, stop=[stop],
                                           extra_body={"ignore_eos": True}).choices[0]
    assert out.finish_reason == "stop" and stop not in out.text and base.startswith(out.text)


def test_chat_logprobs(openai_client):
    out = openai_client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                                logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    content = out.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0 and len(entry.top_logprobs) == 3
        assert entry.logprob >= entry.top_logprobs[0].logprob - 1e-4 or entry.token == entry.top_logprobs[0].token


def test_completions_echo_and_logprobs(openai_client):
    out = openai_client.completions.create(model=MODEL, prompt="To be, or", max_tokens=4, temperature=0,
                                           echo=True, logprobs=2, extra_body={"ignore_eos": True})
    choice = out.choices[0]
    assert out.object == "text_completion" and choice.text.startswith("To be, or")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None and all(v <= 0 for v in lp.token_logprobs[-4:])
    assert len(lp.tokens) == out.usage.prompt_tokens + 4 == len(lp.text_offset)


def test_completions_batch_prompts_and_token_ids(openai_client):
    out = openai_client.completions.create(model=MODEL, prompt=["To be", "or not"], max_tokens=3, n=2,
                                           extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2, 3] and out.usage.completion_tokens == 12
    ids = openai_client.completions.create(model=MODEL, prompt=[1, 50, 60, 70], max_tokens=2)
    assert ids.usage.prompt_tokens == 4


def test_completions_stream(openai_client):
    chunks = list(openai_client.completions.create(model=MODEL, prompt="To be", max_tokens=5, stream=True,
                                                   stream_options={"include_usage": True},
                                                   extra_body={"ignore_eos": True}))
    assert chunks[-1].usage.completion_tokens == 5
    assert chunks[-2].choices[0].finish_reason == "length"


def test_unknown_fields_are_ignored(http):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, "parallel_tool_calls": False,
            "some_future_field": {"x": 1}, "metadata": {"a": "b"}}
    assert http.post("/v1/chat/completions", json=body).status_code == 200
