"""Rotary position embeddings and the frequency scalings real checkpoints use.

Frequencies follow the rotate-half layout of Hugging Face checkpoints: the
first and second halves of the rotary dims form the (x, y) pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from selfhost.errors import UnsupportedModelError


@dataclass(frozen=True)
class RopeSpec:
    """Everything needed to build one rotary table; plain numbers only."""

    theta: float
    rotary_dim: int
    rope_type: str = "default"
    factor: float = 1.0
    # llama3 scaling
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position: int | None = None
    # longrope (Phi-3): per-frequency divisors for short and long contexts
    short_factor: tuple[float, ...] | None = None
    long_factor: tuple[float, ...] | None = None
    attention_factor: float = 1.0
    # yarn (DeepSeek V2/V3): the band of dims between these rotation counts is interpolated
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    truncate: bool = True


def _base_inv_freq(spec: RopeSpec) -> torch.Tensor:
    exponents = torch.arange(0, spec.rotary_dim, 2, dtype=torch.int64).float() / spec.rotary_dim
    return 1.0 / (spec.theta**exponents)


def _llama3_inv_freq(spec: RopeSpec) -> torch.Tensor:
    # Llama 3.1: long wavelengths are stretched by `factor`, short ones kept,
    # the band between is interpolated smoothly.
    inv_freq = _base_inv_freq(spec)
    old_len = spec.original_max_position
    low_freq_wavelen = old_len / spec.low_freq_factor
    high_freq_wavelen = old_len / spec.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / spec.factor, inv_freq)
    smooth = (old_len / wavelen - spec.low_freq_factor) / (spec.high_freq_factor - spec.low_freq_factor)
    smoothed = (1 - smooth) * scaled / spec.factor + smooth * scaled
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _longrope_inv_freq(spec: RopeSpec, factors: tuple[float, ...]) -> torch.Tensor:
    exponents = torch.arange(0, spec.rotary_dim, 2, dtype=torch.int64).float() / spec.rotary_dim
    return 1.0 / (torch.tensor(factors, dtype=torch.float32) * spec.theta**exponents)


def _yarn_inv_freq(spec: RopeSpec) -> torch.Tensor:
    # YaRN: dims that turn more than beta_fast times over the original window keep their
    # frequency, those turning fewer than beta_slow times are divided by `factor`, a ramp between.
    dim, base, original = spec.rotary_dim, spec.theta, spec.original_max_position

    def dim_of(rotations: float) -> float:  # the dim index that turns `rotations` times over the window
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = dim_of(spec.beta_fast), dim_of(spec.beta_slow)
    if spec.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # the reference's guard against a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    kept = 1 - ramp  # share of each frequency left unscaled
    divisors = base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim)
    return 1.0 / (spec.factor * divisors) * (1 - kept) + 1.0 / divisors * kept


def _angles(inv_freq: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return torch.outer(positions.float(), inv_freq)  # (P, rotary_dim/2)


def rope_angles(spec: RopeSpec, max_len: int) -> torch.Tensor:
    """Rotation angle per position and frequency, (max_len, rotary_dim/2), fp32."""
    positions = torch.arange(max_len)
    if spec.rope_type == "default":
        return _angles(_base_inv_freq(spec), positions)
    if spec.rope_type == "linear":
        return _angles(_base_inv_freq(spec) / spec.factor, positions)
    if spec.rope_type == "llama3":
        return _angles(_llama3_inv_freq(spec), positions)
    if spec.rope_type == "yarn":
        return _angles(_yarn_inv_freq(spec), positions)
    if spec.rope_type == "longrope":
        # Positions inside the pre-training window use the short factors, later
        # ones the long factors (the reference switches per forward pass; the
        # two agree whenever a sequence stays inside the original window).
        original = spec.original_max_position
        short = _angles(_longrope_inv_freq(spec, spec.short_factor), positions[:original])
        long = _angles(_longrope_inv_freq(spec, spec.long_factor), positions[original:])
        return torch.cat([short, long])
    raise UnsupportedModelError(
        f"rope scaling type {spec.rope_type!r} is not supported; supported: default, linear, llama3, longrope, yarn"
    )


class RotaryEmbedding(nn.Module):
    """Precomputed cos/sin tables, looked up once per forward pass.

    The sin table carries the rotate-half sign (-sin on the first half, +sin on
    the second), so a rotation is two products over the rolled input instead of
    negating and concatenating halves every layer.
    """

    def __init__(self, spec: RopeSpec, max_len: int):
        super().__init__()
        self.rotary_dim = spec.rotary_dim
        angles = rope_angles(spec, max_len)  # (max_len, rotary_dim/2)
        cos, sin = angles.cos() * spec.attention_factor, angles.sin() * spec.attention_factor
        self.register_buffer("cos", torch.cat([cos, cos], dim=-1), persistent=False)
        self.register_buffer("signed_sin", torch.cat([-sin, sin], dim=-1), persistent=False)

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # (T, 1, rotary_dim): broadcast over heads
        return self.cos[positions].unsqueeze(1).to(dtype), self.signed_sin[positions].unsqueeze(1).to(dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (T, heads, head_dim); only the first cos.shape[-1] dims rotate.

    rotate_half(x) * sin == roll(x, half) * signed_sin, element by element.
    """
    rotary_dim = cos.shape[-1]
    if rotary_dim == x.shape[-1]:
        return torch.addcmul(x * cos, x.roll(rotary_dim // 2, dims=-1), signed_sin)
    x_rot, x_pass = x[..., :rotary_dim], x[..., rotary_dim:]
    rotated = torch.addcmul(x_rot * cos, x_rot.roll(rotary_dim // 2, dims=-1), signed_sin)
    return torch.cat((rotated, x_pass), dim=-1)
