"""No input, however malformed, gives a 5xx or breaks the keep-alive connection (issue 25).

Hypothesis builds JSON bodies for every POST route from a small valid body per route:
extra fields, wrong types, huge and tiny numbers, NaN and infinities (Python's json writes
them and the server's parser reads them), lone UTF-16 surrogates in text, deep nesting,
empty lists and arbitrary unicode. Each body goes to the live loopback server on one
httpx connection, and the SAME connection must then serve a valid request. Then the
inputs issue 25 found giving 500s, as fixed regressions.
"""

from __future__ import annotations

import json
import os
import re

import httpx
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests.server.conftest import MODEL

# Derandomized: CI sees the same examples every run; modest counts keep the file well under a minute.
# SELFHOST_FUZZ_EXAMPLES=500 (and SELFHOST_FUZZ_RANDOM=1 for fresh examples) for a longer hunt.
FUZZ = settings(max_examples=int(os.environ.get("SELFHOST_FUZZ_EXAMPLES", "20")),
                derandomize=not os.environ.get("SELFHOST_FUZZ_RANDOM"), deadline=None, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

USER = [{"role": "user", "content": "hi"}]
# One small valid body per POST route; generation is capped at a token or two so examples stay cheap.
VALID_BODIES = {
    "/v1/chat/completions": {"model": MODEL, "messages": USER, "max_tokens": 1, "seed": 1, "stop": ["x"]},
    "/v1/completions": {"model": MODEL, "prompt": "hi", "max_tokens": 1, "seed": 1, "stop": ["x"]},
    "/v1/embeddings": {"model": "all-MiniLM-L6-v2", "input": "hi"},
    "/v1/responses": {"model": MODEL, "input": "hi", "instructions": "be brief", "max_output_tokens": 1, "seed": 1},
    "/v1/messages": {"model": MODEL, "max_tokens": 1, "messages": USER, "system": "be brief",
                     "stop_sequences": ["x"]},
    "/v1/messages/count_tokens": {"model": MODEL, "messages": USER, "system": "be brief"},
    "/api/chat": {"model": MODEL, "messages": USER, "stream": False, "keep_alive": "5m",
                  "options": {"num_predict": 1, "seed": 1, "stop": ["x"], "temperature": 0.5}},
    "/api/generate": {"model": MODEL, "prompt": "hi", "system": "be brief", "stream": False, "raw": False,
                      "options": {"num_predict": 1, "seed": 1}},
    "/api/show": {"model": MODEL},
}
POST_ROUTES = sorted(VALID_BODIES)

SURROGATES = ["\ud800", "\udbff", "\udc00", "\udfff"]


class RawJSON:
    """JSON text Python's encoder would not write: nesting deeper than its recursion limit, integers
    over its 4300-digit conversion limit. Spliced into the body after json.dumps."""

    def __init__(self, text: str):
        self.text = text


def encode(body) -> bytes:
    """The request body: json.dumps escapes a lone surrogate as \\ud800 (ensure_ascii), which httpx's json=
    cannot send; RawJSON values are spliced in as they are."""
    raws: list[str] = []

    def placeholder(value):
        if isinstance(value, RawJSON):
            raws.append(value.text)
            return f"\x00raw{len(raws) - 1}\x00"
        raise TypeError(type(value))

    text = json.dumps(body, default=placeholder)
    return re.sub(r'"\\u0000raw(\d+)\\u0000"', lambda m: raws[int(m.group(1))], text).encode()


def post(client: httpx.Client, path: str, body) -> httpx.Response:
    return client.post(path, content=encode(body), headers={"content-type": "application/json"})


# -- strategies ---------------------------------------------------------------------

with_surrogate = st.builds(lambda a, s, b: a + s + b, st.text(max_size=6), st.sampled_from(SURROGATES),
                           st.text(max_size=6))
texts = st.one_of(st.text(max_size=20), with_surrogate, st.sampled_from(["", " ", MODEL, "\x00", "🦙" * 3, "a" * 300]))
numbers = st.one_of(
    st.integers(-3, 3), st.integers(), st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([2**63 - 1, 2**63, 2**64 - 1, 2**64, -(2**63), -(2**63) - 1, 10**30]),
    st.floats(allow_nan=True, allow_infinity=True), st.sampled_from([0.0, -0.0, 1e-320, 1e308, float("nan")]),
)
raw_tokens = st.one_of(
    st.integers(2, 3000).map(lambda depth: RawJSON("[" * depth + "]" * depth)),
    st.integers(2, 3000).map(lambda depth: RawJSON('{"a":' * depth + "1" + "}" * depth)),
    st.integers(4000, 6000).map(lambda digits: RawJSON("9" * digits)),
    st.sampled_from([RawJSON("1e400"), RawJSON("-1e400"), RawJSON("Infinity"), RawJSON("-0")]),
)
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(texts, children, max_size=4),
    max_leaves=10,
) | raw_tokens | st.just([]) | st.just({})


def leaf_paths(value, path=()):
    """Every path into a JSON value (containers and leaves): the places a mutation may hit."""
    yield path
    if isinstance(value, dict):
        for key, child in value.items():
            yield from leaf_paths(child, (*path, key))
    elif isinstance(value, list):
        for i, child in enumerate(value):
            yield from leaf_paths(child, (*path, i))


def replaced(value, path, new):
    if not path:
        return new
    head, rest = path[0], path[1:]
    if isinstance(value, dict):
        return {**value, head: replaced(value[head], rest, new)}
    return [replaced(v, rest, new) if i == head else v for i, v in enumerate(value)]


@st.composite
def mutated_bodies(draw, route: str):
    """A route's valid body with a few random edits: a field replaced, a string given a lone surrogate,
    fields added or removed, stream switched on or off."""
    body = VALID_BODIES[route]
    for _ in range(draw(st.integers(1, 3))):
        edit = draw(st.sampled_from(["replace", "surrogate", "extra", "drop", "stream"]))
        paths = [p for p in leaf_paths(body) if p]
        if edit == "replace" and paths:
            body = replaced(body, draw(st.sampled_from(paths)), draw(json_values))
        elif edit == "surrogate":
            strings = [p for p in paths if isinstance(_get(body, p), str)]
            if strings:
                path = draw(st.sampled_from(strings))
                body = replaced(body, path, _get(body, path) + draw(st.sampled_from(SURROGATES)))
        elif edit == "extra" and isinstance(body, dict):
            body = {**body, draw(texts): draw(json_values)}
        elif edit == "drop" and isinstance(body, dict) and body:
            key = draw(st.sampled_from(sorted(body)))
            body = {k: v for k, v in body.items() if k != key}
        elif edit == "stream" and isinstance(body, dict):
            body = {**body, "stream": draw(st.booleans())}
    return body


def _get(value, path):
    for key in path:
        value = value[key]
    return value


# -- checks -------------------------------------------------------------------------

def local_port(response: httpx.Response) -> int:
    return response.extensions["network_stream"].get_extra_info("client_addr")[1]


def assert_survives(client: httpx.Client, path: str, body) -> httpx.Response:
    """`body` gets no 5xx (nor a stream that fails midway), and its connection then serves a valid request."""
    response = post(client, path, body)
    assert response.status_code < 500, (path, body, response.text)
    assert '"server_error"' not in response.text and "internal error" not in response.text, (path, body,
                                                                                               response.text)
    port = local_port(response)
    after = client.get("/v1/models")
    assert after.status_code == 200, after.text
    if response.headers.get("connection", "").lower() != "close":
        assert local_port(after) == port, f"{path} {body!r}: the keep-alive connection was dropped"
    return response


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


@pytest.mark.parametrize("route", POST_ROUTES)
def test_valid_base_bodies_succeed(client, route):
    """The fuzzer's starting points are themselves valid, so its edits probe the edges, not the 400 wall."""
    response = post(client, route, VALID_BODIES[route])
    assert response.status_code == 200, response.text


@pytest.mark.parametrize("route", POST_ROUTES)
def test_mutated_bodies_never_5xx(client, route):
    @FUZZ
    @given(body=mutated_bodies(route))
    def check(body):
        assert_survives(client, route, body)

    check()


@FUZZ
@given(route=st.sampled_from(POST_ROUTES), body=json_values)
def test_arbitrary_json_never_5xx(client, route, body):
    assert_survives(client, route, body)


@FUZZ
@given(route=st.sampled_from(POST_ROUTES), raw=st.binary(max_size=64) | st.text(max_size=64).map(str.encode))
def test_arbitrary_bytes_never_5xx(client, route, raw):
    response = client.post(route, content=raw, headers={"content-type": "application/json"})
    assert response.status_code < 500, (route, raw, response.text)
    assert client.get("/v1/models").status_code == 200


# -- issue 25's inputs that gave 500, as fixed regressions -------------------------------

CHAT = "/v1/chat/completions"


def chat(content="hi", **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 1, **extra}


def ollama_chat(content="hi", **extra):
    return {"model": MODEL, "messages": [{"role": "user", "content": content}], "options": {"num_predict": 1},
            **extra}


def generate(prompt="hi", options=None, **extra):
    return {"model": MODEL, "prompt": prompt, "options": {"num_predict": 1, **(options or {})}, **extra}


REGRESSIONS = [
    (CHAT, chat("hi \ud800 there")),
    (CHAT, chat("hi \ud800 there", stream=True)),
    (CHAT, {**chat(), "messages": [{"role": "user", "content": [{"type": "text", "text": "a\udfff"}]}]}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi \ud800", "max_tokens": 1}),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "\udbff"], "max_tokens": 1}),
    ("/v1/completions", {"model": MODEL, "prompt": ["ok", "\udbff"], "max_tokens": 1, "stream": True}),
    ("/api/chat", ollama_chat("hi \ud800", stream=False)),
    ("/api/chat", ollama_chat("hi \ud800")),  # Ollama streams by default
    ("/api/generate", generate("hi \ud800", stream=False)),
    ("/api/generate", generate("hi \ud800", raw=True, stream=False)),
    ("/api/generate", generate("hi \ud800", raw=True)),
    ("/api/generate", generate("hi", system="\udc00", stream=False)),
    ("/api/generate", generate("hi", system="\udc00")),
    (CHAT, chat(seed=18446744073709551616)),
    (CHAT, chat(seed=-9223372036854775809)),
    (CHAT, chat(seed=18446744073709551616, stream=True)),
    (CHAT, chat(seed=-9223372036854775809, stream=True)),
    ("/api/chat", ollama_chat(stream=False, options={"num_predict": 1, "seed": 18446744073709551616})),
    ("/api/chat", ollama_chat(options={"num_predict": 1, "seed": -9223372036854775809})),
    ("/api/generate", generate(options={"seed": 18446744073709551616}, stream=False)),
    ("/api/generate", generate(options={"seed": -9223372036854775809}, stream=False)),
    ("/api/generate", generate(options={"seed": 18446744073709551616})),
    ("/v1/messages", {"model": MODEL, "max_tokens": 1, "messages": [{"role": "user", "content": "a\ud800"}]}),
    ("/v1/messages", {"model": MODEL, "max_tokens": 1, "system": "\udc00", "stream": True,
                      "messages": [{"role": "user", "content": "a"}]}),
    ("/v1/responses", {"model": MODEL, "input": "a\ud800", "max_output_tokens": 1}),
]


def assert_api_error(path: str, response: httpx.Response) -> None:
    """A 4xx in the route's own error shape: Ollama's, Anthropic's or OpenAI's."""
    assert 400 <= response.status_code < 500, response.text
    assert response.headers["content-type"].startswith("application/json"), response.text  # not a stream
    body = response.json()
    if path.startswith("/api/"):
        assert set(body) == {"error"} and isinstance(body["error"], str) and body["error"]
    elif path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "invalid_request_error" and body["error"]["message"]
    else:
        assert set(body["error"]) == {"message", "type", "param", "code"} and body["error"]["message"]


@pytest.mark.parametrize("path, body", REGRESSIONS, ids=[f"{p} {i}" for i, (p, _) in enumerate(REGRESSIONS)])
def test_issue_25_inputs_are_4xx_and_keep_the_connection(client, path, body):
    response = assert_survives(client, path, body)
    assert_api_error(path, response)
    valid = client.post(CHAT, json=chat())  # a generation on the same connection, not only a GET
    assert valid.status_code == 200 and local_port(valid) == local_port(response)


def test_issue_25_seeds_at_the_bounds_are_accepted(client):
    for seed in (18446744073709551615, -9223372036854775808):
        assert client.post(CHAT, json=chat(seed=seed)).status_code == 200
        assert client.post("/api/generate", json=generate(options={"seed": seed}, stream=False)).status_code == 200
