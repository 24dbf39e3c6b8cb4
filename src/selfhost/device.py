"""Choosing the device and compute dtype."""

from __future__ import annotations

import torch

from selfhost.errors import InvalidParameterError

DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise InvalidParameterError(f"device {name!r} is not a torch device (try 'cpu', 'cuda', 'cuda:1')") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidParameterError(f"device {name!r} asked for, but no CUDA GPU is available here")
    return device


def pick_dtype(name: str, device: torch.device) -> torch.dtype:
    """fp32 on CPU by default: without AVX512-BF16, bf16 matmuls are far slower there."""
    if name == "auto":
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    if name not in DTYPES:
        raise InvalidParameterError(f"dtype {name!r} is not supported; choose one of auto, {', '.join(DTYPES)}")
    return DTYPES[name]
