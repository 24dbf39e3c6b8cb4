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
    shared_expert_gated: bool = True  # Qwen2-MoE scales it by a sigmoid gate; DeepSeek's is plain
    moe_layers: tuple[bool, ...] = ()
    # How tokens choose experts (a key of layers.router.ROUTING): plain softmax top-k, or DeepSeek's
    # group-limited top-k (V2: softmax scores; V3 "noaux_tc": sigmoid scores, bias-corrected choice).
    routing: str = "softmax_top_k"
    num_expert_groups: int = 1
    top_k_expert_groups: int = 1
    routed_scaling_factor: float = 1.0
    # Multi-head latent attention (DeepSeek V2/V3; layers/latent_attention.py): 0 = ordinary attention.
    # The cache holds kv_lora_rank + qk_rope_head_dim numbers per token and layer.
    kv_lora_rank: int = 0
    q_lora_rank: int | None = None  # None: queries from one full-rank projection (V2-Lite)
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0
    rope_interleave: bool = False  # rope dims stored as interleaved (x, y) pairs, not halves
    # gpt-oss: a learned per-head logit in every softmax's denominator (attention sinks), a router
    # and experts with biases, and the clamped SwiGLU (activation "clamped_swiglu").
    attn_sinks: bool = False
    router_bias: bool = False
    expert_bias: bool = False
    swiglu_alpha: float | None = None
    swiglu_limit: float | None = None

    def __post_init__(self):
        assert len(self.layer_windows) == self.num_layers == len(self.layer_rope)
        assert not self.moe_layers or len(self.moe_layers) == self.num_layers
        assert self.num_heads % self.num_kv_heads == 0, (self.num_heads, self.num_kv_heads)

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0

    def is_moe_layer(self, layer_idx: int) -> bool:
        return bool(self.moe_layers) and self.moe_layers[layer_idx]

    @property
    def kv_bytes_per_token(self) -> int:
        """KV-cache bytes per token at 1 byte per element (multiply by element size)."""
        if self.is_mla:  # one compressed latent and one shared rope key per layer, for all heads
            return self.num_layers * (self.kv_lora_rank + self.qk_rope_head_dim)
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim
