"""Sparse mixture-of-experts MLP (Mixtral, Qwen MoE, DeepSeek V2/V3): each token runs its top-k experts.

A router scores every expert per token (layers/router.py: softmax top-k, or DeepSeek's
group-limited methods, in fp32 as the references do), keeps the top k, and optionally
renormalises and scales their weights. Tokens are then grouped by expert:
one sort of the (token, expert) pairs, and each expert that has tokens in this step runs once on
all of them with the ordinary Linear kernels (so bf16 weights, int8/int4 and the CPU kernels apply
to experts as to any MLP); one gather returns the outputs to token order, weighted and summed. Experts nobody chose
this step cost nothing, which is what makes a sparse model cheap to decode. Qwen2-MoE adds a
shared expert that every token runs, scaled by its own sigmoid gate; DeepSeek's shared experts
(one MLP as wide as all of them) are added ungated.
"""

from __future__ import annotations

import torch
from torch import nn

from selfhost.layers.linear import Linear
from selfhost.layers.mlp import GatedMLP
from selfhost.layers.router import route


class SparseMoE(nn.Module):
    def __init__(self, hidden_size: int, expert_size: int, num_experts: int, top_k: int, normalize_top_k: bool,
                 activation: str, shared_expert_size: int = 0, shared_expert_gated: bool = True,
                 routing: str = "softmax_top_k", num_groups: int = 1, top_k_groups: int = 1,
                 routed_scaling_factor: float = 1.0, router_bias: bool = False, expert_bias: bool = False,
                 swiglu_alpha: float | None = None, swiglu_limit: float | None = None):
        """routing: a key of layers.router.ROUTING; "noaux_tc" adds the router's score-correction bias.
        gpt-oss: a router with a bias, experts with biases and the clamped SwiGLU (alpha, limit)."""
        super().__init__()
        self.num_experts, self.top_k, self.normalize_top_k = num_experts, top_k, normalize_top_k
        self.routing, self.num_groups, self.top_k_groups = routing, num_groups, top_k_groups
        self.routed_scaling_factor = routed_scaling_factor
        self.gate = Linear(hidden_size, num_experts, bias=router_bias)  # the router
        # DeepSeek V3's per-expert bias on the scores that choose experts (checkpoint: gate.e_score_correction_bias)
        self.register_buffer("e_score_correction_bias", torch.zeros(num_experts) if routing == "noaux_tc" else None)
        self.experts = nn.ModuleList(GatedMLP(hidden_size, expert_size, activation, expert_bias, swiglu_alpha,
                                              swiglu_limit) for _ in range(num_experts))
        self.shared_expert = GatedMLP(hidden_size, shared_expert_size, activation, bias=False) \
            if shared_expert_size else None
        self.shared_expert_gate = Linear(hidden_size, 1, bias=False) if shared_expert_size and shared_expert_gated \
            else None

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        """(T, hidden) -> (T, hidden)."""
        weights, experts = route(
            self.gate.forward(x, num_threads).float(), self.routing, self.top_k, self.normalize_top_k,
            self.num_groups, self.top_k_groups, self.routed_scaling_factor, self.e_score_correction_bias,
        )  # (T, k) each
        weights = weights.to(x.dtype)
        # Group the T * k (token, expert) pairs by expert with one sort; each chosen expert runs once on
        # its rows, writing a contiguous slice of `results`; one gather puts the pairs back in token
        # order (cheaper than a scatter-add per expert: index_add_ of one row costs ~80 us on CPU).
        flat = experts.flatten()
        order = flat.argsort(stable=True)
        tokens = order // self.top_k
        counts = torch.bincount(flat, minlength=self.num_experts).tolist()
        results = torch.empty(flat.numel(), x.shape[1], dtype=x.dtype, device=x.device)
        start = 0
        for expert, count in enumerate(counts):
            if count:
                results[start:start + count] = self.experts[expert].forward(x[tokens[start:start + count]], num_threads)
                start += count
        pairs = results[order.argsort()].view(x.shape[0], self.top_k, x.shape[1])
        out = (pairs * weights.unsqueeze(-1)).sum(dim=1)
        if self.shared_expert is not None:
            shared = self.shared_expert.forward(x, num_threads)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate.forward(x, num_threads)) * shared
            out = out + shared
        return out
