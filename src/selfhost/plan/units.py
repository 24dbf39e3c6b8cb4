"""Parse the human quantities the CLI accepts: '16GB', '100GB/s', '800M', '1.5B'."""

from __future__ import annotations

import re

from selfhost.errors import InvalidParameterError

_NUMBER = r"([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)"
# Decimal units for storage and bandwidth, as vendors quote them; binary ones when asked for.
_BYTE_UNITS = {"": 1, "b": 1, "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12, "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_COUNT_SUFFIXES = {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_bytes(text: str, *, what: str = "memory") -> float:
    """'16GB' -> 16e9; a bare number means GB."""
    match = re.fullmatch(_NUMBER + r"\s*([kmgt]i?b|b)?", text.strip().lower())
    if not match:
        raise InvalidParameterError(f"{what} must look like '16GB' or '512MiB', got {text!r}")
    value, unit = float(match.group(1)), match.group(2)
    return value * (_BYTE_UNITS[unit] if unit else 1e9)


def parse_rate(text: str, *, what: str = "bandwidth") -> float:
    """'100GB/s' -> 100e9 bytes per second; a bare number means GB/s."""
    cleaned = text.strip().lower().removesuffix("/s").removesuffix("ps")
    return parse_bytes(cleaned, what=what)


def parse_count(text: str, *, what: str = "count") -> float:
    """'800M' -> 8e8, '1.5B' -> 1.5e9, '2k' -> 2000, '1e9' -> 1e9."""
    match = re.fullmatch(_NUMBER + r"\s*([kmbgt]?)", text.strip().lower().replace("_", "").replace(",", ""))
    if not match:
        raise InvalidParameterError(f"{what} must look like '800M', '1.5B' or '1e9', got {text!r}")
    return float(match.group(1)) * _COUNT_SUFFIXES[match.group(2)]


def format_bytes(n_bytes: float) -> str:
    return f"{n_bytes / 1e9:.2f} GB"


def format_count(n: float) -> str:
    for suffix, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.3g}{suffix}"
    return f"{n:.3g}"
