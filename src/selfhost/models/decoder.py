"""The decoder-only transformer every supported family is an instance of.

Inputs are flat: all tokens of a step in one (T,) tensor with their positions,
so the same forward serves one sequence or a packed batch; the KV store passed
in knows which sequence each token belongs to.
"""

from __future__ import annotations

import torch
from torch import nn

from selfhost.layers.attention import Attention, KVStore
from selfhost.layers.latent_attention import LatentAttention
from selfhost.layers.linear import Linear
from selfhost.layers.mlp import GatedMLP
from selfhost.layers.moe import SparseMoE
from selfhost.layers.norm import RMSNorm
from selfhost.layers.rotary import RotaryEmbedding
from selfhost.models.spec import ModelSpec


def _latent_attention(spec: ModelSpec, layer_idx: int) -> LatentAttention:
    return LatentAttention(
        layer_idx, spec.hidden_size, spec.num_heads, spec.q_lora_rank, spec.kv_lora_rank, spec.qk_nope_head_dim,
        spec.qk_rope_head_dim, spec.v_head_dim, spec.attn_scale, spec.o_bias, spec.rope_interleave,
    )


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, layer_idx: int):
        super().__init__()
        norm = lambda: RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_weight_offset)  # noqa: E731
        self.self_attn = _latent_attention(spec, layer_idx) if spec.is_mla else Attention(
            layer_idx=layer_idx,
            hidden_size=spec.hidden_size,
            num_heads=spec.num_heads,
            num_kv_heads=spec.num_kv_heads,
            head_dim=spec.head_dim,
            scale=spec.attn_scale,
            qkv_bias=spec.qkv_bias,
            o_bias=spec.o_bias,
            qk_norm_eps=spec.rms_norm_eps if spec.qk_norm else None,
            norm_weight_offset=spec.norm_weight_offset,
            sliding_window=spec.layer_windows[layer_idx],
            softcap=spec.attn_softcap,
            sinks=spec.attn_sinks,
        )
        if spec.is_moe_layer(layer_idx):
            self.mlp = SparseMoE(spec.hidden_size, spec.expert_size, spec.num_experts, spec.experts_per_token,
                                 spec.normalize_top_k, spec.activation, spec.shared_expert_size,
                                 spec.shared_expert_gated, spec.routing, spec.num_expert_groups,
                                 spec.top_k_expert_groups, spec.routed_scaling_factor, spec.router_bias,
                                 spec.expert_bias, spec.swiglu_alpha, spec.swiglu_limit)
        else:
            self.mlp = GatedMLP(spec.hidden_size, spec.intermediate_size, spec.activation, spec.mlp_bias)
        # Checkpoint names differ in meaning: in Llama-style layers
        # `post_attention_layernorm` is the norm *before* the MLP; in Gemma 2/3
        # it normalises the attention output and `pre_feedforward_layernorm`
        # precedes the MLP.
        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.sandwich = spec.sandwich_norms
        if self.sandwich:
            self.pre_feedforward_layernorm = norm()
            self.post_feedforward_layernorm = norm()

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: KVStore, num_threads: int = 1,
        rows: torch.Tensor | None = None, pending: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(residual stream, what is still to be added to it). `pending`: the layer before's MLP output, not
        yet added to x: the input norm adds it in the same pass (RMSNorm.add_forward), where a separate add
        read and wrote the whole stream once more per layer (a 1024-token prompt of the 125M shape: two
        2.4 MB passes a layer). The caller adds the last layer's (CausalLM.forward: in the final norm).
        rows: where only these rows' outputs are wanted (the last layer of a prompt step), every
        row still attends and writes its keys and values, and the rest of the layer runs on `rows`
        alone; the outputs then have one row per entry of `rows`."""
        # Submodules are called through .forward: nn.Module.__call__ (hook dispatch) costs
        # ~1 ms per decoded token across 30 layers, and this model registers no hooks.
        if pending is None:
            normed = self.input_layernorm.forward(x, num_threads)
        else:
            x, normed = self.input_layernorm.add_forward(x, pending, num_threads)
        attn_out = self.self_attn.forward(normed, cos, sin, kv, num_threads)
        if rows is not None:
            x, attn_out = x.index_select(0, rows), attn_out.index_select(0, rows)
        if self.sandwich:
            x = x + self.post_attention_layernorm.forward(attn_out)
            mlp_out = self.mlp.forward(self.pre_feedforward_layernorm.forward(x), num_threads)
            return x, self.post_feedforward_layernorm.forward(mlp_out)
        x, h = self.post_attention_layernorm.add_forward(x, attn_out, num_threads)
        return x, self.mlp.forward(h, num_threads)


class DecoderBody(nn.Module):
    """`model.*` in the checkpoint: embeddings, layers and the final norm."""

    def __init__(self, spec: ModelSpec):
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(spec, i) for i in range(spec.num_layers))
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, spec.norm_weight_offset)


class CausalLM(nn.Module):
    def __init__(self, spec: ModelSpec, max_len: int):
        super().__init__()
        self.spec = spec
        self.model = DecoderBody(spec)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        self.max_len = max_len
        self.rotaries = nn.ModuleList(RotaryEmbedding(r, max_len) for r in spec.ropes)

    def reset_rotaries(self) -> None:
        """Recompute rotary tables on the weights' device (after building on meta)."""
        device = self.lm_head.weight.device
        self.rotaries = nn.ModuleList(RotaryEmbedding(r, self.max_len).to(device) for r in self.spec.ropes)

    def tie_weights(self) -> None:
        if self.spec.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv: KVStore, num_threads: int = 1,
                layers_runner=None, output_rows: torch.Tensor | None = None) -> torch.Tensor:
        """(T,) token ids and positions -> (T, hidden) final hidden states.

        num_threads: how many threads selfhost's CPU kernels use in this forward pass
        (the engine chooses it per step); ignored on GPUs and by torch's own ops.
        layers_runner: the engine's one-call decode runner (engine/decode_layers.py), offered
        the step first; it returns the final hidden states (embedding, every layer and the final
        norm in one C call), or None where it declines the step.
        output_rows: (N,) int64 rows whose states the caller will read (a prompt's last token, a
        verification's rows): the result is then (N, hidden), in that order. Nothing after the last
        layer's attention depends on another row, so the rest of that layer (its MLP: most of a
        layer's products) runs on those rows only; every row's keys and values are still written."""
        if layers_runner is not None and (hidden := layers_runner(input_ids, positions, kv, num_threads)) is not None:
            return hidden if output_rows is None else hidden.index_select(0, output_rows)
        x = self.model.embed_tokens(input_ids)  # (T, hidden)
        if self.spec.embed_scale is not None:
            # The reference rounds the scale to the activation dtype first.
            x = x * torch.tensor(self.spec.embed_scale, dtype=x.dtype)
        tables = [rotary.lookup(positions, x.dtype) for rotary in self.rotaries]
        last, pending = len(self.model.layers) - 1, None
        for i, (layer, rope_idx) in enumerate(zip(self.model.layers, self.spec.layer_rope)):
            cos, sin = tables[rope_idx]
            x, pending = layer.forward(x, cos, sin, kv, num_threads, output_rows if i == last else None, pending)
        if pending is None:
            return self.model.norm.forward(x)
        return self.model.norm.add_forward(x, pending, num_threads)[1]

    def compute_logits(self, hidden: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        """(N, hidden) -> (N, vocab) fp32 logits, soft-capped where the family does."""
        logits = self.lm_head.forward(hidden, num_threads).float()
        if self.spec.final_softcap is not None:
            logits = torch.tanh(logits / self.spec.final_softcap) * self.spec.final_softcap
        return logits
