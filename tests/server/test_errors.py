"""Every bad input is a 4xx with the OpenAI error object; auth on and off."""

from __future__ import annotations

import openai
import pytest

from tests.server.conftest import MODEL

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]


def assert_error(response, status: int, param: str | None = None):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(
    "body, param",
    [
        ({"model": MODEL, "messages": MSG, "temperature": "hot"}, "temperature"),
        ({"model": MODEL, "messages": MSG, "temperature": 5}, "temperature"),
        ({"model": MODEL, "messages": "hello"}, "messages"),
        ({"model": MODEL, "messages": [{"content": "no role"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, "messages.0.role"),
        ({"model": MODEL, "messages": []}, "messages"),
        ({"messages": MSG}, "model"),
        ({"model": MODEL, "messages": MSG, "n": 0}, "n"),
        ({"model": MODEL, "messages": MSG, "n": 50}, "n"),
        ({"model": MODEL, "messages": MSG, "max_tokens": 100000}, "max_tokens"),
        ({"model": MODEL, "messages": MSG, "max_completion_tokens": 100000}, "max_completion_tokens"),
        ({"model": MODEL, "messages": MSG, "max_tokens": -1}, "max_tokens"),
        ({"model": MODEL, "messages": MSG, "top_logprobs": 3}, None),
        ({"model": MODEL, "messages": MSG, "stop": [""]}, None),
        ({"model": MODEL, "messages": MSG, "response_format": {"type": "xml"}}, "response_format.type"),
        ({"model": MODEL, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, None),
    ],
)
def test_bad_chat_input_is_400(http, body, param):
    assert_error(http.post(CHAT, json=body), 400, param)


def test_malformed_json_is_400(http):
    error = assert_error(http.post(CHAT, content=b'{"model": "tiny", "messa', headers={"content-type": "application/json"}), 400)
    assert error["code"] == "invalid_json"


def test_unknown_model_is_404(http):
    error = assert_error(http.post(CHAT, json={"model": "gpt-17", "messages": MSG}), 404, "model")
    assert error["code"] == "model_not_found" and "gpt-17" in error["message"]
    assert_error(http.get("/v1/models/gpt-17"), 404)


def test_prompt_longer_than_context_is_400(http):
    long_prompt = "To be, or not to be " * 300
    error = assert_error(http.post(CHAT, json={"model": MODEL, "messages": [{"role": "user", "content": long_prompt}]}),
                         400, "messages")
    assert error["code"] == "context_length_exceeded"
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": long_prompt}), 400, "prompt")


def test_bad_completions_input(http):
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": []}), 400)
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": [99999]}), 400, "prompt")
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "logprobs": 50}), 400, "logprobs")
    assert_error(http.post("/v1/completions", json={"model": MODEL, "prompt": ["x"] * 100, "n": 4}), 400, "prompt")


def test_unknown_route_and_method(http):
    assert_error(http.get("/v1/nothing"), 404)
    assert_error(http.get(CHAT), 405)


def test_openai_client_raises_typed_errors(openai_client):
    with pytest.raises(openai.NotFoundError):
        openai_client.chat.completions.create(model="missing", messages=MSG)
    with pytest.raises(openai.BadRequestError) as err:
        openai_client.chat.completions.create(model=MODEL, messages=MSG, max_tokens=10**6)
    assert err.value.body["param"] == "max_tokens"


def test_ollama_errors_have_ollama_shape(http):
    r = http.post("/api/chat", json={"model": MODEL, "messages": [{"role": "user", "content": "x"}],
                                     "options": {"temperature": -1}})
    assert r.status_code == 400 and isinstance(r.json()["error"], str)


@pytest.fixture
def auth_on(server):
    server.settings.api_key = ["sekrit"]
    yield "sekrit"
    server.settings.api_key = []


def test_auth_on(server, http, auth_on):
    error = assert_error(http.get("/v1/models"), 401)
    assert error["type"] == "authentication_error"
    assert_error(http.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401)
    assert http.get("/v1/models", headers={"Authorization": f"Bearer {auth_on}"}).status_code == 200
    assert http.get("/api/tags").status_code == 401
    assert http.get("/health").status_code == 200  # probes and the page stay open
    good = openai.OpenAI(base_url=server.url + "/v1", api_key=auth_on, max_retries=0)
    assert good.models.list().data
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0).models.list()


def test_auth_off(http):
    assert http.get("/v1/models").status_code == 200


def test_stream_that_fails_midway_ends_cleanly(server, http, monkeypatch):
    served = server.app.state.models.models[MODEL]
    real_generate = served.engine.generate

    async def failing(prompt, params, request_id):
        async for delta in real_generate(prompt, params, request_id):
            yield delta
            raise RuntimeError("injected engine fault")

    monkeypatch.setattr(served.engine, "generate", failing)
    body = {"model": MODEL, "messages": MSG, "max_tokens": 20, "stream": True, "ignore_eos": True}
    with http.stream("POST", CHAT, json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert response.status_code == 200
    assert events[-1] == "[DONE]" and '"server_error"' in events[-2]
    monkeypatch.undo()
    assert server.wait_idle().kv_blocks_used == 0
    assert http.post(CHAT, json={"model": MODEL, "messages": MSG, "max_tokens": 2}).status_code == 200
