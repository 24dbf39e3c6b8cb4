"""LangChain's `ChatOpenAI` pointed at selfhost, unchanged: the text is the engine's own greedy answer."""

from __future__ import annotations

import pytest
from langchain_openai import ChatOpenAI

from selfhost import SamplingParams
from tests.server.conftest import MODEL

MESSAGES = [("system", "You are terse."), ("human", "To be, or not")]
MAX_TOKENS = 12


@pytest.fixture(scope="module")
def expected(tiny_llm) -> str:
    """The offline engine's greedy answer to the same conversation."""
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "To be, or not"}]
    params = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)
    return tiny_llm.chat(messages, params)[0].text


@pytest.fixture
def chat_model(server):
    return ChatOpenAI(
        model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=0, max_tokens=MAX_TOKENS,
        max_retries=0, timeout=60, extra_body={"ignore_eos": True}, stream_usage=True,
    )


def test_invoke(chat_model, expected):
    reply = chat_model.invoke(MESSAGES)
    assert reply.content == expected
    assert reply.usage_metadata["output_tokens"] == MAX_TOKENS
    assert reply.response_metadata["finish_reason"] == "length"


def test_stream(chat_model, expected):
    chunks = list(chat_model.stream(MESSAGES))
    assert len([c for c in chunks if c.content]) > 1  # token by token, not one lump
    assert "".join(c.content for c in chunks) == expected
    assert sum(c.usage_metadata["output_tokens"] for c in chunks if c.usage_metadata) == MAX_TOKENS
