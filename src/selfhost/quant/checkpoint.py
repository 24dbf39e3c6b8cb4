"""The offline step: a full-precision checkpoint folder -> a quantized one.

Works tensor by tensor on the files (no model forward, no fused copies):
q/k/v and gate/up are quantized row-wise, so quantizing the separate
checkpoint tensors gives exactly the rows of our fused modules. The output
folder appears whole or not at all: everything is written to a temporary
folder beside it and renamed into place at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Container
from pathlib import Path

import torch

from selfhost.errors import InvalidParameterError
from selfhost.models.decoder import CausalLM
from selfhost.models.families import PACKED_WEIGHTS, checkpoint_name, spec_from_config
from selfhost.models.loader import checkpoint_tensors, is_dequantized_at_load, read_config, weight_files
from selfhost.quant.apply import quantization_plan
from selfhost.quant.config import QuantConfig
from selfhost.quant.int4 import quantize_int4
from selfhost.quant.int8 import quantize_int8

WEIGHTS_FILE = "model.safetensors"
# Source files that the quantized folder replaces rather than copies.
_REPLACED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf")
_REPLACED_NAMES = ("config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json")


def quantized_tensors(name: str, weight: torch.Tensor, method: str, config: QuantConfig) -> dict[str, torch.Tensor]:
    """Stored tensors for one weight: `<module>.qweight`, `.scales` (and `.zeros` for int4)."""
    module = name.removesuffix(".weight")
    if method == "int8":
        q, scales = quantize_int8(weight)
        return {f"{module}.qweight": q, f"{module}.scales": scales}
    q, scales, zeros = quantize_int4(weight, config.group_size_for(weight.shape[1]), config.symmetric)
    return {f"{module}.qweight": q, f"{module}.scales": scales, f"{module}.zeros": zeros}


def _our_module(tensor_name: str, modules: Container[str]) -> tuple[str, str]:
    """Checkpoint tensor name -> (our module name, leaf): q_proj maps to its fused qkv_proj where the
    model has one (`modules`: its module names; latent attention keeps a q_proj of its own)."""
    module_path, _, leaf = tensor_name.rpartition(".")
    parent, _, module = module_path.rpartition(".")
    if module in PACKED_WEIGHTS and f"{parent}.{PACKED_WEIGHTS[module][0]}" in modules:
        module_path = f"{parent}.{PACKED_WEIGHTS[module][0]}"
    return module_path, leaf


def check_writable(out_dir: Path, overwrite: bool = False) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise InvalidParameterError(f"output path {out_dir} exists and is not a folder")
    if out_dir.exists() and any(out_dir.iterdir()) and not overwrite:
        raise InvalidParameterError(
            f"output folder {out_dir} already exists and is not empty; choose a new folder or pass --force"
        )
    parent = out_dir.resolve().parent
    if not parent.is_dir():
        raise InvalidParameterError(f"cannot write {out_dir}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise InvalidParameterError(f"cannot write {out_dir}: no write permission on folder {parent}")


def quantize_checkpoint(model_dir: Path, out_dir: Path, config: QuantConfig, overwrite: bool = False) -> dict[str, str]:
    """Write a quantized copy of `model_dir` to `out_dir`; returns {module name: method} of what was quantized.

    An existing non-empty `out_dir` is replaced only with `overwrite`, once the new copy is complete.
    """
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    if out_dir.resolve() == model_dir.resolve():
        raise InvalidParameterError(f"output folder {out_dir} is the model being quantized; choose a new folder")
    cfg = read_config(model_dir)
    # A publisher's FP8 or MXFP4 release is read dequantized (fp32), as the loader reads it, and requantized.
    source_format = cfg.pop("quantization_config", None) if is_dequantized_at_load(cfg.get("quantization_config")) else None
    if "quantization_config" in cfg:
        method = cfg["quantization_config"].get("method") or cfg["quantization_config"].get("quant_method")
        raise InvalidParameterError(
            f"{model_dir} is already quantized ({method}); quantize its full-precision checkpoint instead"
        )
    check_writable(out_dir, overwrite)
    spec = spec_from_config(cfg)
    with torch.device("meta"):
        model = CausalLM(spec, max_len=1)
    plan = quantization_plan(model, config)
    head_tied = spec.tie_embeddings and "lm_head" in plan

    try:
        tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.resolve().parent))
    except PermissionError as err:
        raise InvalidParameterError(f"cannot write {out_dir}: {err.strerror} ({err.filename})") from err
    try:
        os.chmod(tmp_dir, 0o755)  # mkdtemp makes it private; the result is an ordinary folder
        tensors: dict[str, torch.Tensor] = {}
        modules = {name for name, _ in model.named_modules()}
        # As the loader reads them: FP8 blocks dequantized, one tensor per expert where a checkpoint stacks them.
        stored = checkpoint_tensors(weight_files(model_dir, allow_pickle=False), spec.architecture, source_format,
                                    torch.float32)
        for name, tensor in stored:
            name = checkpoint_name(spec.architecture, name)  # written in the common spelling the loader reads
            module, leaf = _our_module(name, modules)
            if head_tied and module == "lm_head":
                continue  # the embedding's quantized rows serve as the head
            if module in plan and leaf == "weight":
                tensors.update(quantized_tensors(name, tensor.contiguous(), plan[module], config))  # (a split expert is a view)
            else:
                tensors[name] = tensor.contiguous()
        _save(tensors, tmp_dir / WEIGHTS_FILE)
        _copy_side_files(model_dir, tmp_dir)
        cfg["quantization_config"] = config.to_json()
        (tmp_dir / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        replaced = None
        if out_dir.exists():  # empty, or to be replaced (checked above): rename needs the name free
            replaced = tmp_dir.with_name(tmp_dir.name + ".replaced")
            os.rename(out_dir, replaced)
        os.rename(tmp_dir, out_dir)
        if replaced is not None:
            shutil.rmtree(replaced, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return plan


def _save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt", "quantized_by": "selfhost"})
    os.chmod(path, 0o644)


def _copy_side_files(model_dir: Path, out_dir: Path) -> None:
    """Tokenizer, generation config, chat template, licence: everything but the weights and config."""
    for path in model_dir.iterdir():
        if path.is_file() and path.suffix not in _REPLACED_SUFFIXES and path.name not in _REPLACED_NAMES:
            shutil.copy2(path, out_dir / path.name)
