"""`selfhost fit`: does a model fit a device at a precision, with what headroom and speed."""

from __future__ import annotations

from dataclasses import dataclass

from selfhost.catalog import DeviceSpec, ModelSpec, load_models
from selfhost.errors import InvalidParameterError
from selfhost.plan.memory import MemoryBreakdown, memory_breakdown
from selfhost.plan.precision import PRECISIONS, Precision
from selfhost.plan.speed import SpeedEstimate, estimate_speed

DEFAULT_CONTEXT = 4096


@dataclass(frozen=True)
class FitRequest:
    model: ModelSpec
    device: DeviceSpec
    precision: Precision
    context: int
    concurrency: int

    def __post_init__(self) -> None:
        if not 1 <= self.context <= self.model.arch.max_context:
            raise InvalidParameterError(
                f"context must be in [1, {self.model.arch.max_context}] for {self.model.alias}, got {self.context}"
            )
        if self.concurrency < 1:
            raise InvalidParameterError(f"concurrency must be >= 1, got {self.concurrency}")


@dataclass(frozen=True)
class FitReport:
    request: FitRequest
    memory: MemoryBreakdown
    speed: SpeedEstimate
    max_context: int  # longest context that fits at the requested concurrency (0: none)
    max_concurrency: int  # most sequences that fit at the requested context (0: none)

    @property
    def headroom_bytes(self) -> float:
        """Usable device memory left over; negative when the model does not fit."""
        return self.request.device.usable_bytes - self.memory.total_bytes

    @property
    def fits(self) -> bool:
        return self.headroom_bytes >= 0


def _fits(model: ModelSpec, device: DeviceSpec, precision: Precision, context: int, concurrency: int) -> bool:
    return memory_breakdown(model, device, precision, context, concurrency).total_bytes <= device.usable_bytes


def _largest(fits, high: int) -> int:
    """Largest n in [1, high] with fits(n) true, assuming fits is monotone; 0 if none."""
    if not fits(1):
        return 0
    low = 1
    while low < high:
        mid = (low + high + 1) // 2
        low, high = (mid, high) if fits(mid) else (low, mid - 1)
    return low


def plan_fit(
    model: ModelSpec, device: DeviceSpec, precision: Precision, context: int | None = None, concurrency: int = 1
) -> FitReport:
    context = context if context is not None else min(DEFAULT_CONTEXT, model.arch.max_context)
    request = FitRequest(model, device, precision, context, concurrency)
    max_context = _largest(lambda c: _fits(model, device, precision, c, concurrency), model.arch.max_context)
    max_concurrency = _largest(lambda n: _fits(model, device, precision, context, n), 4096)
    return FitReport(
        request=request,
        memory=memory_breakdown(model, device, precision, context, concurrency),
        speed=estimate_speed(model, device, precision, context, concurrency),
        max_context=max_context,
        max_concurrency=max_concurrency,
    )


def rank_fits(
    device: DeviceSpec, context: int = DEFAULT_CONTEXT, concurrency: int = 1, precisions: tuple[str, ...] = ()
) -> list[FitReport]:
    """Every catalog model/precision that fits `device`, biggest model first, then fastest.

    Each model is planned at min(context, its max context).
    """
    reports = []
    for model in load_models().values():
        for name in precisions or tuple(PRECISIONS):
            report = plan_fit(model, device, PRECISIONS[name], min(context, model.arch.max_context), concurrency)
            if report.fits:
                reports.append(report)
    reports.sort(key=lambda r: (-r.request.model.weight_params, -r.speed.decode_tok_s))
    return reports


# A model is "edge-capable" when it runs int4 with a 4k context on an 8 GB Jetson.
EDGE_DEVICE = "jetson-orin-nano-8gb"
EDGE_PRECISION = "int4"


def is_edge_capable(model: ModelSpec) -> bool:
    from selfhost.catalog import get_device

    context = min(DEFAULT_CONTEXT, model.arch.max_context)
    return _fits(model, get_device(EDGE_DEVICE), PRECISIONS[EDGE_PRECISION], context, 1)
