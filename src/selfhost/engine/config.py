"""EngineConfig: how much KV memory, how many sequences and tokens per step."""

from __future__ import annotations

import re
from dataclasses import dataclass

from selfhost.errors import InvalidParameterError

_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "m": 1e6, "mb": 1e6, "g": 1e9, "gb": 1e9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40, "t": 1e12, "tb": 1e12}


def parse_memory(value: str | int | float) -> int | float:
    """'2GiB' / '512MB' / 1e9 -> bytes (int); '0.5' or 0.5 -> a fraction of free memory (float < 1)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(value))
    if not match or match.group(2).lower() not in _UNITS:
        raise InvalidParameterError(
            f"kv_cache_memory={value!r} is invalid: expected bytes like '2GiB', '512MB' or a fraction like '0.5'"
        )
    number, unit = float(match.group(1)), match.group(2).lower()
    if not unit and number < 1:
        return number
    return int(number * _UNITS[unit])


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits. `kv_cache_memory`: bytes (int or '2GiB') or a fraction (< 1) of free memory."""

    kv_cache_memory: str | int | float = 0.3
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self):
        memory = parse_memory(self.kv_cache_memory)
        if memory <= 0:
            raise InvalidParameterError(f"kv_cache_memory={self.kv_cache_memory!r} must be positive")
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidParameterError(f"block_size={self.block_size} must be a power of two")
        if self.max_num_seqs < 1:
            raise InvalidParameterError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise InvalidParameterError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")

    @property
    def kv_cache_bytes_or_fraction(self) -> int | float:
        return parse_memory(self.kv_cache_memory)
