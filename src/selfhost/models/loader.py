"""Build a CausalLM from a checkpoint folder (config.json + safetensors): the one weight loader.

The model is created on the meta device in its final dtype and every tensor is
materialised straight from the checkpoint, so a model is never initialised
twice. Separate q/k/v and gate/up tensors are copied into their rows of the
fused weight. The same loop loads a checkpoint written by `selfhost quantize`
(config.json names its `quantization_config`): quant/ swaps empty quantized
modules into the meta model first, and the loop fills their tensors, which
keep the source checkpoint's names. On-the-fly quantization loads the full
precision weights here, then hands the model to quant/ to shrink.

Load, then shrink: quant/ imports models/, never the reverse at import time;
this module reaches for quant/ only when a checkpoint or caller asks for it.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from selfhost.errors import InvalidParameterError, UnsupportedModelError
from selfhost.layers.rotary import RotaryEmbedding
from selfhost.models.decoder import CausalLM
from selfhost.models.families import PACKED_WEIGHTS, checkpoint_name, spec_from_config
from selfhost.models.fp8 import FP8_METHOD, Fp8BlockFormat, dequantize_fp8_tensors
from selfhost.models.fused_experts import per_expert_tensors
from selfhost.models.spec import ModelSpec
from selfhost.models.transformers_fallback import TransformersModel, load_transformers_model
from selfhost.models.weight_arena import place_weights_in_arena

if TYPE_CHECKING:
    from selfhost.quant.config import QuantConfig

log = logging.getLogger(__name__)

MXFP4_METHOD = "mxfp4"  # quantization_config.quant_method of OpenAI's gpt-oss release
# Publishers' quantized releases that load dequantized (to the load dtype, tensor by tensor as they are
# read), unlike `selfhost quantize` output, which loads into quantized modules: gpt-oss's MXFP4 experts
# (models/mxfp4.py, split per expert in models/fused_experts.py), DeepSeek-V3's FP8 blocks (models/fp8.py).
DEQUANTIZED_AT_LOAD = (MXFP4_METHOD, FP8_METHOD)


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


def is_dequantized_at_load(quantization_config: dict | None) -> bool:
    return quantization_config is not None and quantization_config.get("quant_method") in DEQUANTIZED_AT_LOAD


def checkpoint_tensors(files: list[Path], architecture: str, quantization_config: dict | None,
                       dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors as the model's modules take them: FP8 block weights dequantized to
    `dtype`, experts stored stacked (gpt-oss, MXFP4 or not) cut into one tensor per expert."""
    tensors = iter_tensors(files)
    if quantization_config is not None and quantization_config.get("quant_method") == FP8_METHOD:
        tensors = dequantize_fp8_tensors(tensors, Fp8BlockFormat.from_config(quantization_config), dtype)
    return per_expert_tensors(architecture, tensors)


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
    quantization: QuantConfig | None = None,
    bf16_weights: bool | str = False,
) -> CausalLM | TransformersModel:
    """The native model for a supported family; else, when allowed, transformers' own (slower).

    A checkpoint written by `selfhost quantize` loads into its quantized modules;
    `quantization` quantizes a full-precision checkpoint right after loading;
    `bf16_weights` stores an fp32 CPU model's linear weights in bf16 (models/bf16_weights.py);
    "auto" does so where that measures faster on this CPU (models/weight_precision.py) and
    records the choice as `model.weight_precision`.
    """
    cfg = read_config(model_dir)
    stored = cfg.get("quantization_config")  # metadata written by `selfhost quantize`
    source_format = None  # a publisher's format the weights are dequantized from as they load
    if is_dequantized_at_load(stored):
        source_format, stored = stored, None
        if source_format["quant_method"] == FP8_METHOD:
            Fp8BlockFormat.from_config(source_format)  # a format we cannot read fails before any weight loads
    if bf16_weights == "auto":  # only where bf16 weights are an option at all; else the model as it is
        native = _is_native(cfg)
        bf16_weights = "auto" if (dtype == torch.float32 and device.type == "cpu" and quantization is None
                                  and not stored and native) else False
    if bf16_weights is True and (dtype != torch.float32 or device.type != "cpu" or quantization is not None or stored):
        raise InvalidParameterError(
            "bf16 weights are an option of fp32 models on CPU, without quantization; on a GPU use dtype='bfloat16'"
        )
    try:
        spec = spec_from_config(cfg)
    except UnsupportedModelError:
        if not transformers_fallback:
            raise
        if bf16_weights:
            raise InvalidParameterError("bf16 weights need a natively supported architecture, not the fallback") from None
        if quantization is not None or stored is not None:
            raise InvalidParameterError(
                "quantization needs a natively supported architecture, not the transformers fallback"
            ) from None
        return load_transformers_model(model_dir, dtype, device, max_len, allow_pickle)
    quant = None
    if stored is not None or quantization is not None:
        from selfhost.quant import apply as quant
        from selfhost.quant.config import QuantConfig
    if stored is not None:
        stored = QuantConfig.from_json(stored)
        if quantization is not None:
            raise InvalidParameterError(
                f"{model_dir} is already quantized ({stored.method}); load its full-precision checkpoint "
                f"to quantize it to {quantization.method}"
            )
    files = weight_files(model_dir, allow_pickle)
    max_len = min(max_len or spec.max_position, spec.max_position)
    with torch.device("meta"):
        model = CausalLM(spec, max_len).to(dtype)  # no memory yet; every tensor in its final dtype
        if stored is not None:
            quant.swap_in_empty_modules(model, stored)  # quantized modules choose their own tensor dtypes
    model.to_empty(device=device)
    # Rotary tables are computed, not loaded (meta buffers hold no values).
    model.rotaries = nn.ModuleList(RotaryEmbedding(rope, max_len).to(device) for rope in spec.ropes)
    if spec.tie_embeddings:  # before the arena, so the shared table gets one slot
        if stored is not None:
            quant.tie_embeddings(model)
        else:
            model.tie_weights()
    if device.type == "cpu":
        place_weights_in_arena(model)  # huge pages: decode streams every weight each step
    load_weights(model, checkpoint_tensors(files, spec.architecture, source_format, dtype), spec, model_dir)
    if stored is not None:
        quant.prepare_loaded(model, stored)
    if quantization is not None:  # load, then shrink
        quant.quantize_model(model, quantization)
        if device.type == "cpu":
            # The full-precision arena stays alive while any parameter still views it
            # (norms): move what remains into a small new one and let it go.
            place_weights_in_arena(model, keep_values=True)
    model.weight_precision = None
    if bf16_weights == "auto":
        from selfhost.layers.linear import Linear
        from selfhost.models.weight_precision import choose_weight_dtype

        streamed = sum(4 * m.weight.numel() for m in model.modules() if type(m) is Linear)
        model.weight_precision = choose_weight_dtype(spec.hidden_size, spec.intermediate_size, streamed_bytes=streamed)
        log.info("%s", model.weight_precision.describe())
        bf16_weights = model.weight_precision.weight_dtype == "bfloat16"
    if bf16_weights:
        from selfhost.models.bf16_weights import use_bf16_weights

        use_bf16_weights(model)
    if device.type == "cpu" and dtype == torch.float32:
        from selfhost.models.fp32_products import use_measured_fp32_products

        use_measured_fp32_products(model, spec.hidden_size, spec.intermediate_size)
    return model.eval()


def _is_native(cfg: dict) -> bool:
    try:
        spec_from_config(cfg)
        return True
    except UnsupportedModelError:
        return False


@torch.no_grad()
def load_weights(model: nn.Module, tensors: Iterator[tuple[str, torch.Tensor]], spec: ModelSpec,
                 model_dir: Path) -> None:
    """Copy every checkpoint tensor (`checkpoint_tensors`) into its parameter or buffer (a fused one's
    rows); raise if any stays unfilled.

    Tensors keep the checkpoint's names (`q_proj.weight`, or `q_proj.qweight` and
    `q_proj.scales` in a quantized one); tied tensors appear once, under the embedding.
    """
    targets = dict(model.named_parameters())
    targets.update((n, b) for n, b in model.named_buffers() if not n.startswith("rotaries."))
    slices = shard_slices(spec)
    filled: dict[str, int] = {}  # name -> rows copied so far (a fused tensor fills in parts)
    # stderr, so piped generated text stays clean
    with Progress(console=Console(stderr=True), transient=True) as progress:
        task = progress.add_task(f"loading {model_dir.name}", total=len(targets))
        for name, tensor in tensors:
            name = checkpoint_name(spec.architecture, name)
            module_path, _, leaf = name.rpartition(".")
            parent, _, module = module_path.rpartition(".")
            shard = None
            # Packed only where the model declares the fused module (latent attention keeps its own q_proj).
            if module in PACKED_WEIGHTS and f"{parent}.{PACKED_WEIGHTS[module][0]}.{leaf}" in targets:
                fused, shard = PACKED_WEIGHTS[module]
                name = f"{parent}.{fused}.{leaf}"
            target = targets.get(name)
            if target is None:
                continue  # e.g. rotary inv_freq buffers, or the head of a tied checkpoint
            rows = slice(None)
            if shard is not None:
                # gate/up halves follow the fused matrix's own size: a dense MLP's, an expert's or a shared expert's.
                rows = slice(*slices[fused][shard]) if fused == "qkv_proj" else _half(target, shard)
            dest = target.data[rows]
            if dest.shape != tensor.shape:
                raise UnsupportedModelError(
                    f"tensor {name} has shape {tuple(tensor.shape)}, the config implies {tuple(dest.shape)}"
                )
            dest.copy_(tensor)
            filled[name] = filled.get(name, 0) + _rows(dest)
            progress.advance(task)
    missing = [n for n, t in targets.items() if filled.get(n, 0) != _rows(t)]
    if missing:
        raise UnsupportedModelError(f"checkpoint {model_dir} lacks tensors: {', '.join(missing[:5])}")


def _half(fused: torch.Tensor, shard: int) -> slice:
    half = fused.shape[0] // 2
    return slice(shard * half, (shard + 1) * half)


def _rows(tensor: torch.Tensor) -> int:
    return tensor.shape[0] if tensor.dim() else 1
