"""Weight precisions the planner knows, and what each costs per parameter."""

from __future__ import annotations

from dataclasses import dataclass, replace

from selfhost.catalog.names import unknown_name_error


@dataclass(frozen=True)
class Precision:
    """How linear-layer weights are stored, and what the rest of the model runs in.

    Quantized formats store `weight_bits` per weight plus `scale_bytes_per_group`
    (fp16 scale, and zero point for int4) per `group_size` weights. Embedding
    tables, norms, the KV cache and activations stay at `act_bytes`: weight-only
    quantization dequantizes to fp16 before the matmul, so `compute_dtype` is fp16.

    selfhost on a CPU differs (`for_device_kind`): quantized weights run under
    `cpu_act_bytes` activations (fp32, the CPU default dtype), so the KV cache
    and activations are fp32 there.
    """

    name: str
    weight_bits: int
    act_bytes: int
    compute_dtype: str
    group_size: int = 0
    scale_bytes_per_group: int = 0
    cpu_act_bytes: int | None = None  # None: act_bytes on every device
    kv_cache: str | None = None  # "int8": kv_cache_dtype="int8" (memory.kv_bytes_per_element); None: act_bytes

    def __post_init__(self) -> None:
        if self.weight_bits not in (4, 8, 16, 32):
            raise ValueError(f"weight_bits must be 4, 8, 16 or 32, got {self.weight_bits}")
        if self.scale_bytes_per_group and self.group_size <= 0:
            raise ValueError(f"{self.name}: a scale needs group_size > 0, got {self.group_size}")

    @property
    def bytes_per_weight(self) -> float:
        scales = self.scale_bytes_per_group / self.group_size if self.group_size else 0.0
        return self.weight_bits / 8 + scales

    @property
    def is_quantized(self) -> bool:
        return self.weight_bits < 16

    def for_device_kind(self, kind: str) -> Precision:
        """This precision as selfhost runs it on a device of `kind` ("cpu", "gpu", "soc")."""
        if kind != "cpu":
            return self
        return replace(self, act_bytes=self.cpu_act_bytes or self.act_bytes)

    @property
    def kv_bytes(self) -> int:
        """Bytes per KV-cache element in the activations' dtype (an int8 cache: memory.kv_bytes_per_element)."""
        return self.act_bytes

    def with_kv_cache(self, kv_cache_dtype: str) -> Precision:
        """This precision with the KV cache `selfhost run --kv-cache-dtype` stores: "auto" (the
        activations' dtype) or "int8" (a byte per element and an fp32 scale per token and head)."""
        if kv_cache_dtype == "auto":
            return self
        if kv_cache_dtype != "int8":
            raise unknown_name_error("KV cache dtype", kv_cache_dtype, ("auto", "int8"))
        return replace(self, name=f"{self.name} + int8 KV", kv_cache="int8")


PRECISIONS: dict[str, Precision] = {
    "fp32": Precision("fp32", weight_bits=32, act_bytes=4, compute_dtype="fp32"),
    "fp16": Precision("fp16", weight_bits=16, act_bytes=2, compute_dtype="fp16"),
    # One fp16 scale per 128 weights: +1.6% over the int8 payload.
    "int8": Precision("int8", weight_bits=8, act_bytes=2, compute_dtype="fp16", group_size=128, scale_bytes_per_group=2,
                      cpu_act_bytes=4),
    # fp16 scale + fp16 zero point per 128 weights: +6% over the int4 payload.
    "int4": Precision("int4", weight_bits=4, act_bytes=2, compute_dtype="fp16", group_size=128, scale_bytes_per_group=4,
                      cpu_act_bytes=4),
}


def get_precision(name: str) -> Precision:
    key = name.strip().lower().replace("bf16", "fp16")
    if key not in PRECISIONS:
        raise unknown_name_error("precision", name, PRECISIONS)
    return PRECISIONS[key]


# bf16 weights and a bf16 KV cache under fp32 activations: what `weight_dtype="auto"` picks on a
# CPU where bf16 measures faster (models/weight_precision.py). Planned as 16-bit weights and
# cache through the device's 16-bit peak, which a measured CPU reports for its bf16 kernels.
CPU_BF16 = Precision("bf16", weight_bits=16, act_bytes=2, compute_dtype="fp16")


def default_precision(device_kind: str) -> Precision:
    """What selfhost runs an unquantized checkpoint at on a device of `device_kind` when
    nothing is measured: fp32 on a CPU (bf16 is faster only on some CPUs; `selfhost fit
    --device local` measures this one, as `selfhost run` does), bf16/fp16 on an
    accelerator (planned alike: 2 bytes per weight)."""
    return PRECISIONS["fp32" if device_kind == "cpu" else "fp16"]
