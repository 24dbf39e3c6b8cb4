"""Decide before running: will a model fit a device, how fast will it go, and what will it cost."""

from selfhost.plan.cost import CostComparison, SelfHostSetup
from selfhost.plan.fit import FitReport, plan_fit, rank_fits
from selfhost.plan.precision import PRECISIONS, Precision, get_precision

__all__ = [
    "PRECISIONS",
    "CostComparison",
    "FitReport",
    "Precision",
    "SelfHostSetup",
    "get_precision",
    "plan_fit",
    "rank_fits",
]
