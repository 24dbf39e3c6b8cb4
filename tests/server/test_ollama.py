"""The `ollama` client against a real server: chat, generate (streamed and not), list, show, ps, version."""

from __future__ import annotations

import json

import ollama
import pytest

from tests.server.conftest import MODEL


@pytest.fixture
def client(server):
    return ollama.Client(host=server.url)


def test_chat(client):
    out = client.chat(model=MODEL, messages=[{"role": "user", "content": "hello"}], stream=False,
                      options={"num_predict": 6, "temperature": 0})
    assert out.done and out.message.role == "assistant"
    assert 1 <= out.eval_count <= 6 and out.prompt_eval_count > 0 and out.total_duration > 0


def test_chat_stream_matches_non_stream(client):
    kwargs = dict(model=MODEL, messages=[{"role": "user", "content": "hello"}], options={"num_predict": 8, "temperature": 0})
    whole = client.chat(**kwargs, stream=False).message.content
    parts = list(client.chat(**kwargs, stream=True))
    assert parts[-1].done and parts[-1].done_reason in ("stop", "length")
    assert "".join(p.message.content for p in parts) == whole


def test_generate_with_latest_tag_and_seed(client):
    opts = {"num_predict": 6, "seed": 11, "temperature": 1.0}
    a = client.generate(model=MODEL + ":latest", prompt="To be", options=opts)
    b = client.generate(model=MODEL, prompt="To be", options=opts)
    assert a.response == b.response and a.done


def test_generate_stream_raw(client):
    parts = list(client.generate(model=MODEL, prompt="To be", raw=True, stream=True, options={"num_predict": 4}))
    assert parts[-1].done and parts[-1].eval_count <= 4


def test_generate_format_schema(client):
    # A schema whose documents are short: the random tiny model's output is shaped by the grammar alone.
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"enum": [1, 2, 3]}},
              "required": ["ok", "n"]}
    for seed in range(3):
        out = client.generate(model=MODEL, prompt="json please", format=schema,
                              options={"num_predict": 40, "seed": seed})
        document = json.loads(out.response)
        assert set(document) == {"ok", "n"} and isinstance(document["ok"], bool) and document["n"] in (1, 2, 3)
    out = client.generate(model=MODEL, prompt="json please", format="json", options={"num_predict": 20})
    assert out.response.startswith("{")


def test_list_show_ps_version(client, http):
    assert [m.model for m in client.list().models] == [MODEL]
    shown = client.show(MODEL)
    assert shown.details.family and "completion" in shown.capabilities
    assert [m.name for m in client.ps().models] == [MODEL]
    assert http.get("/api/version").json()["version"]


def test_unknown_model_is_a_404_in_ollama_shape(client):
    with pytest.raises(ollama.ResponseError) as err:
        client.chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert err.value.status_code == 404 and "nope" in err.value.error


def test_curl_style_body_without_json_content_type(http):
    r = http.post("/api/generate", content=json.dumps({"model": MODEL, "prompt": "hi", "stream": False,
                                                        "options": {"num_predict": 2}}),
                  headers={"content-type": "application/x-www-form-urlencoded"})
    assert r.status_code == 200 and r.json()["done"]
