"""LlamaIndex's OpenAI-compatible LLM (`OpenAILike`) pointed at selfhost: completion and chat, whole and streamed.

`OpenAILike` rather than `llama_index.llms.openai.OpenAI`, which only accepts
OpenAI's own model names (it looks their context windows up in a fixed table).
"""

from __future__ import annotations

import pytest
from llama_index.core.llms import ChatMessage
from llama_index.llms.openai_like import OpenAILike

from selfhost import SamplingParams
from tests.server.conftest import MODEL

PROMPT = "To be, or not to be"
MESSAGES = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "To be, or not"}]
MAX_TOKENS = 12
GREEDY = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True)


def make_llm(server, is_chat_model: bool):
    return OpenAILike(
        model=MODEL, api_base=server.url + "/v1", api_key="unused", is_chat_model=is_chat_model,
        context_window=512, max_tokens=MAX_TOKENS, temperature=0, max_retries=0, timeout=60,
        additional_kwargs={"extra_body": {"ignore_eos": True}},
    )


@pytest.fixture(scope="module")
def expected(tiny_llm) -> dict[str, str]:
    """The offline engine's greedy texts for the same prompt and conversation."""
    return {"complete": tiny_llm.generate(PROMPT, GREEDY)[0].text, "chat": tiny_llm.chat(MESSAGES, GREEDY)[0].text}


def test_complete_and_stream_complete(server, expected):
    llm = make_llm(server, is_chat_model=False)
    assert llm.complete(PROMPT).text == expected["complete"]
    deltas = [r.delta for r in llm.stream_complete(PROMPT)]
    assert len([d for d in deltas if d]) > 1
    assert "".join(d or "" for d in deltas) == expected["complete"]


def test_chat_and_stream_chat(server, expected):
    llm = make_llm(server, is_chat_model=True)
    messages = [ChatMessage(role=m["role"], content=m["content"]) for m in MESSAGES]
    assert llm.chat(messages).message.content == expected["chat"]
    deltas = [r.delta for r in llm.stream_chat(messages)]
    assert len([d for d in deltas if d]) > 1
    assert "".join(d or "" for d in deltas) == expected["chat"]
