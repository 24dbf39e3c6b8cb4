"""`selfhost serve --lora NAME=FOLDER`: adapters are models clients name, on the base's one engine."""

import httpx
import pytest

from selfhost import LLM, SamplingParams
from selfhost.server.settings import ServerSettings
from tests.lora.conftest import make_peft_adapter
from tests.server.conftest import LoopbackServer

PROMPT = "To be, or not to be"


@pytest.fixture(scope="module")
def served(tiny_checkpoint, tmp_path_factory):
    model_dir = tiny_checkpoint("llama")
    root = tmp_path_factory.mktemp("adapters")
    folders = {name: make_peft_adapter(model_dir, root / name, ["q_proj", "v_proj", "down_proj"], seed=i, r=4,
                                       lora_alpha=16) for i, name in enumerate(["legal", "medical"])}
    settings = ServerSettings(
        models=[f"tiny={model_dir}"], lora=[f"{name}={folder}" for name, folder in folders.items()],
        kv_cache_memory="64MiB", weight_dtype="float32", rag_store=tmp_path_factory.mktemp("rag"),
        responses_db=tmp_path_factory.mktemp("responses") / "responses.db",
    )
    server = LoopbackServer(settings).start()
    yield server, model_dir, folders
    server.stop()


def test_adapters_are_listed_and_answer_as_offline(served):
    server, model_dir, folders = served
    with httpx.Client(base_url=server.url, timeout=60) as http:
        assert {m["id"] for m in http.get("/v1/models").json()["data"]} >= {"tiny", "legal", "medical"}
        assert {m["name"] for m in http.get("/api/tags").json()["models"]} >= {"tiny", "legal", "medical"}
        texts = {}
        for name in ("tiny", "legal", "medical"):
            response = http.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": 8,
                                                          "temperature": 0})
            assert response.status_code == 200, response.text
            texts[name] = response.json()["choices"][0]["text"]
    offline = LLM(str(model_dir), lora={k: str(v) for k, v in folders.items()})
    params = SamplingParams(temperature=0, max_tokens=8)
    expected = {name: offline.generate(PROMPT, params, lora=None if name == "tiny" else name)[0].text
                for name in texts}
    assert texts == expected
    assert len(set(texts.values())) == 3
    models = server.app.state.models.models
    assert models["legal"].engine is models["tiny"].engine  # one engine, one copy of the base


def test_bad_lora_argument_is_refused(tiny_checkpoint, tmp_path):
    import asyncio

    from selfhost.server.errors import APIError
    from selfhost.server.models import ModelRegistry

    settings = ServerSettings(models=[str(tiny_checkpoint("llama"))], lora=["no-folder"])
    with pytest.raises(APIError, match="NAME=FOLDER"):
        asyncio.run(ModelRegistry(settings).preload())
