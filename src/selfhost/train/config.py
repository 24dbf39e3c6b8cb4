"""What to train and how: the model's shape, the optimisation schedule, and a
memory estimate that refuses a run before it starts if it cannot fit.

Both configs are frozen and checked when built, so a bad flag fails in the
first second with a message naming it, not after the tokenizer has trained.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass

import torch

from selfhost.errors import InvalidParameterError


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidParameterError(message)


@dataclass(frozen=True)
class ModelShape:
    """A Llama-architecture decoder's size. `vocab_size` is what the tokenizer
    is trained to; the model takes the trained tokenizer's actual size."""

    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 704
    num_layers: int = 6
    num_heads: int = 8
    num_kv_heads: int = 4
    context_len: int = 256
    rope_theta: float = 10_000.0
    tie_embeddings: bool = True
    # None: hidden_size // num_heads. A pruned model keeps its heads' size with fewer heads.
    explicit_head_dim: int | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads"):
            _require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        _require(self.vocab_size >= 260, f"vocab_size={self.vocab_size} must be at least 260 (256 bytes + specials)")
        _require(
            self.explicit_head_dim is not None or self.hidden_size % self.num_heads == 0,
            f"hidden_size={self.hidden_size} must be a multiple of num_heads={self.num_heads}",
        )
        _require(
            self.head_dim >= 2 and self.head_dim % 2 == 0,
            f"head_dim={self.head_dim} must be even for rotary embeddings",
        )
        _require(
            self.num_heads % self.num_kv_heads == 0,
            f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}",
        )
        _require(self.context_len >= 8, f"context_len={self.context_len} must be at least 8")

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_heads

    def num_params(self, vocab_size: int | None = None) -> int:
        vocab = vocab_size or self.vocab_size
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        per_layer = h * (q + 2 * kv) + q * h + 3 * h * self.intermediate_size + 2 * h
        head = 0 if self.tie_embeddings else vocab * h
        return vocab * h + self.num_layers * per_layer + h + head


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule and bookkeeping of one run."""

    max_steps: int = 1000
    batch_size: int = 16  # sequences per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 3e-3
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int | None = None  # None: 5% of max_steps
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float | None = 1.0
    eval_every: int = 100
    eval_tokens: int = 65_536  # validation tokens per evaluation (a fixed prefix of the split)
    checkpoint_every: int = 250
    val_fraction: float = 0.05
    seed: int = 1337

    def __post_init__(self):
        for name in ("max_steps", "batch_size", "grad_accum", "eval_every", "checkpoint_every", "eval_tokens"):
            _require(getattr(self, name) >= 1, f"{name}={getattr(self, name)} must be at least 1")
        _require(self.lr > 0, f"lr={self.lr} must be positive")
        _require(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio={self.min_lr_ratio} must be in [0, 1]")
        _require(
            self.warmup_steps is None or 0 <= self.warmup_steps < self.max_steps,
            f"warmup_steps={self.warmup_steps} must be in [0, max_steps={self.max_steps})",
        )
        _require(self.weight_decay >= 0, f"weight_decay={self.weight_decay} must be >= 0")
        _require(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, f"betas ({self.beta1}, {self.beta2}) must be in [0, 1)")
        _require(self.grad_clip is None or self.grad_clip > 0, f"grad_clip={self.grad_clip} must be positive or None")
        _require(0 < self.val_fraction < 0.5, f"val_fraction={self.val_fraction} must be in (0, 0.5)")

    @property
    def num_warmup_steps(self) -> int:
        return self.max_steps // 20 if self.warmup_steps is None else self.warmup_steps

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step, before multiplying by context_len."""
        return self.batch_size * self.grad_accum


# Named sizes for `--size`. "tiny" is for tests and smoke runs.
MODEL_SIZES: dict[str, ModelShape] = {
    "tiny": ModelShape(vocab_size=320, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4,
                       num_kv_heads=2, context_len=32),
    "small": ModelShape(vocab_size=4096, hidden_size=256, intermediate_size=704, num_layers=6, num_heads=8,
                        num_kv_heads=4, context_len=256),
    "base": ModelShape(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_layers=8, num_heads=8,
                       num_kv_heads=4, context_len=512),
}


def model_size(name: str) -> ModelShape:
    if name not in MODEL_SIZES:
        raise InvalidParameterError(f"model size {name!r} is unknown; choose one of {', '.join(MODEL_SIZES)}")
    return MODEL_SIZES[name]


def estimate_train_bytes(shape: ModelShape, batch_size: int) -> int:
    """Peak memory of one fp32 training step, roughly and on the high side.

    Weights, gradients and AdamW's two moments are 16 bytes per parameter.
    Autograd keeps about 14 hidden-sized and 3 intermediate-sized activations
    per token and layer (norm inputs, q/k/v before and after rotary, attention
    output, gate/up and their product); the logits and their gradient add
    three vocab-sized rows per token. Attention itself is memory-efficient
    SDPA, so nothing grows with context_len squared.
    """
    tokens = batch_size * shape.context_len
    per_token_layer = 14 * shape.hidden_size + 3 * shape.intermediate_size
    activations = tokens * (shape.num_layers * per_token_layer + 3 * shape.vocab_size)
    return 16 * shape.num_params() + 4 * activations


def device_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits(shape: ModelShape, batch_size: int, device: torch.device, usable_fraction: float = 0.8) -> int:
    """Raise if a training step would need more than `usable_fraction` of the device's memory."""
    need = estimate_train_bytes(shape, batch_size)
    have = int(device_memory_bytes(device) * usable_fraction)
    if need > have:
        raise InvalidParameterError(
            f"this config needs about {need / 2**30:.1f} GiB to train ({shape.num_params() / 1e6:.1f}M parameters, "
            f"batch {batch_size} x {shape.context_len} tokens) but {device.type} has {have / 2**30:.1f} GiB usable; "
            "lower --batch-size (and raise --grad-accum), --context-len, or the model size"
        )
    return need


def config_dict(shape: ModelShape, cfg: TrainConfig) -> dict:
    return {"model": asdict(shape), "train": asdict(cfg)}
