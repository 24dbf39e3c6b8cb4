"""`selfhost merge`: fold an adapter into its base checkpoint, W' = W + scale * B @ A.

Works on the checkpoint's tensors, not on a loaded model: each adapted
projection's weight is read, merged in fp32, stored back in its own dtype,
under its own name and shard file; every other file is copied as it is. The
result is an ordinary checkpoint that any tool loads, and needs no selfhost.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from selfhost.errors import UnsupportedModelError
from selfhost.lora.adapter_format import Adapter, AdapterError, module_path
from selfhost.lora.apply import check_fits
from selfhost.models.families import spec_from_config
from selfhost.models.loader import read_config, weight_files
from selfhost.train.export import staged_folder


def merge_adapter(model_dir: Path, adapter: Adapter, out: Path, overwrite: bool = False) -> int:
    """Write `model_dir` with `adapter` merged to `out`; returns how many weights changed."""
    config = read_config(model_dir)
    if config.get("quantization_config"):
        raise UnsupportedModelError(f"{model_dir} is quantized: merge the adapter into its full-precision "
                                    "checkpoint, then quantize the result")
    check_fits(adapter, spec_from_config(config))
    deltas = {f"{module_path(layer, module)}.weight": m for (layer, module), m in adapter.modules.items()}
    files = weight_files(model_dir, allow_pickle=False)
    merged = 0
    with staged_folder(out, overwrite) as staging:
        from safetensors import safe_open
        from safetensors.torch import save_file

        for path in files:
            tensors = {}
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata()
                for name in f.keys():  # noqa: SIM118 (safe_open is not iterable)
                    tensor = f.get_tensor(name)
                    if name in deltas:
                        tensor = (tensor.float() + deltas[name].delta_weight()).to(tensor.dtype)
                        merged += 1
                    tensors[name] = tensor.contiguous()
            save_file(tensors, str(staging / path.name), metadata=metadata or {"format": "pt"})
        if merged != len(deltas):
            missing = sorted(set(deltas) - _names(files))
            raise AdapterError(f"{model_dir} has no weights {', '.join(missing[:3])} for the adapter to merge into")
        weight_names = {p.name for p in files}
        for path in model_dir.iterdir():
            if path.is_file() and path.name not in weight_names and path.suffix not in (".bin", ".safetensors"):
                shutil.copy2(path, staging / path.name)
    return merged


def _names(files: list[Path]) -> set[str]:
    from safetensors import safe_open

    names: set[str] = set()
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            names.update(f.keys())
    return names

