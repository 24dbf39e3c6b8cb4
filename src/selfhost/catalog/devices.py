"""The device catalog (data/devices.toml) and user-described devices."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache

from selfhost.catalog._data import read_data
from selfhost.catalog.names import unknown_name_error
from selfhost.errors import InvalidParameterError

DEVICE_KINDS = ("gpu", "soc", "cpu")


@dataclass(frozen=True)
class DeviceSpec:
    """One device's memory, speed, power and price; see devices.toml for each field's meaning."""

    id: str
    name: str
    kind: str
    memory_gb: float
    bandwidth_gb_s: float
    peak_fp16_tflops: float
    peak_int8_tops: float
    peak_fp32_tflops: float
    reserved_gb: float = 0.0
    bandwidth_efficiency: float = 0.7
    compute_efficiency: float = 0.5
    # Share of bandwidth the int8 matrix-vector kernel reaches where it differs from the
    # float one (measured for `--device local` CPUs); None: bandwidth_efficiency.
    int8_bandwidth_efficiency: float | None = None
    # The same for 16-bit weights (bf16 on a CPU, through its own few-row kernel).
    bf16_bandwidth_efficiency: float | None = None
    # A step whose bytes fit in the last-level cache reads them from there, not from RAM
    # (measured for `--device local` CPUs: a 10 MB model decodes ~2x faster than RAM allows).
    cache_bytes: float | None = None
    cache_bandwidth_gb_s: float | None = None
    power_w: float = 0.0
    price_usd: float | None = None
    rent_usd_per_hour: float | None = None
    sources: tuple[str, ...] = field(default=())
    notes: str = ""

    def __post_init__(self) -> None:
        # These reach users through --mem/--bandwidth, so they raise the typed user error.
        if self.kind not in DEVICE_KINDS:
            raise InvalidParameterError(f"device kind must be one of {DEVICE_KINDS}, got {self.kind!r}")
        for name in ("memory_gb", "bandwidth_gb_s", "peak_fp16_tflops", "peak_int8_tops", "peak_fp32_tflops"):
            value = getattr(self, name)
            if not value > 0:
                raise InvalidParameterError(f"device {self.id}: {name} must be > 0, got {value}")
        if not 0 <= self.reserved_gb < self.memory_gb:
            raise InvalidParameterError(
                f"device {self.id}: reserved_gb must be in [0, memory_gb={self.memory_gb}), got {self.reserved_gb}"
            )
        for name in ("bandwidth_efficiency", "compute_efficiency", "int8_bandwidth_efficiency"):
            value = getattr(self, name)
            if value is not None and not 0 < value <= 1:
                raise InvalidParameterError(f"device {self.id}: {name} must be in (0, 1], got {value}")
        if self.power_w < 0:
            raise InvalidParameterError(f"device {self.id}: power_w must be >= 0, got {self.power_w}")
        for name in ("price_usd", "rent_usd_per_hour"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise InvalidParameterError(f"device {self.id}: {name} must be >= 0, got {value}")

    @property
    def usable_bytes(self) -> float:
        return (self.memory_gb - self.reserved_gb) * 1e9

    def decode_bandwidth(self, weight_bits: int, step_bytes: float | None = None) -> float:
        """Bytes/s a decode step streams weights at, for weights of `weight_bits` (from the
        cache when the step's `step_bytes` fit in it and its speed was measured)."""
        if step_bytes is not None and self.cache_bytes and self.cache_bandwidth_gb_s and step_bytes <= self.cache_bytes:
            return self.cache_bandwidth_gb_s * 1e9
        efficiency = self.bandwidth_efficiency
        if weight_bits == 8 and self.int8_bandwidth_efficiency is not None:
            efficiency = self.int8_bandwidth_efficiency
        if weight_bits == 16 and self.bf16_bandwidth_efficiency is not None:
            efficiency = self.bf16_bandwidth_efficiency
        return self.bandwidth_gb_s * 1e9 * efficiency

    def peak_flops(self, compute_dtype: str) -> float:
        """Dense matmul peak in FLOP/s for the dtype the matmuls run in."""
        tflops = {"fp32": self.peak_fp32_tflops, "fp16": self.peak_fp16_tflops, "int8": self.peak_int8_tops}
        return tflops[compute_dtype] * 1e12


@cache
def load_devices() -> dict[str, DeviceSpec]:
    devices = {}
    for key, row in read_data("devices.toml").items():
        row = dict(row)
        row.pop("retrieved")
        devices[key] = DeviceSpec(id=key, sources=tuple(row.pop("sources")), **row)
    return devices


def get_device(device_id: str) -> DeviceSpec:
    devices = load_devices()
    key = device_id.strip().lower()
    if key not in devices:
        raise unknown_name_error("device", device_id, [*devices, "custom", "local"])
    return devices[key]
