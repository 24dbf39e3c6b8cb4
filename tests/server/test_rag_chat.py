"""Chat completions that name a collection: the demo model answers from a small indexed corpus."""

from __future__ import annotations

import json

import openai
import pytest

from selfhost.hub import EMBEDDED_MODEL_NAME
from selfhost.rag.answer import Source, ground_conversation
from selfhost.rag.embed import Embedder
from selfhost.rag.ingest import ingest
from selfhost.rag.store import VectorStore
from selfhost.server.settings import ServerSettings
from tests.rag.corpus import write_corpus
from tests.server.conftest import LoopbackServer

QUESTION = "what is the event horizon"
RAG = {"collection": "topics", "top_k": 2}


@pytest.fixture(scope="module")
def rag_server(tmp_path_factory):
    """The demo model, and collection `topics` (tests/rag/corpus.py) in the server's embedded store."""
    root = tmp_path_factory.mktemp("rag-serve")
    with VectorStore(root / "store") as store:  # closed before the server opens (and locks) the folder
        ingest([write_corpus(root / "docs")], store, "topics", Embedder())
    srv = LoopbackServer(ServerSettings(rag_store=root / "store", kv_cache_memory="32MiB")).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(rag_server):
    return openai.OpenAI(base_url=rag_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def ask(client, messages, rag=RAG, **kwargs):
    return client.chat.completions.create(model=EMBEDDED_MODEL_NAME, messages=messages, max_tokens=8,
                                          temperature=0, extra_body={"rag": rag}, **kwargs)


def test_answer_carries_its_sources_and_the_model_saw_exactly_them(client, rag_server):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": QUESTION}]
    out = ask(client, messages)
    sources = out.model_extra["sources"]
    assert sources and sources[0]["path"].endswith("black_holes.txt") and sources[0]["chunk_index"] == 0
    assert [s["number"] for s in sources] == list(range(1, len(sources) + 1)) and len(sources) <= 2
    assert "event horizon" in sources[0]["text"] and 0 < sources[0]["similarity"] <= 1 and sources[0]["score"] > 0
    assert isinstance(out.choices[0].message.content, str) and out.usage.completion_tokens >= 1
    # The prompt the model got is the grounded one built from exactly these sources.
    shown = [Source(s["number"], s["path"], s["chunk_index"], s["text"], s["similarity"], s["score"]) for s in sources]
    tokenizer = rag_server.app.state.models.models[EMBEDDED_MODEL_NAME].llm.tokenizer
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(ground_conversation(messages, shown)))


def test_plain_requests_are_untouched(client):
    out = client.chat.completions.create(model=EMBEDDED_MODEL_NAME, messages=[{"role": "user", "content": QUESTION}],
                                         max_tokens=4, temperature=0)
    assert "sources" not in (out.model_extra or {}) and out.choices[0].message.content is not None


def test_stream_has_the_sources_in_its_first_chunk(client):
    messages = [{"role": "user", "content": QUESTION}]
    whole = ask(client, messages)
    chunks = list(ask(client, messages, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[0].model_extra["sources"] == whole.model_extra["sources"]
    assert all("sources" not in (c.model_extra or {}) for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_nothing_relevant_answers_so_without_generating(client):
    out = ask(client, [{"role": "user", "content": "qwxz plorf vantablim?"}], rag={**RAG, "min_score": 0.9})
    assert out.model_extra["sources"] == [] and "nothing relevant" in out.choices[0].message.content
    assert out.usage.completion_tokens == 0 and out.choices[0].finish_reason == "stop"
    stream = list(ask(client, [{"role": "user", "content": "qwxz plorf vantablim?"}], rag={**RAG, "min_score": 0.9},
                      stream=True))
    assert stream[0].model_extra["sources"] == []
    assert "nothing relevant" in "".join(c.choices[0].delta.content or "" for c in stream)


def test_a_question_that_leaves_no_room_for_a_source_is_a_400_that_says_so(client):
    # Sources beyond the window are dropped or cut (test_rag_fit.py); a question this long leaves room for none.
    long_question = "What is the event horizon of a black hole, where light cannot escape? " * 6  # demo: 256 tokens
    with pytest.raises(openai.BadRequestError) as excinfo:
        ask(client, [{"role": "user", "content": long_question}])
    error = excinfo.value.response.json()["error"]
    assert error["code"] == "context_length_exceeded" and "shorten the question" in error["message"]


def test_unknown_collection_is_a_404(client):
    with pytest.raises(openai.NotFoundError) as excinfo:
        ask(client, [{"role": "user", "content": QUESTION}], rag={"collection": "nope"})
    error = excinfo.value.response.json()["error"]
    assert error["code"] == "collection_not_found" and error["param"] == "rag.collection"
    assert "'nope'" in error["message"] and "topics" in error["message"]


@pytest.mark.parametrize(
    "rag, needle",
    [({"collection": "topics", "top_k": 0}, "rag.top_k"), ({"collection": "topics", "topk": 3}, "rag.topk"),
     ({"top_k": 3}, "rag.collection")],
)
def test_bad_rag_options_are_a_400(client, rag, needle):
    with pytest.raises(openai.BadRequestError) as excinfo:
        ask(client, [{"role": "user", "content": QUESTION}], rag=rag)
    assert needle in excinfo.value.response.json()["error"]["message"]


def test_a_request_without_a_user_message_is_a_400(rag_server):
    import httpx

    body = {"model": EMBEDDED_MODEL_NAME, "messages": [{"role": "system", "content": "hi"}], "rag": RAG}
    response = httpx.post(rag_server.url + "/v1/chat/completions", content=json.dumps(body), timeout=60)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages"
