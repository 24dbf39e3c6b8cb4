"""QuantConfig: how a checkpoint's weights are quantized, validated once.

The same object is written into config.json (`quantization_config`) by the
offline step and read back by the loader, so a quantized folder says how to
run itself: nothing is inferred from file or folder names.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from selfhost.errors import InvalidParameterError, UnsupportedModelError

METHODS = ("int8", "int4")
# embed_tokens and lm_head: None = same as the method (skip_modules keeps them in full precision).
HEAD_METHODS = ("int8", "int4", None)
# Without an explicit group size each layer takes the first of these that divides its input features.
# Part of format version 1: a stored `group_size: null` means exactly this rule.
GROUP_SIZE_CANDIDATES = (128, 64, 32, 16)
QUANT_METHOD_TAG = "selfhost"  # `quant_method` in config.json, as Hugging Face names it
FORMAT_VERSION = 1


@dataclass(frozen=True)
class QuantConfig:
    """Weight-only quantization settings.

    int8: symmetric, one fp32 scale per output row. int4: two values packed per
    byte, one fp16 scale and one 4-bit zero point per `group_size` consecutive
    input features of a row (`symmetric` pins the zero point at 8).
    """

    method: str
    # int4 only. None: per layer, the largest of GROUP_SIZE_CANDIDATES dividing its input features.
    group_size: int | None = None
    symmetric: bool = False  # int4 only; int8 is always symmetric
    head_method: str | None = None  # embeddings and output head; None = same as `method`
    skip_modules: tuple[str, ...] = ()  # kept in full precision, e.g. "lm_head", "model.layers.0.mlp.down_proj"

    def __post_init__(self):
        if self.method not in METHODS:
            raise InvalidParameterError(f"quantization method {self.method!r} is unknown; choose one of {', '.join(METHODS)}")
        if self.head_method not in HEAD_METHODS:
            raise InvalidParameterError(
                f"head method {self.head_method!r} is unknown; choose int8, int4 or None (same as the method)"
            )
        if self.group_size is not None:
            if not self.uses_groups:
                raise InvalidParameterError(
                    f"group size {self.group_size} applies to int4 only; int8 uses one scale per output row"
                )
            if self.group_size < 2 or self.group_size % 2:
                raise InvalidParameterError(f"group size {self.group_size} must be an even number >= 2")
        if not isinstance(self.skip_modules, tuple):
            object.__setattr__(self, "skip_modules", tuple(self.skip_modules))

    @property
    def resolved_head_method(self) -> str:
        return self.head_method or self.method

    @property
    def uses_groups(self) -> bool:
        return "int4" in (self.method, self.resolved_head_method)

    def group_size_for(self, in_features: int) -> int:
        """The int4 group size of a layer with `in_features` inputs (check_layers has vetted it)."""
        if self.group_size is not None:
            return self.group_size
        return next(g for g in GROUP_SIZE_CANDIDATES if in_features % g == 0)

    def check_layers(self, in_features: dict[str, int]) -> None:
        """Raise unless every group-quantized layer {name: in_features} can be split into groups."""
        sizes = sorted(set(in_features.values()))
        if self.group_size is not None:
            bad = {n: k for n, k in in_features.items() if k % self.group_size}
            if bad:
                name, k = next(iter(bad.items()))
                valid = [g for g in GROUP_SIZE_CANDIDATES if all(s % g == 0 for s in sizes)]
                raise InvalidParameterError(
                    f"group size {self.group_size} does not divide the {k} input features of {name}; "
                    f"group sizes that divide every layer ({', '.join(map(str, sizes))}): "
                    f"{', '.join(map(str, valid)) or 'none of ' + ', '.join(map(str, GROUP_SIZE_CANDIDATES))}"
                    " (or leave the group size out: each layer then takes the largest that divides it)"
                )
            return
        for name, k in in_features.items():
            if all(k % g for g in GROUP_SIZE_CANDIDATES):
                raise InvalidParameterError(
                    f"no int4 group size in {GROUP_SIZE_CANDIDATES} divides the {k} input features of {name}; "
                    "keep it in full precision (skip_modules) or use int8"
                )

    def to_json(self) -> dict[str, Any]:
        return {"quant_method": QUANT_METHOD_TAG, "format_version": FORMAT_VERSION, **asdict(self)} | {
            "skip_modules": list(self.skip_modules)
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> QuantConfig:
        method = data.get("quant_method")
        if method != QUANT_METHOD_TAG:
            raise UnsupportedModelError(
                f"quantization_config.quant_method {method!r} is not supported; selfhost loads only checkpoints "
                f"written by `selfhost quantize` ({QUANT_METHOD_TAG!r})"
            )
        version = data.get("format_version")
        if version != FORMAT_VERSION:
            raise UnsupportedModelError(f"quantized checkpoint format version {version!r}; this selfhost reads {FORMAT_VERSION}")
        return cls(
            method=data["method"],
            group_size=data.get("group_size"),
            symmetric=data.get("symmetric", False),
            head_method=data.get("head_method"),
            skip_modules=tuple(data.get("skip_modules", ())),
        )
