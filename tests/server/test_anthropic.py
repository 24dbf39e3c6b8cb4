"""The Anthropic Messages API through the official `anthropic` client, with x-api-key auth.

The tiny checkpoint has random weights, so tool calls are shaped by the grammar alone:
with tool_choice "any" every answer must be one valid tool_use block.
"""

from __future__ import annotations

import anthropic
import httpx
import jsonschema
import pytest

from tests.server.conftest import MODEL, start_long_context_server

KEY = "test-key"
USER = [{"role": "user", "content": "Hello"}]
ADD = {"name": "add", "description": "Add two numbers", "input_schema": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}
CITY = {"name": "city", "input_schema": {
    "type": "object", "properties": {"name": {"enum": ["Paris", "Rome"]}}, "required": ["name"]}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """The tiny Llama with a 4k context, behind a key."""
    srv = start_long_context_server(tmp_path_factory, api_key=[KEY])
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return anthropic.Anthropic(base_url=server.url, api_key=KEY, max_retries=0, timeout=60)


def test_create_text(client):
    # This SDK release no longer takes sampling arguments; the API (and selfhost) still does.
    out = client.messages.create(model=MODEL, max_tokens=12, system=[{"type": "text", "text": "Be brief."}],
                                 messages=USER, extra_body={"seed": 1, "temperature": 0.7, "top_k": 50})
    assert out.type == "message" and out.role == "assistant" and out.model == MODEL
    assert out.id.startswith("msg_")
    assert out.stop_reason in ("end_turn", "max_tokens")
    assert out.usage.input_tokens > 0 and 0 < out.usage.output_tokens <= 12
    assert all(b.type == "text" for b in out.content)


def test_max_tokens_is_the_stop_reason_at_the_limit(client):
    out = client.messages.create(model=MODEL, max_tokens=3, messages=USER, extra_body={"seed": 0, "ignore_eos": True})
    if out.usage.output_tokens == 3:
        assert out.stop_reason == "max_tokens"


def test_stop_sequence_is_reported(client):
    # Unconstrained, the tiny model writes bytes at random; a one-character stop sequence soon matches.
    plain = client.messages.create(model=MODEL, max_tokens=60, messages=USER, extra_body={"seed": 3})
    stop = next((c for c in plain.content[0].text[5:] if c.strip()), None) if plain.content else None
    if stop is None:
        pytest.skip("the sample has no visible character to stop at")
    out = client.messages.create(model=MODEL, max_tokens=60, messages=USER, stop_sequences=[stop],
                                 extra_body={"seed": 3})
    assert out.stop_reason == "stop_sequence" and out.stop_sequence == stop
    assert stop not in (out.content[0].text if out.content else "")


def test_stream_matches_create(client):
    kwargs = dict(model=MODEL, max_tokens=16, messages=USER, extra_body={"seed": 5})
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        kinds = [event.type for event in stream]
        final = stream.get_final_message()
    assert kinds[0] == "message_start" and kinds[-1] == "message_stop"
    assert "message_delta" in kinds
    assert [b.model_dump() for b in final.content] == [b.model_dump() for b in whole.content]
    assert final.stop_reason == whole.stop_reason
    assert final.usage.output_tokens == whole.usage.output_tokens
    # The stream ran the same prompt after `create`: its cache held the prompt's whole blocks.
    assert final.usage.cache_read_input_tokens > 0 and final.usage.cache_read_input_tokens % 16 == 0
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens == (
        whole.usage.input_tokens + whole.usage.cache_read_input_tokens)


def _check_tool_use(message, tools):
    schemas = {t["name"]: t["input_schema"] for t in tools}
    uses = [b for b in message.content if b.type == "tool_use"]
    assert uses and message.stop_reason == "tool_use"
    for block in uses:
        assert block.id.startswith("toolu_")
        jsonschema.validate(block.input, schemas[block.name])
    return uses


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tool_choice_any_gives_valid_tool_use(client, seed):
    out = client.messages.create(model=MODEL, max_tokens=600, messages=USER, tools=[ADD, CITY],
                                 tool_choice={"type": "any"}, extra_body={"seed": seed})
    _check_tool_use(out, [ADD, CITY])


def test_named_tool_choice(client):
    out = client.messages.create(model=MODEL, max_tokens=600, messages=USER, tools=[ADD, CITY],
                                 tool_choice={"type": "tool", "name": "city"}, extra_body={"seed": 4})
    assert {b.name for b in _check_tool_use(out, [ADD, CITY])} == {"city"}


def test_streamed_tool_use_matches_create(client):
    kwargs = dict(model=MODEL, max_tokens=600, messages=USER, tools=[ADD], tool_choice={"type": "any"},
                  extra_body={"seed": 7})
    whole = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        deltas = [e for e in stream if e.type == "content_block_delta"]
        final = stream.get_final_message()
    assert any(d.delta.type == "input_json_delta" for d in deltas)
    assert [(b.name, b.input) for b in _check_tool_use(final, [ADD])] == \
        [(b.name, b.input) for b in _check_tool_use(whole, [ADD])]


def test_tool_result_round_trip(client):
    first = client.messages.create(model=MODEL, max_tokens=600, messages=USER, tools=[ADD],
                                   tool_choice={"type": "any"}, extra_body={"seed": 1})
    use = _check_tool_use(first, [ADD])[0]
    messages = USER + [{"role": "assistant", "content": [b.model_dump() for b in first.content]},
                       {"role": "user", "content": [{"type": "tool_result", "tool_use_id": use.id,
                                                     "content": [{"type": "text", "text": "42"}]}]}]
    out = client.messages.create(model=MODEL, max_tokens=8, messages=messages, tools=[ADD],
                                 tool_choice={"type": "none"})
    assert out.stop_reason in ("end_turn", "max_tokens")
    assert all(b.type == "text" for b in out.content)


def test_count_tokens(client):
    plain = client.messages.count_tokens(model=MODEL, messages=USER)
    with_tools = client.messages.count_tokens(model=MODEL, messages=USER, tools=[ADD])
    created = client.messages.create(model=MODEL, max_tokens=1, messages=USER)
    # Anthropic's input_tokens leaves out what the cache held (this prompt may have run before)
    assert plain.input_tokens == created.usage.input_tokens + created.usage.cache_read_input_tokens
    assert with_tools.input_tokens > plain.input_tokens


def _error(excinfo) -> dict:
    body = excinfo.value.body
    assert body["type"] == "error" and body["error"]["message"]
    return body["error"]


def test_bad_role_is_an_invalid_request(client):
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        client.messages.create(model=MODEL, max_tokens=4, messages=[{"role": "robot", "content": "hi"}])
    assert _error(excinfo)["type"] == "invalid_request_error"


def test_missing_max_tokens_is_an_invalid_request(server):
    response = httpx.post(server.url + "/v1/messages", headers={"x-api-key": KEY},
                          json={"model": MODEL, "messages": USER})
    assert response.status_code == 400
    body = response.json()
    assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error"
    assert "max_tokens" in body["error"]["message"]


def test_unknown_model_is_not_found(client):
    with pytest.raises(anthropic.NotFoundError) as excinfo:
        client.messages.create(model="no-such-model", max_tokens=4, messages=USER)
    assert _error(excinfo)["type"] == "not_found_error"


def test_unknown_tool_choice_is_an_invalid_request(client):
    with pytest.raises(anthropic.BadRequestError) as excinfo:
        client.messages.create(model=MODEL, max_tokens=4, messages=USER, tools=[ADD],
                               tool_choice={"type": "tool", "name": "missing"})
    assert "missing" in _error(excinfo)["message"]


def test_wrong_key_is_an_authentication_error(server):
    wrong = anthropic.Anthropic(base_url=server.url, api_key="wrong", max_retries=0)
    with pytest.raises(anthropic.AuthenticationError) as excinfo:
        wrong.messages.create(model=MODEL, max_tokens=4, messages=USER)
    assert _error(excinfo)["type"] == "authentication_error"
