"""DeepSeek-V3's FP8 release format: float8_e4m3fn weights with one float32 scale per 128x128 block.

A tiny V3 checkpoint is quantized here the way the release is: every linear weight of the decoder
layers to FP8 with `weight_scale_inv` beside it, and quantization_config naming the format. Its
widths (160, 300, 136, 272, 40, 96) are not multiples of 128, so most weights end in partial blocks,
and no weight is one block in both directions. Its twin stores the reference dequantization
(stored.float() times each block's scale, expanded here independently of the loader) in fp32;
loading either must give the same model.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from selfhost.engine.latent_cache import LatentKVCache
from selfhost.errors import UnsupportedModelError
from selfhost.models.loader import load_model
from selfhost.quant.checkpoint import quantize_checkpoint
from selfhost.quant.config import QuantConfig
from tests.models.one_sequence import one_sequence_logits
from tests.models.test_deepseek import DEEPSEEK_CONFIGS
from tests.quant.int8_parity import assert_stored_int8_matches_on_the_fly
from tests.tiny_models import COMMON, save_tiny_tokenizer

BLOCK = 128
FP8_MAX = torch.finfo(torch.float8_e4m3fn).max  # 448
QUANTIZATION_CONFIG = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                       "weight_block_size": [BLOCK, BLOCK]}
# hidden 160 = 1.25 blocks; dense MLP 300, experts 136, two shared experts 272: all partial at the edge
WIDTHS = dict(hidden_size=160, intermediate_size=300, moe_intermediate_size=136)


def _expand(scales: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """(ceil(rows / 128), ceil(cols / 128)) block scales -> one per weight (rows, cols)."""
    return scales.repeat_interleave(BLOCK, dim=0).repeat_interleave(BLOCK, dim=1)[:rows, :cols]


def quantize_fp8_blocks(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) -> float8_e4m3fn weight and float32 scale_inv per 128x128 block (amax / 448)."""
    rows, cols = weight.shape
    padded = torch.zeros(-(-rows // BLOCK) * BLOCK, -(-cols // BLOCK) * BLOCK)
    padded[:rows, :cols] = weight
    blocks = padded.view(padded.shape[0] // BLOCK, BLOCK, padded.shape[1] // BLOCK, BLOCK)
    scales = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12) / FP8_MAX  # (row blocks, col blocks)
    stored = (weight / _expand(scales, rows, cols)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return stored, scales


def _is_quantized(name: str, tensor: torch.Tensor) -> bool:
    # As DeepSeek's release: the decoder layers' linear weights; embeddings, head, router and norms stay.
    return name.startswith("model.layers.") and tensor.dim() == 2 and not name.endswith(".mlp.gate.weight")


@pytest.fixture(scope="module")
def fp8_twins(tmp_path_factory):
    """(fp8 folder, reference folder, names of the FP8 weights)."""
    config_cls, overrides = DEEPSEEK_CONFIGS["deepseek_v3"]
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides, **WIDTHS})
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    root = tmp_path_factory.mktemp("fp8")
    full = root / "full"
    model.save_pretrained(full, safe_serialization=True)
    generator = torch.Generator().manual_seed(1)
    fp8, reference, quantized = {}, {}, []
    for name, tensor in load_file(full / "model.safetensors").items():
        if "norm" in name:  # random init leaves norms at 1: perturb them so a wrong norm cannot pass
            tensor = tensor + torch.randn(tensor.shape, generator=generator) * 0.1
        if not _is_quantized(name, tensor):
            fp8[name] = reference[name] = tensor
            continue
        rows, cols = tensor.shape
        # Blocks of very different magnitudes (2^-3 .. 2^3), so a scale applied to the wrong block shows.
        exponents = torch.randint(-3, 4, (-(-rows // BLOCK), -(-cols // BLOCK)), generator=generator)
        stored, scales = quantize_fp8_blocks(tensor * _expand(torch.exp2(exponents.float()), rows, cols))
        fp8[name], fp8[name + "_scale_inv"] = stored, scales
        reference[name] = stored.float() * _expand(scales, rows, cols)
        quantized.append(name)
    for folder, tensors in (("fp8", fp8), ("reference", reference)):
        out = root / folder
        out.mkdir()
        save_tiny_tokenizer(out)
        cfg = json.loads((full / "config.json").read_text())
        if folder == "fp8":
            cfg["quantization_config"] = QUANTIZATION_CONFIG
            _save_two_shards(tensors, out)
        else:
            save_file(tensors, out / "model.safetensors")
        (out / "config.json").write_text(json.dumps(cfg))
    return root / "fp8", root / "reference", quantized


def _save_two_shards(tensors: dict[str, torch.Tensor], out) -> None:
    """Layer 0's scales after their weights (the next shard), the other layers' before them: the
    loader must pair them whichever arrives first."""
    first = {n: t for n, t in tensors.items() if n.endswith("_scale_inv") != n.startswith("model.layers.0.")}
    second = {n: t for n, t in tensors.items() if n not in first}
    weight_map = {}
    for i, part in enumerate((first, second), 1):
        shard = f"model-{i:05d}-of-00002.safetensors"
        save_file(part, out / shard)
        weight_map.update(dict.fromkeys(part, shard))
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def _logits(folder, dtype=torch.float32) -> torch.Tensor:
    model = load_model(folder, dtype, torch.device("cpu"))
    prompt = torch.randint(3, 512, (24,), generator=torch.Generator().manual_seed(5))
    cache = LatentKVCache(model.spec, 4, 16, dtype, torch.device("cpu"))
    with torch.inference_mode():
        return one_sequence_logits(model, cache, 4, prompt, [7, 300, 42, 11]).float()


def test_fp8_checkpoint_has_partial_blocks_everywhere(fp8_twins):
    fp8, _, quantized = fp8_twins
    with open(fp8 / "model.safetensors.index.json") as f:
        names = json.load(f)["weight_map"]
    assert len(quantized) > 40 and all(name + "_scale_inv" in names for name in quantized)
    tensors = {**load_file(fp8 / "model-00001-of-00002.safetensors"), **load_file(fp8 / "model-00002-of-00002.safetensors")}
    shapes = {tuple(tensors[n].shape) for n in quantized}
    assert {(160, 96), (300, 160), (160, 300), (136, 160), (272, 160), (40, 160)} <= shapes
    assert all(tensors[n].dtype == torch.float8_e4m3fn for n in quantized)
    assert tensors["model.layers.0.mlp.down_proj.weight_scale_inv"].shape == (2, 3)


def test_fp8_loads_as_its_reference_dequantization(fp8_twins):
    fp8, reference, _ = fp8_twins
    expected = _logits(reference)
    assert expected.std() > 0.1  # a model that says something
    assert (_logits(fp8) - expected).abs().max().item() <= 1e-5


def test_fp8_dequantizes_to_the_load_dtype(fp8_twins):
    fp8, reference, _ = fp8_twins
    got = load_model(fp8, torch.bfloat16, torch.device("cpu")).state_dict()
    want = load_model(reference, torch.bfloat16, torch.device("cpu")).state_dict()
    for name, tensor in want.items():
        assert got[name].dtype == torch.bfloat16 and torch.equal(got[name], tensor), name


def _variant(fp8, tmp_path, config_change=None, tensor_change=None):
    out = tmp_path / "variant"
    shutil.copytree(fp8, out)
    if config_change is not None:
        cfg = json.loads((out / "config.json").read_text())
        config_change(cfg["quantization_config"])
        (out / "config.json").write_text(json.dumps(cfg))
    if tensor_change is not None:
        for shard in sorted(out.glob("*.safetensors")):
            tensors = load_file(shard)
            tensor_change(tensors)
            save_file(tensors, shard)
    return out


@pytest.mark.parametrize(("change", "message"), [
    (lambda q: q.update(fmt="e5m2"), r"quantization_config.fmt 'e5m2' is not supported.*\['e4m3'\]"),
    (lambda q: q.update(weight_block_size=[128]), r"weight_block_size \[128\] is not supported.*2-D"),
    (lambda q: q.update(weight_block_size=[128, 128, 1]), r"weight_block_size \[128, 128, 1\]"),
    (lambda q: q.update(activation_scheme="static"), r"activation_scheme 'static' is not supported"),
])
def test_unreadable_quantization_config_is_refused_by_name(fp8_twins, tmp_path, change, message):
    folder = _variant(fp8_twins[0], tmp_path, config_change=change)
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(folder, torch.float32, torch.device("cpu"))


def _transpose_one_scale(tensors):
    name = "model.layers.0.mlp.down_proj.weight_scale_inv"
    if name in tensors:
        tensors[name] = tensors[name].T.contiguous()


def _drop_one_scale(tensors):
    tensors.pop("model.layers.1.mlp.experts.3.up_proj.weight_scale_inv", None)


@pytest.mark.parametrize(("change", "message"), [
    (_transpose_one_scale, r"model.layers.0.mlp.down_proj.weight_scale_inv has shape \(3, 2\); "
                           r"a 160x300 weight in 128x128 blocks needs \(2, 3\)"),
    (_drop_one_scale, r"FP8 tensors without a _scale_inv scale: model.layers.1.mlp.experts.3.up_proj.weight"),
])
def test_bad_scales_are_refused_naming_the_tensor(fp8_twins, tmp_path, change, message):
    folder = _variant(fp8_twins[0], tmp_path, tensor_change=change)
    with pytest.raises(UnsupportedModelError, match=message):
        load_model(folder, torch.float32, torch.device("cpu"))


def test_quantize_reads_fp8_like_the_loader(fp8_twins, tmp_path):
    """`selfhost quantize` on the FP8 release: int8 from the dequantized weights, as on-the-fly int8 of
    the reference twin; the source's FP8 quantization_config gives way to selfhost's."""
    fp8, reference, _ = fp8_twins
    quantize_checkpoint(fp8, tmp_path / "int8", QuantConfig(method="int8"))
    assert json.loads((tmp_path / "int8" / "config.json").read_text())["quantization_config"]["method"] == "int8"
    assert_stored_int8_matches_on_the_fly(tmp_path / "int8", reference)
