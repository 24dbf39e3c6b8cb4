"""One weight loader: quantized checkpoints and on-the-fly quantization both go through models/loader.py."""

from __future__ import annotations

import subprocess
import sys

import pytest

from selfhost import LLM
from selfhost.models import loader
from selfhost.quant.checkpoint import quantize_checkpoint
from selfhost.quant.config import QuantConfig
from selfhost.quant.int4 import Int4Linear
from selfhost.quant.int8 import Int8Linear


def test_models_do_not_import_quant():
    probe = ("import sys, selfhost.models.loader, selfhost.models.decoder; "
             "print([m for m in sys.modules if m.startswith('selfhost.quant')])")
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


@pytest.fixture
def load_calls(monkeypatch):
    calls = []
    real = loader.load_weights

    def counting(model, *args, **kwargs):
        calls.append(type(model.model.layers[0].mlp.down_proj))
        return real(model, *args, **kwargs)

    monkeypatch.setattr(loader, "load_weights", counting)
    return calls


def test_quantized_folder_and_on_the_fly_use_the_one_loop(tiny_checkpoint, tmp_path, load_calls):
    path = tiny_checkpoint("llama")
    quantize_checkpoint(path, tmp_path / "int4", QuantConfig(method="int4", group_size=32))
    from_folder = LLM(str(tmp_path / "int4"), kv_cache_memory=1 << 22)
    assert isinstance(from_folder.model.model.layers[0].mlp.down_proj, Int4Linear)
    on_the_fly = LLM(str(path), quantization="int8", kv_cache_memory=1 << 22)
    assert isinstance(on_the_fly.model.model.layers[0].mlp.down_proj, Int8Linear)
    # The folder's tensors were read into quantized modules; on the fly, full precision was read, then shrunk.
    assert [cls.__name__ for cls in load_calls] == ["Int4Linear", "Linear"]


def test_quantizing_a_quantized_folder_is_refused_before_loading(tiny_checkpoint, tmp_path, load_calls):
    from selfhost.errors import InvalidParameterError

    quantize_checkpoint(tiny_checkpoint("llama"), tmp_path / "int8", QuantConfig(method="int8"))
    with pytest.raises(InvalidParameterError, match=r"already quantized \(int8\)"):
        LLM(str(tmp_path / "int8"), quantization="int4", kv_cache_memory=1 << 22)
    assert load_calls == []
