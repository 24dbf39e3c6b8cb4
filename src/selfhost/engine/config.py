"""EngineConfig: how much KV memory, how many sequences and tokens per step."""

from __future__ import annotations

from dataclasses import dataclass

from selfhost.errors import InvalidParameterError
from selfhost.units import parse_size_or_fraction


def parse_memory(value: str | int | float) -> int | float:
    """kv_cache_memory -> bytes (int: '2GiB', '512MB', an int) or a fraction of free memory
    (float in (0, 1]: 0.5 or '0.5'); see selfhost.units."""
    return parse_size_or_fraction(value, what="kv_cache_memory")


@dataclass(frozen=True)
class EngineConfig:
    """Engine limits. `kv_cache_memory`: bytes (an int or a size like '2GiB') or a fraction in (0, 1]
    of free memory (0.3 or '0.3')."""

    kv_cache_memory: str | int | float = 0.3
    block_size: int = 16
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 1024
    max_model_len: int | None = None
    enable_prefix_caching: bool = True

    def __post_init__(self):
        parse_memory(self.kv_cache_memory)  # raises InvalidParameterError naming the value
        if self.block_size < 1 or self.block_size & (self.block_size - 1):
            raise InvalidParameterError(f"block_size={self.block_size} must be a power of two")
        if self.max_num_seqs < 1:
            raise InvalidParameterError(f"max_num_seqs={self.max_num_seqs} must be >= 1")
        if self.max_num_batched_tokens < 1:
            raise InvalidParameterError(f"max_num_batched_tokens={self.max_num_batched_tokens} must be >= 1")

    @property
    def kv_cache_bytes_or_fraction(self) -> int | float:
        return parse_memory(self.kv_cache_memory)
