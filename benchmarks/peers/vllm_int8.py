"""The benchmark model as a W8A8 int8 checkpoint that vLLM's CPU build serves with its int8 kernels.

vLLM runs int8 linear layers from a compressed-tensors checkpoint (the format llm-compressor
writes): each linear weight as int8 with one fp32 scale per output channel, activations quantized
per token at run time ("dynamic"), the output head left in full precision ("ignore": the usual
recipe). vLLM 0.32 on CPU sends these layers to its own int8 GEMM (sgl-kernel) or oneDNN's
(`vllm/model_executor/kernels/linear/scaled_mm/cpu.py`). No such checkpoint of a random model can
be downloaded, so this writes one from the fp32 checkpoint: symmetric, round to nearest, scale =
max |w| / 127 per output row. It is vLLM's int8 row against selfhost's own int8 quantization
(`LLM(..., quantization="int8")`) of the same weights.

Linear weights are the Llama-family `*_proj.weight` tensors (attention q/k/v/o and the MLP's
gate/up/down), the layers vLLM builds as Linear for this architecture.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

LINEAR_SUFFIX = "_proj.weight"


def w8a8_checkpoint(model_dir: Path) -> Path:
    """`model_dir`'s W8A8 copy (model_dir/vllm-w8a8), written on first use."""
    out = Path(model_dir) / "vllm-w8a8"
    if not (out / "config.json").exists():
        write_w8a8(Path(model_dir), out)
    return out


def quantize_rows(weight):
    """(int8 weight, fp32 scales of shape (out, 1)): per output row, symmetric, to nearest."""
    import torch

    w = weight.float()
    scale = (w.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)
    return torch.round(w / scale).clamp(-127, 127).to(torch.int8), scale


def write_w8a8(model_dir: Path, out: Path) -> None:
    """Write the compressed-tensors int8 checkpoint of `model_dir` to `out` (whole, or not at all)."""
    from safetensors.torch import load_file, save_file

    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors files in {model_dir}")
    staging = Path(tempfile.mkdtemp(prefix=".vllm-w8a8-", dir=model_dir))
    try:
        for file in files:
            tensors = {}
            for name, tensor in load_file(file).items():
                if name.endswith(LINEAR_SUFFIX) and tensor.dim() == 2:
                    tensors[name], scale = quantize_rows(tensor)
                    tensors[name.removesuffix("weight") + "weight_scale"] = scale
                else:
                    tensors[name] = tensor
            save_file(tensors, staging / file.name, metadata={"format": "pt"})
        config = json.loads((model_dir / "config.json").read_text())
        config["quantization_config"] = quantization_config()
        (staging / "config.json").write_text(json.dumps(config, indent=2))
        for extra in model_dir.iterdir():  # tokenizer, generation config, a shard index
            if extra.is_file() and extra.suffix != ".safetensors" and extra.name != "config.json" \
                    and not extra.name.endswith(".gguf"):
                shutil.copy(extra, staging / extra.name)
        staging.rename(out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def quantization_config() -> dict:
    """compressed-tensors' description of the scheme: int8 weights per channel, int8 activations per token."""
    int8 = {"num_bits": 8, "type": "int", "symmetric": True, "group_size": None, "actorder": None,
            "block_structure": None, "observer": None, "observer_kwargs": {}}
    return {
        "quant_method": "compressed-tensors",
        "format": "int-quantized",
        "quantization_status": "compressed",
        "ignore": ["lm_head"],
        "kv_cache_scheme": None,
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {**int8, "strategy": "channel", "dynamic": False},
                "input_activations": {**int8, "strategy": "token", "dynamic": True},
                "output_activations": None,
            }
        },
    }
