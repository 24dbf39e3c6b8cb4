"""`selfhost serve --lora NAME=FOLDER`: adapters are models clients name, on the base's one engine."""

import time

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
    rank8 = make_peft_adapter(tiny_checkpoint("llama"), tmp_path / "rank8", ["q_proj"], r=8, lora_alpha=8)
    settings = ServerSettings(models=[str(tiny_checkpoint("llama"))], lora=[f"big={rank8}"], max_lora_rank=4)
    with pytest.raises(APIError, match="big=.*rank 8, more than max_lora_rank=4"):  # at start-up, not on first use
        asyncio.run(ModelRegistry(settings).preload())


# -- adapters added and removed while serving (--allow-load) ------------------------------------------

LONG_PROMPT = "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer"


def _pickle_only(folder, out):
    """The same adapter as older PEFT versions saved it: adapter_model.bin (a torch.save pickle)."""
    import shutil

    import torch
    from safetensors.torch import load_file

    shutil.copytree(folder, out)
    torch.save(load_file(str(out / "adapter_model.safetensors")), out / "adapter_model.bin")
    (out / "adapter_model.safetensors").unlink()
    return out


@pytest.fixture(scope="module")
def dynamic(tiny_checkpoint, tmp_path_factory):
    from tests.tiny_models import make_tiny_checkpoint

    model_dir = tiny_checkpoint("llama")
    root = tmp_path_factory.mktemp("dynamic")
    targets = ["q_proj", "v_proj", "down_proj"]
    folders = {name: make_peft_adapter(model_dir, root / name, targets, seed=10 + i, r=4, lora_alpha=16)
               for i, name in enumerate(["legal", "medical", "medical-v2", "extra", "by-path"])}
    folders["rank8"] = make_peft_adapter(model_dir, root / "rank8", targets, r=8, lora_alpha=16)
    other_base = make_tiny_checkpoint("llama", root / "other-base", intermediate_size=96)
    folders["other-base"] = make_peft_adapter(other_base, root / "other-base-adapter", targets, r=4, lora_alpha=16)
    folders["pickle"] = _pickle_only(folders["legal"], root / "pickle")
    (root / "empty").mkdir()
    folders["empty"] = root / "empty"
    settings = ServerSettings(
        models=[f"tiny={model_dir}"], lora=[f"legal={folders['legal']}"], allow_load=True, max_loras=2,
        max_lora_rank=4, kv_cache_memory="64MiB", weight_dtype="float32",
        rag_store=tmp_path_factory.mktemp("rag"), responses_db=tmp_path_factory.mktemp("responses") / "r.db",
    )
    server = LoopbackServer(settings).start()
    yield server, model_dir, folders
    server.stop()


def _offline_text(model_dir, folder, prompt, max_tokens=8):
    llm = LLM(str(model_dir), lora={"a": str(folder)})
    return llm.generate(prompt, SamplingParams(temperature=0, max_tokens=max_tokens), lora="a")[0].text


def _complete(http, model, prompt=PROMPT, max_tokens=8, **extra):
    return http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": max_tokens,
                                              "temperature": 0, **extra})


def test_load_serve_unload_and_reload_over_http(dynamic):
    server, model_dir, folders = dynamic
    with httpx.Client(base_url=server.url, timeout=60) as http:
        loaded = http.post("/v1/load_lora_adapter", json={"lora_name": "medical", "lora_path": str(folders["medical"])})
        assert loaded.status_code == 200, loaded.text
        card = loaded.json()
        assert (card["id"], card["parent"], card["rank"]) == ("medical", "tiny", 4)
        assert card["target_modules"] == ["down_proj", "q_proj", "v_proj"]
        listed = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert listed["medical"]["parent"] == "tiny" and listed["tiny"]["parent"] is None
        response = _complete(http, "medical", LONG_PROMPT)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == _offline_text(model_dir, folders["medical"], LONG_PROMPT)

        unloaded = http.post("/v1/unload_lora_adapter", json={"lora_name": "medical"})
        assert unloaded.status_code == 200 and unloaded.json() == {"id": "medical", "object": "lora_adapter",
                                                                  "deleted": True}
        assert "medical" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert _complete(http, "medical").status_code == 404
        again = http.post("/v1/unload_lora_adapter", json={"lora_name": "medical"})
        assert again.status_code == 404 and again.json()["error"]["code"] == "adapter_not_found"

        # Same name, other weights: the prompt's KV blocks cached under the old adapter are not reused.
        reloaded = http.post("/v1/load_lora_adapter", json={"lora_name": "medical",
                                                             "lora_path": str(folders["medical-v2"])})
        assert reloaded.status_code == 200, reloaded.text
        text = _complete(http, "medical", LONG_PROMPT).json()["choices"][0]["text"]
        assert text == _offline_text(model_dir, folders["medical-v2"], LONG_PROMPT)
        assert text != response.json()["choices"][0]["text"]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "medical"}).status_code == 200


@pytest.mark.parametrize("folder, status, code, message", [
    ("missing", 400, "invalid_adapter", "is not a folder"),
    ("empty", 400, "invalid_adapter", "adapter_config.json is missing"),
    ("rank8", 400, "invalid_adapter", "rank 8, more than max_lora_rank=4"),
    ("other-base", 400, "invalid_adapter", "made for another base model"),
    ("pickle", 400, "invalid_adapter", "--lora-allow-pickle"),
])
def test_bad_adapters_are_refused_with_4xx(dynamic, folder, status, code, message):
    server, _, folders = dynamic
    path = str(folders.get(folder, folders["empty"].parent / "no-such-folder"))
    with httpx.Client(base_url=server.url, timeout=60) as http:
        before = {m["id"] for m in http.get("/v1/models").json()["data"]}
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "bad", "lora_path": path})
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["code"] == code and message in error["message"] and error["type"] == "invalid_request_error"
        assert {m["id"] for m in http.get("/v1/models").json()["data"]} == before


def test_load_request_mistakes(dynamic):
    server, _, folders = dynamic
    with httpx.Client(base_url=server.url, timeout=60) as http:
        taken = http.post("/v1/load_lora_adapter", json={"lora_name": "legal", "lora_path": str(folders["extra"])})
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "adapter_exists"
        model = http.post("/v1/load_lora_adapter", json={"lora_name": "tiny", "lora_path": str(folders["extra"])})
        assert model.status_code == 409
        empty = http.post("/v1/load_lora_adapter", json={"lora_name": "", "lora_path": str(folders["extra"])})
        assert empty.status_code == 400 and empty.json()["error"]["param"] == "lora_name"
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "tiny"}).status_code == 404


def test_a_request_naming_an_adapter_folder_loads_it(dynamic):
    server, model_dir, folders = dynamic
    path = str(folders["by-path"])
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = _complete(http, path)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["text"] == _offline_text(model_dir, folders["by-path"], PROMPT)
        assert {m["id"]: m["parent"] for m in http.get("/v1/models").json()["data"]}[path] == "tiny"
        assert _complete(http, path).status_code == 200  # loaded once, served again
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": path}).status_code == 200


def test_a_request_for_an_adapter_waits_for_a_slot(dynamic):
    """Every slot held by other adapters: the request queues (no error) and runs once one frees."""
    import concurrent.futures

    server, model_dir, folders = dynamic
    with httpx.Client(base_url=server.url, timeout=60) as http:
        for name in ("medical", "extra"):
            assert http.post("/v1/load_lora_adapter",
                             json={"lora_name": name, "lora_path": str(folders[name])}).status_code == 200
        server.wait_idle("tiny")
        models = server.app.state.models.models
        adapters = models["tiny"].llm.adapters
        # Two running requests would hold both slots (max_loras=2); the engine is idle, so take them here.
        held = [adapters.acquire(models[name].lora) for name in ("legal", "medical")]
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            try:
                queued = pool.submit(_complete, http, "extra")
                deadline = time.monotonic() + 30
                while server.engine_stats("tiny").num_waiting == 0:
                    assert time.monotonic() < deadline, "the request never reached the queue"
                    time.sleep(0.01)
                assert not queued.done()
                assert _complete(http, "legal").status_code == 200  # an adapter already in a slot runs meanwhile
                assert _complete(http, "tiny").status_code == 200
                assert not queued.done()
            finally:
                for slot in held:
                    adapters.release(slot)
            freed = queued.result(timeout=60)
        assert freed.status_code == 200, freed.text
        assert freed.json()["choices"][0]["text"] == _offline_text(model_dir, folders["extra"], PROMPT)
        for name in ("medical", "extra"):
            assert http.post("/v1/unload_lora_adapter", json={"lora_name": name}).status_code == 200


def test_loading_needs_allow_load(served):
    server, _, folders = served
    with httpx.Client(base_url=server.url, timeout=60) as http:
        response = http.post("/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(folders["legal"])})
        assert response.status_code == 403 and "--allow-load" in response.json()["error"]["message"]
        assert http.post("/v1/unload_lora_adapter", json={"lora_name": "legal"}).status_code == 403
        assert _complete(http, str(folders["legal"])).status_code == 404


def test_engine_side_slot_refusal_is_a_429():
    from selfhost.lora.errors import AdapterError, AdapterSlotsBusyError
    from selfhost.server.errors import from_selfhost_error

    assert from_selfhost_error(AdapterSlotsBusyError("all held")).status == 429
    assert from_selfhost_error(AdapterError("bad folder")).status == 400
