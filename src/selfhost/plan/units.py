"""Parse the human quantities the planner's CLI accepts besides sizes: '100GB/s', '800M', '1.5B'.

Memory sizes ('16GB', '512MiB') are read by selfhost.units, the one size parser.
"""

from __future__ import annotations

import re

from selfhost.errors import InvalidParameterError
from selfhost.units import parse_size

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
_COUNT_SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_rate(text: str, *, what: str = "bandwidth") -> float:
    """'100GB/s' -> 100e9 bytes per second; a size per second, so the unit is required."""
    cleaned = text.strip()
    size = cleaned[:-2] if cleaned.lower().endswith(("/s", "ps")) else None
    try:
        if size is not None:
            return float(parse_size(size, what=what))
    except InvalidParameterError:
        pass
    raise InvalidParameterError(f"{what}={text!r} is invalid: expected a size per second like '100GB/s' or '900GiB/s'")


def parse_count(text: str, *, what: str = "count") -> float:
    """'800M' -> 8e8, '1.5B' -> 1.5e9, '2k' -> 2000, '1e9' -> 1e9."""
    match = re.fullmatch(_NUMBER + r"\s*([kmbgt]?)", text.strip().lower().replace("_", "").replace(",", ""))
    if not match:
        raise InvalidParameterError(f"{what} must look like '800M', '1.5B' or '1e9', got {text!r}")
    return float(match.group(1)) * _COUNT_SUFFIXES[match.group(2)]


def format_count(n: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"
