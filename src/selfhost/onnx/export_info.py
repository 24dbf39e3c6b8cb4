"""What `selfhost export onnx` wrote, recorded beside the graph and read back by `LLM(DIR)`."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from selfhost.errors import InvalidParameterError, UnsupportedModelError
from selfhost.onnx import layout

DTYPES = ("fp32", "fp16")
QUANTS = (None, "int4", "int8")
ATTENTIONS = ("auto", "fused", "plain")


@dataclass(frozen=True)
class OnnxExportConfig:
    """dtype: activations, KV cache and unquantized weights. quant: int4 / int8 MatMulNBits weights (None: dtype).

    attention: "fused" (ONNX Runtime's GroupQueryAttention), "plain" (standard operators) or
    "auto" (fused wherever the kernel accepts the head size).
    """

    dtype: str = "fp32"
    quant: str | None = None
    attention: str = "auto"

    def __post_init__(self):
        if self.dtype not in DTYPES:
            raise InvalidParameterError(f"ONNX dtype {self.dtype!r} is not supported; choose one of {', '.join(DTYPES)}")
        if self.quant not in QUANTS:
            raise InvalidParameterError(f"ONNX quantization {self.quant!r} is not supported; choose int4 or int8")
        if self.attention not in ATTENTIONS:
            raise InvalidParameterError(
                f"attention {self.attention!r} is not supported; choose one of {', '.join(ATTENTIONS)}")

    @property
    def weight_bits(self) -> int | None:
        return {None: None, "int4": 4, "int8": 8}[self.quant]


@dataclass(frozen=True)
class ExportInfo:
    """Written to layout.EXPORT_INFO: the export's settings and the source it came from."""

    source: str
    architecture: str
    dtype: str
    quant: str | None
    attention: str  # what "auto" resolved to
    max_len: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int

    def write(self, folder: Path) -> None:
        (folder / layout.EXPORT_INFO).write_text(json.dumps(asdict(self), indent=2) + "\n")

    @classmethod
    def read(cls, folder: Path) -> ExportInfo:
        try:
            return cls(**json.loads((folder / layout.EXPORT_INFO).read_text()))
        except (OSError, ValueError, TypeError) as e:
            raise UnsupportedModelError(f"{folder} is not a readable selfhost ONNX export: {e}") from e


def is_onnx_export(folder: Path) -> bool:
    """A folder `selfhost export onnx` wrote (its metadata file, not its file names, says so)."""
    return (folder / layout.EXPORT_INFO).is_file() and (folder / layout.GENAI_CONFIG).is_file()
