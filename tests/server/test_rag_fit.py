"""A grounded chat on the demo model (256 tokens): sources beyond its window are dropped or cut, not a 400."""

from __future__ import annotations

import openai
import pytest

from selfhost.hub import EMBEDDED_MODEL_NAME
from selfhost.rag.answer import Source, ground_conversation
from selfhost.rag.embed import Embedder
from selfhost.rag.ingest import ingest
from selfhost.rag.store import VectorStore
from selfhost.server.settings import ServerSettings
from tests.rag.test_cli import NOTES
from tests.server.conftest import LoopbackServer

QUESTION = [{"role": "user", "content": "when is the project Alpha meeting?"}]
RAG = {"collection": "notes", "top_k": 4}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    root = tmp_path_factory.mktemp("rag-fit")
    docs = root / "notes"
    docs.mkdir()
    for name, text in NOTES.items():
        (docs / name).write_text(text + "\n")
    with VectorStore(root / "store") as store:  # closed before the server opens (and locks) the folder
        ingest([docs], store, "notes", Embedder())
    srv = LoopbackServer(ServerSettings(rag_store=root / "store", kv_cache_memory="32MiB")).start()
    client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    yield srv, client
    srv.stop()


def ask(client, **kwargs):
    return client.chat.completions.create(model=EMBEDDED_MODEL_NAME, messages=QUESTION, temperature=0,
                                          extra_body={"rag": RAG}, **kwargs)


def test_sources_are_fitted_to_the_window_and_the_response_says_so(served):
    srv, client = served
    out = ask(client, max_tokens=8)
    sources, note = out.model_extra["sources"], out.model_extra["sources_note"]
    assert 1 <= len(sources) < 4 and f"{4 - len(sources)} of 4 sources dropped" in note
    assert note.startswith("to fit the model's 256-token context")
    # The model saw exactly the sources returned (the last one possibly cut), and the answer had its 8 tokens.
    shown = [Source(s["number"], s["path"], s["chunk_index"], s["text"], s["similarity"], s["score"]) for s in sources]
    tokenizer = srv.app.state.models.models[EMBEDDED_MODEL_NAME].llm.tokenizer
    assert out.usage.prompt_tokens == len(tokenizer.encode_chat(ground_conversation(QUESTION, shown)))
    assert out.usage.prompt_tokens + 8 <= 256 and out.usage.completion_tokens >= 1


def test_without_max_tokens_the_answer_keeps_a_quarter_of_the_window(served):
    _, client = served
    out = ask(client)
    assert out.usage.prompt_tokens <= 256 - 64 and "sources_note" in out.model_extra


def test_a_stream_carries_the_note_with_the_sources(served):
    _, client = served
    chunks = list(ask(client, max_tokens=4, stream=True))
    first = chunks[0].model_extra
    assert first["sources"] and "sources dropped" in first["sources_note"]
    assert all("sources_note" not in (c.model_extra or {}) for c in chunks[1:])
