"""Schema-constrained output and tool calls through the official openai client.

The tiny checkpoint has random weights, so its unconstrained output is noise: whatever
it produces here is shaped by the grammar alone, which is what these tests check. Every
schema bounds its strings and numbers, so a valid document always fits in max_tokens.
"""

from __future__ import annotations

import json

import jsonschema
import llguidance
import llguidance.hf
import pytest

from selfhost.structured_output import StructuredOutput
from tests.server.conftest import MODEL, start_long_context_server

MESSAGES = [{"role": "user", "content": "Describe it in JSON."}]

SCHEMAS = {
    "nested": {"type": "object", "properties": {"user": {"type": "object", "properties": {
        "id": {"type": "integer", "minimum": 1, "maximum": 999},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 4}, "minItems": 1, "maxItems": 3}},
        "required": ["id", "tags"]}}, "required": ["user"]},
    "enum": {"type": "object", "properties": {"colour": {"enum": ["red", "green", "blue"]}, "ok": {"type": "boolean"}},
             "required": ["colour", "ok"], "additionalProperties": False},
    "any_of": {"type": "object", "properties": {"v": {"anyOf": [
        {"type": "integer", "minimum": -5, "maximum": 5}, {"type": "string", "maxLength": 3}, {"type": "null"}]}},
        "required": ["v"]},
    "pattern": {"type": "object", "properties": {"code": {"type": "string", "pattern": "^[A-Z]{2}-[0-9]{3}$"}},
                "required": ["code"]},
    "array": {"type": "array", "items": {"type": "integer", "minimum": 0, "maximum": 9}, "minItems": 2, "maxItems": 4},
    "bounds": {"type": "object", "properties": {"n": {"type": "integer", "minimum": 10, "maximum": 20},
                                                "flag": {"type": "boolean"}},
               "required": ["n", "flag"], "additionalProperties": False},
}

ADD = {"type": "function", "function": {"name": "add", "description": "Add two numbers", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer", "minimum": 0, "maximum": 99},
                                     "b": {"type": "integer", "minimum": 0, "maximum": 99}},
    "required": ["a", "b"]}}}
CITY = {"type": "function", "function": {"name": "city", "parameters": {
    "type": "object", "properties": {"name": {"enum": ["Paris", "Rome"]}}, "required": ["name"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = start_long_context_server(tmp_path_factory)
    yield srv
    srv.stop()


def _schema_format(name: str) -> dict:
    return {"type": "json_schema", "json_schema": {"name": name, "schema": SCHEMAS[name], "strict": True}}


def _stream_text(stream) -> tuple[str, str]:
    text, finish = "", None
    for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return text, finish


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_json_schema_output_validates(openai_client, name):
    for seed, temperature in ((0, 1.0), (1, 0.7), (2, 0.0)):
        out = openai_client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=150, temperature=temperature, seed=seed,
            response_format=_schema_format(name))
        choice = out.choices[0]
        assert choice.finish_reason == "stop", choice.message.content
        jsonschema.validate(json.loads(choice.message.content), SCHEMAS[name])


@pytest.mark.parametrize("name", ["nested", "any_of", "array"])
def test_streamed_json_schema_output_is_the_same_document(openai_client, name):
    kwargs = dict(model=MODEL, messages=MESSAGES, max_tokens=150, temperature=1.0, seed=3,
                  response_format=_schema_format(name))
    whole = openai_client.chat.completions.create(**kwargs).choices[0].message.content
    text, finish = _stream_text(openai_client.chat.completions.create(**kwargs, stream=True))
    assert finish == "stop"
    assert text == whole
    jsonschema.validate(json.loads(text), SCHEMAS[name])


def test_json_object_is_an_object_or_a_valid_prefix_of_one(openai_client, server):
    tokenizer = server.app.state.models.models[MODEL].llm.tokenizer
    ll_tokenizer = llguidance.hf.from_tokenizer(tokenizer.hf)
    for seed in range(3):
        out = openai_client.chat.completions.create(
            model=MODEL, messages=MESSAGES, max_tokens=40, temperature=1.0, seed=seed,
            response_format={"type": "json_object"})
        text, finish = out.choices[0].message.content, out.choices[0].finish_reason
        if finish == "stop":
            assert isinstance(json.loads(text), dict)
        else:  # cut by max_tokens: what came is still the start of a JSON object
            assert finish == "length"
            matcher = llguidance.LLMatcher(ll_tokenizer, StructuredOutput(json_object=True).llguidance_grammar())
            assert matcher.consume_tokens(ll_tokenizer.tokenize_str(text)), matcher.get_error()


def test_regex_and_choice_extensions_on_completions(openai_client):
    for seed in range(3):
        out = openai_client.completions.create(model=MODEL, prompt="Code:", max_tokens=20, temperature=1.0,
                                               seed=seed, extra_body={"structured_outputs": {"regex": "[a-c]{3}-[0-9]{2}"}})
        assert out.choices[0].finish_reason == "stop"
        assert len(out.choices[0].text) == 6 and out.choices[0].text[3] == "-"
        out = openai_client.completions.create(model=MODEL, prompt="Pick:", max_tokens=20, temperature=1.0, seed=seed,
                                               extra_body={"structured_outputs": {"choice": ["alpha", "beta"]}})
        assert out.choices[0].text in ("alpha", "beta")


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "strin"}}}},
     "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "bad name!", "schema": {}}}},
     "response_format.json_schema.name"),
    ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools[0].function.name"),
    ({"tools": [ADD, ADD]}, "tools"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [ADD], "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [{"type": "retrieval"}]}, "tools.0.type"),
    ({"messages": [{"role": "tool", "content": "3"}]}, "messages.0"),
    ({"messages": [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{not json"}}]}]}, "messages.0"),
])
def test_bad_structure_or_tools_is_a_400_naming_the_field(http, body, param):
    response = http.post("/v1/chat/completions", json={"model": MODEL, "messages": MESSAGES, "max_tokens": 5, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def _arguments(call) -> dict:
    return json.loads(call.function.arguments)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}])
def test_required_and_named_tool_calls_are_valid_calls(openai_client, tool_choice):
    for seed in range(4):
        out = openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "What is 2 + 3?"}], tools=[ADD, CITY],
            tool_choice=tool_choice, max_tokens=600, temperature=1.0, seed=seed)
        choice = out.choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.tool_calls, choice.message
        for call in choice.message.tool_calls:
            assert call.id and call.type == "function"
            tool = {"add": ADD, "city": CITY}[call.function.name]
            jsonschema.validate(_arguments(call), tool["function"]["parameters"])
        if isinstance(tool_choice, dict):
            assert [c.function.name for c in choice.message.tool_calls] == ["add"]


def test_streamed_tool_calls_reassemble_to_the_whole_response(openai_client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "Add 2 and 3"}], tools=[ADD, CITY],
                  tool_choice="required", max_tokens=600, temperature=1.0, seed=11)
    whole = openai_client.chat.completions.create(**kwargs).choices[0].message.tool_calls
    calls: dict[int, dict] = {}
    finish, fragments = None, 0
    for chunk in openai_client.chat.completions.create(**kwargs, stream=True):
        delta = chunk.choices[0].delta
        for part in delta.tool_calls or []:
            call = calls.setdefault(part.index, {"id": part.id, "name": "", "arguments": ""})
            assert part.id in (None, call["id"])  # the id comes once, with the name
            call["name"] += part.function.name or ""
            call["arguments"] += part.function.arguments or ""
            fragments += bool(part.function.arguments)
        finish = chunk.choices[0].finish_reason or finish
    assert finish == "tool_calls"
    # The same calls, argument text and all, as the whole response; the arguments came in pieces.
    assert [(c["name"], c["arguments"]) for _, c in sorted(calls.items())] == \
        [(c.function.name, c.function.arguments) for c in whole]
    assert fragments > len(calls)


def test_parallel_tool_calls_false_gives_one_call(openai_client):
    for seed in range(4):
        out = openai_client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Go"}], tools=[ADD, CITY], tool_choice="required",
            parallel_tool_calls=False, max_tokens=150, temperature=1.0, seed=seed)
        assert len(out.choices[0].message.tool_calls) == 1


def test_tool_choice_none_answers_in_text(openai_client):
    out = openai_client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                                tools=[ADD], tool_choice="none", max_tokens=8)
    assert out.choices[0].message.tool_calls is None
    assert out.choices[0].finish_reason in ("stop", "length")


def test_tool_results_go_back_through_the_template(openai_client, server):
    call = {"id": "call_1", "type": "function", "function": {"name": "add", "arguments": '{"a": 2, "b": 3}'}}
    messages = [{"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "5"}]
    out = openai_client.chat.completions.create(model=MODEL, messages=messages, tools=[ADD], max_tokens=5)
    assert out.usage.prompt_tokens > 0
    served = server.app.state.models.models[MODEL]
    from selfhost.server.protocol import ChatMessage
    from selfhost.tools.calls import ToolSpec

    ids = served.tools.encode_chat([ChatMessage(**m).as_dict() for m in messages],
                                   [ToolSpec("add", "", ADD["function"]["parameters"])])
    rendered = served.llm.tokenizer.hf.decode(ids)
    assert '"name": "add", "arguments": {"a": 2, "b": 3}' in rendered
    assert "<tool_response>\n5\n</tool_response>" in rendered


def test_ollama_format_schema_and_tools(http):
    schema = SCHEMAS["bounds"]
    for seed in range(2):
        body = {"model": MODEL, "messages": MESSAGES, "stream": False, "format": schema,
                "options": {"seed": seed, "num_predict": 100}}
        out = http.post("/api/chat", json=body).json()
        jsonschema.validate(json.loads(out["message"]["content"]), schema)
    body = {"model": MODEL, "messages": MESSAGES, "stream": False, "format": "json",
            "options": {"seed": 0, "num_predict": 100, "temperature": 0}}
    assert http.post("/api/chat", json=body).status_code == 200
    body = {"model": MODEL, "stream": False, "tools": [ADD], "options": {"num_predict": 30},
            "messages": [{"role": "user", "content": "2 + 3"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"function": {"name": "add", "arguments": {"a": 2, "b": 3}}}]},
                         {"role": "tool", "content": "5", "tool_name": "add"}]}
    response = http.post("/api/chat", json=body)
    assert response.status_code == 200, response.text
    bad = {"model": MODEL, "stream": False, "tools": [{"type": "function", "function": {"name": "a b"}}],
           "messages": MESSAGES}
    response = http.post("/api/chat", json=bad)
    assert response.status_code == 400 and "tools[0].function.name" in response.json()["error"]


def test_langchain_tool_loop(server):
    """An agent framework's loop, unchanged: bind a tool, run the call it gets, feed the result back."""
    from langchain_core.messages import HumanMessage, ToolMessage
    from langchain_core.tools import tool
    from langchain_openai import ChatOpenAI

    ran = []

    @tool
    def add(a: int, b: int) -> int:
        """Add two integers."""
        ran.append((a, b))
        return a + b

    model = ChatOpenAI(model=MODEL, base_url=server.url + "/v1", api_key="unused", temperature=1.0, max_tokens=400,
                       max_retries=0, timeout=60, seed=5)
    messages = [HumanMessage("What is 2 + 3?")]
    reply = model.bind_tools([add], tool_choice="required", parallel_tool_calls=False).invoke(messages)
    assert len(reply.tool_calls) == 1 and reply.tool_calls[0]["name"] == "add"
    call = reply.tool_calls[0]
    result = add.invoke(call["args"])
    assert ran == [(call["args"]["a"], call["args"]["b"])]
    messages += [reply, ToolMessage(str(result), tool_call_id=call["id"])]
    final = model.bind_tools([add], tool_choice="none").invoke(messages)
    assert not final.tool_calls and final.response_metadata["finish_reason"] in ("stop", "length")
    assert final.usage_metadata["input_tokens"] > reply.usage_metadata["input_tokens"]  # the call and its result
