"""ModelSpec: the plain numbers a decoder is built from, whatever the family."""

from __future__ import annotations

from dataclasses import dataclass

from selfhost.layers.rotary import RopeSpec


@dataclass(frozen=True)
class ModelSpec:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    activation: str  # key of layers.activation.ACTIVATIONS
    max_position: int
    # Per layer: sliding window (None = global attention) and index into `ropes`.
    layer_windows: tuple[int | None, ...]
    layer_rope: tuple[int, ...]
    ropes: tuple[RopeSpec, ...]
    attn_scale: float
    tie_embeddings: bool = False
    norm_weight_offset: float = 0.0  # 1.0 for Gemma's (1 + w) norms
    embed_scale: float | None = None  # Gemma multiplies embeddings by sqrt(hidden)
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    # Gemma 2/3 wrap attention and MLP each in a pre- and a post-norm.
    sandwich_norms: bool = False
    attn_softcap: float | None = None
    final_softcap: float | None = None
    # Mixture of experts (layers/moe.py): 0 experts = every layer dense. `moe_layers` flags, per
    # layer, whether its MLP is the sparse one (Qwen's decoder_sparse_step / mlp_only_layers).
    num_experts: int = 0
    experts_per_token: int = 0
    expert_size: int = 0  # each expert's intermediate size
    normalize_top_k: bool = False  # renormalise the chosen experts' weights to sum to one
    shared_expert_size: int = 0  # Qwen2-MoE's always-on expert (0: none)
    moe_layers: tuple[bool, ...] = ()

    def __post_init__(self):
        assert len(self.layer_windows) == self.num_layers == len(self.layer_rope)
        assert not self.moe_layers or len(self.moe_layers) == self.num_layers
        assert self.num_heads % self.num_kv_heads == 0, (self.num_heads, self.num_kv_heads)

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer_idx]

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token at 1 byte per element (multiply by element size)."""
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim
