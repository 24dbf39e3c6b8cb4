"""What /api/tags and /api/show say about a model: parameters counted from its architecture
(not from packed int4 storage) and the quantization its folder declares."""

from __future__ import annotations

import httpx
import pytest
from transformers import AutoModelForCausalLM

from selfhost.quant.checkpoint import quantize_checkpoint
from selfhost.quant.config import QuantConfig
from selfhost.server.settings import ServerSettings
from tests.server.conftest import LoopbackServer


@pytest.fixture(scope="module")
def checkpoints(tiny_checkpoint, tmp_path_factory):
    full = tiny_checkpoint("llama")
    int4 = tmp_path_factory.mktemp("quantized") / "tiny-int4"
    quantize_checkpoint(full, int4, QuantConfig("int4"))  # what `selfhost quantize --method int4` writes
    return full, int4


@pytest.fixture(scope="module")
def http(checkpoints, tmp_path_factory):
    full, int4 = checkpoints
    settings = ServerSettings(models=[f"full={full}", f"q4={int4}"], kv_cache_memory="16MiB",
                              rag_store=tmp_path_factory.mktemp("rag-store"))
    server = LoopbackServer(settings).start()
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            yield client
    finally:
        server.stop()


def test_int4_folder_reports_its_architectures_parameters_and_int4(http, checkpoints):
    reference = AutoModelForCausalLM.from_pretrained(checkpoints[0]).num_parameters()  # transformers' count
    details = {m["name"]: m["details"] for m in http.get("/api/tags").json()["models"]}
    assert details["full"]["quantization_level"] == "FLOAT32"
    assert details["q4"]["quantization_level"] == "INT4"
    size = f"{reference / 1e6:.1f}M"
    assert details["full"]["parameter_size"] == details["q4"]["parameter_size"] == size
    for name in ("full", "q4"):
        shown = http.post("/api/show", json={"model": name}).json()
        assert shown["model_info"]["general.parameter_count"] == reference
        assert shown["details"] == details[name]
