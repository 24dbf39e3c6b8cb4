"""The OpenAI Responses API through the official `openai` client: text, tools, streaming, chaining, storage.

The tiny checkpoint has random weights, so tool calls and JSON are shaped by the grammar alone.
"""

from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from selfhost.server.responses_store import Retention, ResponseStore
from tests.server.conftest import MODEL, start_long_context_server

ADD = {"type": "function", "name": "add", "description": "Add two numbers", "strict": True, "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"], "additionalProperties": False}}
COLOUR = {"type": "object", "properties": {"colour": {"enum": ["red", "green"]}, "n": {"type": "integer",
          "minimum": 0, "maximum": 9}}, "required": ["colour", "n"], "additionalProperties": False}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_long_context_server(tmp_path_factory)
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def test_text_response(client):
    out = client.responses.create(model=MODEL, input="Hello", instructions="Be brief.", max_output_tokens=10,
                                  extra_body={"seed": 1})
    assert out.id.startswith("resp_") and out.object == "response"
    assert out.status in ("completed", "incomplete")
    assert out.output[0].type == "message" and out.output[0].content[0].type == "output_text"
    assert out.output_text == out.output[0].content[0].text
    assert out.usage.total_tokens == out.usage.input_tokens + out.usage.output_tokens
    assert 0 < out.usage.output_tokens <= 10


def test_json_schema_text_format(client):
    out = client.responses.create(
        model=MODEL, input=[{"role": "user", "content": [{"type": "input_text", "text": "Describe it"}]}],
        max_output_tokens=150, extra_body={"seed": 2},
        text={"format": {"type": "json_schema", "name": "colour", "schema": COLOUR, "strict": True}})
    jsonschema.validate(json.loads(out.output_text), COLOUR)


@pytest.mark.parametrize("seed", [0, 1])
def test_required_tool_call_is_valid(client, seed):
    out = client.responses.create(model=MODEL, input="Add", tools=[ADD], tool_choice="required",
                                  parallel_tool_calls=False, max_output_tokens=300, extra_body={"seed": seed})
    calls = [item for item in out.output if item.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "add" and calls[0].call_id
    jsonschema.validate(json.loads(calls[0].arguments), ADD["parameters"])


def test_stream_events(client):
    kwargs = dict(model=MODEL, input="Hello", max_output_tokens=12, extra_body={"seed": 3})
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert kinds[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert kinds[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          kinds[-1]] and kinds[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text


def test_streamed_function_call_matches_create(client):
    kwargs = dict(model=MODEL, input="Add", tools=[ADD], tool_choice={"type": "function", "name": "add"},
                  parallel_tool_calls=False, max_output_tokens=300, extra_body={"seed": 4})
    whole = client.responses.create(**kwargs)
    events = list(client.responses.create(stream=True, **kwargs))
    kinds = [e.type for e in events]
    assert "response.function_call_arguments.delta" in kinds and "response.function_call_arguments.done" in kinds
    streamed = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    expected = next(item for item in whole.output if item.type == "function_call")
    assert json.loads(streamed) == json.loads(expected.arguments)


def test_previous_response_id_chains(client):
    first = client.responses.create(model=MODEL, input="Add", tools=[ADD], tool_choice="required",
                                    parallel_tool_calls=False, max_output_tokens=300, extra_body={"seed": 5})
    call = next(item for item in first.output if item.type == "function_call")
    second = client.responses.create(model=MODEL, previous_response_id=first.id, tools=[ADD], max_output_tokens=6,
                                     input=[{"type": "function_call_output", "call_id": call.call_id, "output": "42"}])
    # The chained prompt holds the first turn: it is longer than the first request's whole prompt.
    assert second.usage.input_tokens > first.usage.input_tokens
    assert second.previous_response_id == first.id
    assert client.responses.retrieve(second.id).id == second.id


def test_store_false_is_not_chainable(client):
    out = client.responses.create(model=MODEL, input="Hello", max_output_tokens=4, store=False)
    with pytest.raises(openai.NotFoundError) as excinfo:
        client.responses.create(model=MODEL, input="Again", max_output_tokens=4, previous_response_id=out.id)
    assert excinfo.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(out.id)


def test_bad_input_is_a_400(client):
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input=[{"type": "function_call", "call_id": "c", "name": "add",
                                                     "arguments": "not json"}])
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model=MODEL, input="x", tools=[ADD], tool_choice={"type": "function", "name": "nope"})


def test_retention_keeps_the_newest(tmp_path):
    store = ResponseStore(tmp_path / "r.db", "2")
    for i in range(3):
        store.save({"id": f"resp_{i}", "output": []}, [])
    assert store.get("resp_0") is None and store.get("resp_2") is not None
    assert Retention.parse("12h").max_age_s == 12 * 3600
    with pytest.raises(ValueError):
        Retention.parse("forever")
