"""`selfhost export onnx`: a checkpoint folder -> a folder ONNX Runtime (and ONNX Runtime GenAI) runs.

The folder is written under a temporary name beside the destination and renamed
into place only once everything is in it and `onnx.checker` has passed, so a
failed or interrupted export leaves no partial folder. Weights always go to an
external data file (layout.WEIGHTS_FILE): the graph file stays small and models
past protobuf's 2 GB limit export the same way as tiny ones.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch

from selfhost.errors import InvalidParameterError, SelfhostError, UnsupportedModelError
from selfhost.models.families import spec_from_config
from selfhost.models.loader import load_model, read_config
from selfhost.onnx import layout
from selfhost.onnx.decoder_graph import build_decoder_graph, pick_attention
from selfhost.onnx.export_info import ExportInfo, OnnxExportConfig

# Architectures with an ONNX path -> the model type ONNX Runtime GenAI knows them by.
GENAI_MODEL_TYPES = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen3ForCausalLM": "qwen3",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3_text",
    "Phi3ForCausalLM": "phi3",
}
IO_DTYPES = {"fp32": np.float32, "fp16": np.float16}


@dataclass(frozen=True)
class ExportResult:
    folder: Path
    info: ExportInfo
    graph_bytes: int
    weight_bytes: int


def export_onnx(model_dir: Path, out: Path, config: OnnxExportConfig) -> ExportResult:
    """Export the checkpoint in `model_dir` to the new folder `out`."""
    if out.exists():
        raise InvalidParameterError(f"output folder {out} already exists; choose a new path or remove it first")
    if not out.parent.is_dir():
        raise InvalidParameterError(f"cannot create {out}: its parent folder {out.parent} does not exist")
    cfg = read_config(model_dir)
    if cfg.get("quantization_config"):
        raise UnsupportedModelError(
            f"{model_dir} is a quantized checkpoint; export its full-precision checkpoint (--quant quantizes for ONNX)")
    architectures = cfg.get("architectures") or []
    arch = next((a for a in architectures if a in GENAI_MODEL_TYPES), None)
    if arch is None:
        raise UnsupportedModelError(
            f"architecture {architectures or 'unknown'} has no ONNX export path; supported: {', '.join(GENAI_MODEL_TYPES)}")
    spec_from_config({**cfg, "architectures": [arch]})  # unsupported rope scaling and the like fail here, cleanly
    model = load_model(model_dir, torch.float32, torch.device("cpu"))
    attention = pick_attention(config.attention, model.spec)
    graph = build_decoder_graph(model, IO_DTYPES[config.dtype], config.weight_bits, attention)
    spec = model.spec
    info = ExportInfo(
        source=str(model_dir), architecture=arch, dtype=config.dtype, quant=config.quant, attention=attention,
        max_len=model.max_len, num_layers=spec.num_layers, num_kv_heads=spec.num_kv_heads, head_dim=spec.head_dim,
        vocab_size=spec.vocab_size,
    )
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        staging.mkdir()
        _write_folder(staging, graph, model_dir, cfg, info)
        staging.rename(out)
    except BaseException as e:  # KeyboardInterrupt too: never leave a half-written folder behind
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError):
            raise SelfhostError(f"cannot write the ONNX export to {out}: {e}") from e
        raise
    return ExportResult(out, info, (out / layout.MODEL_FILE).stat().st_size, (out / layout.WEIGHTS_FILE).stat().st_size)


def _write_folder(folder: Path, graph: onnx.ModelProto, model_dir: Path, cfg: dict, info: ExportInfo) -> None:
    graph_path = folder / layout.MODEL_FILE
    onnx.save_model(graph, str(graph_path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=layout.WEIGHTS_FILE, size_threshold=1024)
    # By path, so the checker reads the external data itself and never needs one 2 GB protobuf.
    onnx.checker.check_model(str(graph_path))
    for name in layout.CARRIED_FILES:
        if (model_dir / name).is_file():
            shutil.copy2(model_dir / name, folder / name)
    generation = _read_json(model_dir / "generation_config.json")
    config = layout.genai_config(
        model_type=GENAI_MODEL_TYPES[info.architecture], num_layers=info.num_layers,
        num_heads=cfg["num_attention_heads"], num_kv_heads=info.num_kv_heads, head_dim=info.head_dim,
        hidden_size=cfg["hidden_size"], vocab_size=info.vocab_size, context_length=info.max_len,
        bos_token_id=generation.get("bos_token_id", cfg.get("bos_token_id")),
        eos_token_ids=_eos_ids(generation, cfg), pad_token_id=generation.get("pad_token_id", cfg.get("pad_token_id")),
        generation=generation,
    )
    (folder / layout.GENAI_CONFIG).write_text(json.dumps(config, indent=4) + "\n")
    info.write(folder)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _eos_ids(generation: dict, cfg: dict) -> list[int]:
    eos = generation.get("eos_token_id", cfg.get("eos_token_id"))
    ids = eos if isinstance(eos, list) else [eos] if eos is not None else []
    if not ids:
        raise UnsupportedModelError("the checkpoint names no eos_token_id (config.json or generation_config.json); "
                                    "ONNX Runtime GenAI needs one to stop generating")
    return ids
