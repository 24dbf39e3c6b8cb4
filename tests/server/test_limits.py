"""Each request limit at its boundary (issue 25): body (413), header count and size (431), stop strings,
the character bound that refuses an over-long prompt before tokenizing, keep_alive, and the
protocol details generated clients rely on (Allow on 405, documented error responses)."""

from __future__ import annotations

import json
import socket

import httpx
import pytest

from selfhost.server.wire import MAX_STOP_STRINGS
from selfhost.server.settings import ServerSettings
from tests.server.conftest import MODEL, LoopbackServer

BODY_LIMIT = 64 * 1024  # large enough for a prompt over the character bound
USER = [{"role": "user", "content": "hi"}]
CHAT = "/v1/chat/completions"


@pytest.fixture(scope="module")
def server(tiny_checkpoint, tmp_path_factory):
    settings = ServerSettings(models=[f"{MODEL}={tiny_checkpoint('llama')}"], kv_cache_memory="64MiB",
                              weight_dtype="float32", max_body_bytes="64KiB",
                              rag_store=tmp_path_factory.mktemp("rag-store"),
                              responses_db=tmp_path_factory.mktemp("responses") / "responses.db")
    srv = LoopbackServer(settings)
    # h11 refuses a header block it cannot parse whole within 16 KiB (uvicorn's bare 400): headers split
    # across TCP reads would meet that limit before the server's own 64 KiB one. Lift it to test ours.
    srv.server.config.h11_max_incomplete_event_size = 4 * BODY_LIMIT
    srv.start()
    yield srv
    srv.stop()


@pytest.fixture
def http(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client


def padded(body: dict, size: int) -> bytes:
    """`body` as JSON of exactly `size` bytes (trailing whitespace is valid JSON)."""
    text = json.dumps(body).encode()
    assert len(text) <= size
    return text + b" " * (size - len(text))


def post_raw(http, path: str, content, **headers) -> httpx.Response:
    return http.post(path, content=content, headers={"content-type": "application/json", **headers})


def assert_openai_error(response, status: int, param: str | None = None, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    if code is not None:
        assert error["code"] == code, error
    return error


# -- body ---------------------------------------------------------------------------

def test_default_body_limit_is_16_mib():
    assert ServerSettings().max_body_bytes_value == 16 * 2**20


def test_body_at_the_limit_is_read_one_byte_over_is_413(http):
    body = {"model": MODEL, "messages": USER, "max_tokens": 1}
    assert post_raw(http, CHAT, padded(body, BODY_LIMIT)).status_code == 200
    response = post_raw(http, CHAT, padded(body, BODY_LIMIT + 1))
    error = assert_openai_error(response, 413, code="request_too_large")
    assert str(BODY_LIMIT) in error["message"]
    assert response.headers["connection"] == "close"  # the unread rest of the body makes the connection unusable


def test_413_has_each_apis_error_shape(http):
    too_big = b" " * (BODY_LIMIT + 1)
    ollama = post_raw(http, "/api/chat", too_big)
    assert ollama.status_code == 413 and isinstance(ollama.json()["error"], str)
    anthropic = post_raw(http, "/v1/messages", too_big)
    assert anthropic.status_code == 413
    assert anthropic.json()["type"] == "error" and anthropic.json()["error"]["type"] == "request_too_large"


def test_chunked_body_is_counted_without_content_length(http):
    def chunks(total: int, size: int = 4096):
        sent = 0
        while sent < total:
            yield b" " * min(size, total - sent)
            sent += size

    body = json.dumps({"model": MODEL, "messages": USER, "max_tokens": 1}).encode()

    def with_padding(total: int):
        yield body
        yield from chunks(total - len(body))

    over = post_raw(http, CHAT, chunks(BODY_LIMIT + 1))
    assert "content-length" not in over.request.headers and over.request.headers["transfer-encoding"] == "chunked"
    assert_openai_error(over, 413, code="request_too_large")
    assert post_raw(http, CHAT, with_padding(BODY_LIMIT)).status_code == 200


def test_declared_length_over_the_limit_is_refused_before_the_body_is_read(server):
    """Only the headers are sent: the server answers from Content-Length alone."""
    with socket.create_connection(("127.0.0.1", int(server.url.rsplit(":", 1)[1])), timeout=30) as sock:
        sock.sendall(f"POST {CHAT} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     f"Content-Length: {10**12}\r\n\r\n".encode())
        reply = sock.recv(65536).decode("latin-1")
    assert reply.startswith("HTTP/1.1 413"), reply


# -- headers ------------------------------------------------------------------------

def with_headers(http, count: int | None = None, total_bytes: int | None = None) -> httpx.Request:
    """GET /v1/models with exactly `count` headers, or headers of exactly `total_bytes` (names plus values,
    as the server counts them), httpx's own included."""
    request = http.build_request("GET", "/v1/models")
    own = request.headers.raw
    if count is not None:
        extra = [(f"x-h{i}".encode(), b"1") for i in range(count - len(own))]
    else:
        room = total_bytes - sum(len(k) + len(v) for k, v in own) - len(b"x-pad")
        extra = [(b"x-pad", b"a" * room)]
    request.headers = httpx.Headers(own + extra)
    sent = request.headers.raw
    assert count is None or len(sent) == count
    assert total_bytes is None or sum(len(k) + len(v) for k, v in sent) == total_bytes
    return request


def test_header_count_at_the_limit_is_served_one_over_is_431(http, server):
    limit = server.settings.max_headers
    assert limit == 100
    assert http.send(with_headers(http, count=limit)).status_code == 200
    response = http.send(with_headers(http, count=limit + 1))
    assert_openai_error(response, 431, code="headers_too_large")
    assert response.headers["connection"] == "close"


def test_header_bytes_at_the_limit_are_served_one_over_is_431(http, server):
    limit = server.settings.max_header_bytes
    assert limit == 65536
    assert http.send(with_headers(http, total_bytes=limit)).status_code == 200
    assert_openai_error(http.send(with_headers(http, total_bytes=limit + 1)), 431, code="headers_too_large")


# -- stop strings -------------------------------------------------------------------

def stops(n: int) -> list[str]:
    return [f"stop{i}" for i in range(n)]


@pytest.mark.parametrize("path, body", [
    (CHAT, {"model": MODEL, "messages": USER, "max_tokens": 1}),
    ("/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 1}),
])
def test_openai_stop_strings_at_the_limit(http, path, body):
    assert MAX_STOP_STRINGS == 16
    assert http.post(path, json={**body, "stop": stops(16)}).status_code == 200
    error = assert_openai_error(http.post(path, json={**body, "stop": stops(17)}), 400)
    assert error["param"] == "stop" and "stop has 17 strings" in error["message"], error


@pytest.mark.parametrize("path, body", [
    ("/api/chat", {"model": MODEL, "messages": USER, "stream": False}),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False}),
])
def test_ollama_stop_strings_at_the_limit(http, path, body):
    ok = http.post(path, json={**body, "options": {"num_predict": 1, "stop": stops(16)}})
    assert ok.status_code == 200, ok.text
    refused = http.post(path, json={**body, "options": {"num_predict": 1, "stop": stops(17)}})
    assert refused.status_code == 400 and "stop" in refused.json()["error"]


def test_anthropic_stop_sequences_at_the_limit(http):
    body = {"model": MODEL, "messages": USER, "max_tokens": 1}
    assert http.post("/v1/messages", json={**body, "stop_sequences": stops(16)}).status_code == 200
    refused = http.post("/v1/messages", json={**body, "stop_sequences": stops(17)})
    assert refused.status_code == 400
    assert refused.json()["error"]["type"] == "invalid_request_error"
    assert "stop_sequences" in refused.json()["error"]["message"]


# -- the character bound ------------------------------------------------------------

@pytest.fixture
def no_tokenizing(server, monkeypatch):
    """The served tokenizer records and refuses any call; yields the character bound and the calls."""
    llm = server.app.state.models.models[MODEL].llm
    bound = llm.max_model_len * llm.tokenizer.longest_token_chars
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise RuntimeError("the prompt was tokenized although it is over the character bound")

    for name in ("encode", "encode_chat", "render_chat"):
        monkeypatch.setattr(llm.tokenizer, name, refuse)
    monkeypatch.setattr(llm.tokenizer.hf, "encode", refuse)
    monkeypatch.setattr(llm.tokenizer.hf, "apply_chat_template", refuse)
    yield bound, calls
    assert not calls, f"{len(calls)} over-long prompts reached the tokenizer"


def test_prompt_over_the_character_bound_is_refused_without_tokenizing(http, no_tokenizing):
    bound, calls = no_tokenizing
    text = "a" * (bound + 1)
    assert len(text) < BODY_LIMIT - 200  # refused by the bound, not the body limit
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": text}), 400,
                        param="prompt", code="context_length_exceeded")
    assert_openai_error(http.post("/v1/completions", json={"model": MODEL, "prompt": [text, "ok"]}), 400,
                        param="prompt", code="context_length_exceeded")
    chat = {"model": MODEL, "messages": [{"role": "user", "content": text}]}
    assert_openai_error(http.post(CHAT, json=chat), 400, param="messages", code="context_length_exceeded")
    # Split over messages, the sum counts.
    halves = [{"role": "user", "content": text[: len(text) // 2]},
              {"role": "assistant", "content": "ok"}, {"role": "user", "content": text[len(text) // 2:]}]
    assert_openai_error(http.post(CHAT, json={"model": MODEL, "messages": halves}), 400,
                        code="context_length_exceeded")
    for path, body in [("/api/generate", {"model": MODEL, "prompt": text, "stream": False}),
                       ("/api/generate", {"model": MODEL, "prompt": text, "raw": True, "stream": False}),
                       ("/api/chat", {**chat, "stream": False})]:
        refused = http.post(path, json=body)
        assert refused.status_code == 400 and "characters" in refused.json()["error"], refused.text
    anthropic = http.post("/v1/messages", json={**chat, "max_tokens": 1})
    assert anthropic.status_code == 400 and "characters" in anthropic.json()["error"]["message"], anthropic.text


# -- keep_alive, 405, the published schema ------------------------------------------

@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity"])
@pytest.mark.parametrize("path, body", [
    ("/api/chat", {"model": MODEL, "messages": USER, "stream": False, "options": {"num_predict": 1}}),
    ("/api/generate", {"model": MODEL, "prompt": "hi", "stream": False, "options": {"num_predict": 1}}),
])
def test_keep_alive_must_be_finite(http, path, body, value):
    text = json.dumps({**body, "keep_alive": "__k__"}).replace('"__k__"', value)
    refused = post_raw(http, path, text.encode())
    assert refused.status_code == 400 and "keep_alive" in refused.json()["error"], refused.text


def test_405_keeps_allow(http):
    response = http.get(CHAT)
    assert_openai_error(response, 405)
    assert response.headers["allow"] == "POST"
    assert http.delete("/v1/models").headers["allow"] == "GET"


def test_openapi_declares_error_responses_for_every_post_route(http):
    schema = http.get("/openapi.json").json()
    posts = {path: ops["post"] for path, ops in schema["paths"].items() if "post" in ops}
    assert {"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses", "/v1/messages",
            "/v1/messages/count_tokens", "/api/chat", "/api/generate", "/api/show"} <= set(posts)
    for path, operation in posts.items():
        assert {"400", "401", "404"} <= set(operation["responses"]), path


def test_empty_embeddings_input_is_400_and_the_schema_says_so(http):
    for empty in ("", [], [""], [[]]):
        response = http.post("/v1/embeddings", json={"model": "all-MiniLM-L6-v2", "input": empty})
        error = assert_openai_error(response, 400)  # a model validator's: param is null, the message names input
        assert "input" in error["message"], error
    schema = http.get("/openapi.json").json()["components"]["schemas"]["EmbeddingRequest"]["properties"]["input"]
    text = next(s for s in schema["anyOf"] if s["type"] == "string")
    assert text["minLength"] == 1
    assert all(s["minItems"] == 1 for s in schema["anyOf"] if s["type"] == "array")
