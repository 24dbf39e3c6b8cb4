"""Build a CausalLM from a checkpoint folder (config.json + safetensors).

The model is created on the meta device and every parameter is materialised
straight from the checkpoint, so a model is never initialised twice. Separate
q/k/v and gate/up tensors are copied into their slice of the fused weight.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from selfhost.errors import UnsupportedModelError
from selfhost.models.decoder import CausalLM
from selfhost.models.families import PACKED_WEIGHTS, spec_from_config
from selfhost.models.spec import ModelSpec
from selfhost.models.transformers_fallback import TransformersModel, load_transformers_model
from selfhost.models.weight_arena import place_weights_in_arena


def read_config(model_dir: Path) -> dict:
    return json.loads((model_dir / "config.json").read_text())


def weight_files(model_dir: Path, allow_pickle: bool) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / s for s in shards]
    files = sorted(model_dir.glob("*.safetensors"))
    if files:
        return files
    pickled = sorted(model_dir.glob("*.bin"))
    if pickled and allow_pickle:
        return pickled
    if pickled:
        raise UnsupportedModelError(
            f"{model_dir} has only pickled weights ({pickled[0].name}); loading them can run arbitrary code. "
            "Convert them to safetensors, or pass --allow-pickle (allow_pickle=True) if you trust the source"
        )
    raise UnsupportedModelError(f"no weights found in {model_dir} (expected *.safetensors)")


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for path in files:
        if path.suffix == ".bin":
            yield from torch.load(path, map_location="cpu", weights_only=True, mmap=True).items()
            continue
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)


def shard_slices(spec: ModelSpec) -> dict[str, list[tuple[int, int]]]:
    """Row ranges of each packed weight (qkv_proj, gate_up_proj) inside the fused matrix."""
    q, kv = spec.num_heads * spec.head_dim, spec.num_kv_heads * spec.head_dim
    inter = spec.intermediate_size
    return {"qkv_proj": [(0, q), (q, q + kv), (q + kv, q + 2 * kv)], "gate_up_proj": [(0, inter), (inter, 2 * inter)]}


def load_model(
    model_dir: Path,
    dtype: torch.dtype,
    device: torch.device,
    max_len: int | None = None,
    allow_pickle: bool = False,
    transformers_fallback: bool = False,
) -> CausalLM | TransformersModel:
    """The native model for a supported family; else, when allowed, transformers' own (slower)."""
    cfg = read_config(model_dir)
    if "quantization_config" in cfg:  # written by `selfhost quantize`: quantized modules, own tensor names
        from selfhost.quant.apply import load_quantized_model

        return load_quantized_model(model_dir, cfg, dtype, device, max_len)
    try:
        spec = spec_from_config(cfg)
    except UnsupportedModelError:
        if not transformers_fallback:
            raise
        return load_transformers_model(model_dir, dtype, device, max_len, allow_pickle)
    files = weight_files(model_dir, allow_pickle)
    max_len = min(max_len or spec.max_position, spec.max_position)
    with torch.device("meta"):
        model = CausalLM(spec, max_len)
    model.to_empty(device=device)
    model.to(dtype)
    model.reset_rotaries()  # buffers computed on the meta device hold no values
    if spec.tie_embeddings:
        model.tie_weights()  # before the arena, so the shared table gets one slot
    if device.type == "cpu":
        place_weights_in_arena(model)  # huge pages: decode streams every weight each step

    params = dict(model.named_parameters())
    slices = shard_slices(spec)
    loaded: set[str] = set()
    # stderr, so piped generated text stays clean
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"loading {model_dir.name}", total=len(params))
        for name, tensor in iter_tensors(files):
            module_path, _, leaf = name.rpartition(".")
            parent, _, module = module_path.rpartition(".")
            if module in PACKED_WEIGHTS:
                fused, shard = PACKED_WEIGHTS[module]
                target_name = f"{parent}.{fused}.{leaf}"
                start, end = slices[fused][shard]
                target = params.get(target_name)
                if target is None:
                    continue
                target.data[start:end].copy_(tensor)
                loaded.add(f"{target_name}#{shard}")
            else:
                target = params.get(name)
                if target is None:
                    continue  # e.g. rotary inv_freq buffers some checkpoints carry
                if target.shape != tensor.shape:
                    raise UnsupportedModelError(
                        f"tensor {name} has shape {tuple(tensor.shape)}, config implies {tuple(target.shape)}"
                    )
                target.data.copy_(tensor)
                loaded.add(name)
            progress.advance(task)

    if spec.tie_embeddings:
        model.tie_weights()
        params.pop("lm_head.weight", None)
    missing = [n for n in params if not _is_loaded(n, loaded, slices)]
    if missing:
        raise UnsupportedModelError(f"checkpoint {model_dir} lacks tensors: {', '.join(missing[:5])}")
    return model.eval()


def _is_loaded(param_name: str, loaded: set[str], slices: dict[str, list[tuple[int, int]]]) -> bool:
    if param_name in loaded:
        return True
    fused = param_name.rpartition(".")[0].rpartition(".")[2]
    return fused in slices and all(f"{param_name}#{i}" in loaded for i in range(len(slices[fused])))
