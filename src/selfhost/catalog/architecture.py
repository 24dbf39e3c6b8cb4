"""Architecture facts of a checkpoint (from its config.json) and the parameter counts they imply."""

from __future__ import annotations

from dataclasses import dataclass

_MLP_KINDS = ("gated", "plain")  # gated: gate/up/down (SwiGLU, GeGLU); plain: up/down (Phi-2)
_ATTENTION_KINDS = ("gqa", "mla")  # mla: DeepSeek multi-head latent attention


@dataclass(frozen=True)
class Architecture:
    """Plain numbers from config.json; names follow Hugging Face where one exists.

    `sliding_layers` of the `layers` keep only the last `sliding_window` tokens in
    their KV cache (Gemma 2/3, Phi-3). MoE models set `experts`; their first
    `dense_layers` layers use a dense MLP of width `intermediate`, the rest route
    each token to `experts_per_token` of `experts` MLPs of width `moe_intermediate`
    plus `shared_experts` always-on ones.
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    max_context: int
    tied_embeddings: bool
    mlp: str = "gated"
    qkv_bias: bool = False
    sliding_window: int | None = None
    sliding_layers: int = 0
    experts: int = 0
    experts_per_token: int = 0
    shared_experts: int = 0
    moe_intermediate: int = 0
    dense_layers: int = 0
    attention: str = "gqa"
    q_lora_rank: int = 0
    kv_lora_rank: int = 0
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0

    def __post_init__(self) -> None:
        for field in ("layers", "hidden", "intermediate", "heads", "kv_heads", "head_dim", "vocab", "max_context"):
            value = getattr(self, field)
            if value <= 0:
                raise ValueError(f"architecture {field} must be > 0, got {value}")
        if self.heads % self.kv_heads:
            raise ValueError(f"heads ({self.heads}) must be a multiple of kv_heads ({self.kv_heads})")
        if self.mlp not in _MLP_KINDS:
            raise ValueError(f"mlp must be one of {_MLP_KINDS}, got {self.mlp!r}")
        if self.attention not in _ATTENTION_KINDS:
            raise ValueError(f"attention must be one of {_ATTENTION_KINDS}, got {self.attention!r}")
        if not 0 <= self.sliding_layers <= self.layers:
            raise ValueError(f"sliding_layers must be in [0, {self.layers}], got {self.sliding_layers}")
        if self.sliding_layers and not self.sliding_window:
            raise ValueError("sliding_layers needs a sliding_window")
        if self.experts and not 0 < self.experts_per_token <= self.experts:
            raise ValueError(f"experts_per_token must be in [1, {self.experts}], got {self.experts_per_token}")
        if self.experts and self.moe_intermediate <= 0:
            raise ValueError("an MoE architecture needs moe_intermediate > 0")
        if self.attention == "mla" and not (self.kv_lora_rank and self.qk_rope_head_dim and self.v_head_dim):
            raise ValueError("mla attention needs kv_lora_rank, qk_rope_head_dim and v_head_dim")

    @property
    def is_moe(self) -> bool:
        return self.experts > 0

    def attention_params(self) -> int:
        h = self.hidden
        if self.attention == "mla":
            qk_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
            if self.q_lora_rank:
                q = h * self.q_lora_rank + self.q_lora_rank * self.heads * qk_dim
            else:
                q = h * self.heads * qk_dim
            kv_down = h * (self.kv_lora_rank + self.qk_rope_head_dim)
            kv_up = self.kv_lora_rank * self.heads * (self.qk_nope_head_dim + self.v_head_dim)
            return q + kv_down + kv_up + self.heads * self.v_head_dim * h
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        bias = q_dim + 2 * kv_dim if self.qkv_bias else 0
        return h * q_dim + 2 * h * kv_dim + q_dim * h + bias

    def mlp_params(self, width: int) -> int:
        matrices = 3 if self.mlp == "gated" else 2
        return matrices * self.hidden * width

    def embedding_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied_embeddings else 2)

    def _count(self, experts_used: int) -> int:
        moe_layers = self.layers - self.dense_layers if self.is_moe else 0
        dense_layers = self.layers - moe_layers
        per_moe_layer = (experts_used + self.shared_experts) * self.mlp_params(self.moe_intermediate)
        router = self.hidden * self.experts
        return (
            self.layers * self.attention_params()
            + dense_layers * self.mlp_params(self.intermediate)
            + moe_layers * (per_moe_layer + router)
            + self.embedding_params()
        )

    def total_params(self) -> int:
        """Every decoder weight, norms left out (they are < 0.01% of any catalog model)."""
        return self._count(self.experts)

    def active_params(self) -> int:
        """Weights one token touches: all of a dense model, routed experts only for MoE."""
        return self._count(self.experts_per_token) if self.is_moe else self.total_params()
