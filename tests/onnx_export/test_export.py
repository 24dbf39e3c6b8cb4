"""`selfhost export onnx`: the folder's contents, and bad input refused with one line and nothing left behind."""

import json
import shutil
import subprocess
import sys

import onnx
import pytest

from selfhost.errors import InvalidParameterError, UnsupportedModelError
from selfhost.hub import EMBEDDED_MODEL_DIR
from selfhost.onnx import export as export_module, layout
from selfhost.onnx.export import export_onnx
from selfhost.onnx.export_info import OnnxExportConfig


def _cli(*args):
    return subprocess.run([sys.executable, "-m", "selfhost.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=120)


def _one_line_error(proc) -> str:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 1 and len(lines) == 1 and lines[0].startswith("error:"), proc.stderr
    return lines[0]


def test_cli_writes_a_genai_folder_with_weights_outside_the_graph(tmp_path):
    out = tmp_path / "demo-int4"
    proc = _cli("export", "onnx", "default", "-o", out, "--quant", "int4")
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stderr
    names = {p.name for p in out.iterdir()}
    assert {layout.MODEL_FILE, layout.WEIGHTS_FILE, layout.GENAI_CONFIG, layout.EXPORT_INFO, "tokenizer.json",
            "tokenizer_config.json", "generation_config.json", "config.json"} <= names
    # Every sizeable tensor lives in the external data file, so no model meets protobuf's 2 GB limit.
    graph = onnx.load(str(out / layout.MODEL_FILE), load_external_data=False)
    big = [t for t in graph.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert big and all(not t.raw_data for t in big)
    assert (out / layout.MODEL_FILE).stat().st_size < 100_000 < (out / layout.WEIGHTS_FILE).stat().st_size
    assert any(n.op_type == "MatMulNBits" for n in graph.graph.node)
    assert any(n.op_type == "GroupQueryAttention" for n in graph.graph.node)
    config = json.loads((out / layout.GENAI_CONFIG).read_text())
    decoder = config["model"]["decoder"]
    assert decoder["inputs"]["past_key_names"] == "past_key_values.%d.key"
    assert decoder["outputs"]["present_value_names"] == "present.%d.value"
    assert {i.name for i in graph.graph.input} == {"input_ids", "attention_mask"} | {
        name % i for i in range(decoder["num_hidden_layers"]) for name in (layout.PAST_KEY, layout.PAST_VALUE)}
    assert config["model"]["type"] == "llama" and config["model"]["context_length"] == 256


def test_existing_output_folder_is_refused_and_left_alone(tmp_path):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    message = _one_line_error(_cli("export", "onnx", "default", "-o", out))
    assert f"output folder {out} already exists" in message
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_architecture_without_an_onnx_path_is_refused(tiny_checkpoint, tmp_path):
    src = tmp_path / "gpt2"
    shutil.copytree(tiny_checkpoint("llama"), src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "architectures": ["GPT2LMHeadModel"]}))
    out = tmp_path / "out"
    message = _one_line_error(_cli("export", "onnx", src, "-o", out))
    assert "['GPT2LMHeadModel'] has no ONNX export path" in message and "LlamaForCausalLM" in message
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpt2"]


def test_bad_options_are_refused_before_anything_loads(tmp_path):
    # (The CLI prints any SelfhostError as one line, exit 1: the tests above check that path once.)
    with pytest.raises(InvalidParameterError, match="ONNX quantization 'int3' is not supported"):
        OnnxExportConfig(quant="int3")
    with pytest.raises(InvalidParameterError, match="ONNX dtype 'bf16' is not supported; choose one of fp32, fp16"):
        OnnxExportConfig(dtype="bf16")
    with pytest.raises(InvalidParameterError, match="attention 'flash' is not supported"):
        OnnxExportConfig(attention="flash")


def test_a_failed_export_leaves_no_partial_folder(tmp_path, monkeypatch):
    def failing_check(path):
        raise onnx.checker.ValidationError("simulated failure after the weights were written")

    monkeypatch.setattr(export_module.onnx.checker, "check_model", failing_check)
    with pytest.raises(onnx.checker.ValidationError):
        export_onnx(EMBEDDED_MODEL_DIR, tmp_path / "out", OnnxExportConfig())
    assert list(tmp_path.iterdir()) == []  # neither the folder nor its staging copy


def test_a_failed_write_is_a_selfhost_error(tmp_path, monkeypatch):
    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(export_module.onnx, "save_model", full_disk)
    with pytest.raises(Exception) as caught:
        export_onnx(EMBEDDED_MODEL_DIR, tmp_path / "out", OnnxExportConfig())
    assert "No space left on device" in str(caught.value) and "cannot write the ONNX export" in str(caught.value)
    assert list(tmp_path.iterdir()) == []


def test_missing_parent_and_quantized_checkpoints_are_refused(tiny_checkpoint, tmp_path):
    with pytest.raises(InvalidParameterError, match="parent folder"):
        export_onnx(EMBEDDED_MODEL_DIR, tmp_path / "no" / "such" / "out", OnnxExportConfig())
    src = tmp_path / "quantized"
    shutil.copytree(tiny_checkpoint("llama"), src)
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps({**config, "quantization_config": {"method": "int8"}}))
    with pytest.raises(UnsupportedModelError, match="quantized checkpoint"):
        export_onnx(src, tmp_path / "out", OnnxExportConfig())
