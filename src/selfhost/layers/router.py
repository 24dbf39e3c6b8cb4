"""How a mixture-of-experts layer's tokens choose their experts: router logits -> (weights, experts).

Three methods, named as checkpoints name them:
- softmax_top_k: softmax over all experts, keep the k best (Mixtral, Qwen MoE, DeepSeek V2 "greedy").
- group_limited_greedy (DeepSeek V2): experts form groups; a token only looks inside the
  top_k_groups groups whose best softmax score is highest, then keeps its k best there.
- noaux_tc (DeepSeek V3): sigmoid scores; a learned per-expert bias (trained instead of an
  auxiliary balancing loss) shifts which experts are *chosen*, groups rank by the sum of their two
  best biased scores, but the weights are the unbiased scores of the chosen experts.
Then, optionally, the k weights are renormalised to sum to one, and scaled by routed_scaling_factor.
Everything runs in fp32, as the references do.
"""

from __future__ import annotations

import torch


def _softmax_top_k(logits: torch.Tensor, top_k: int, groups: int, top_groups: int, bias: torch.Tensor | None):
    return logits.softmax(dim=-1).topk(top_k, dim=-1)


def _keep_top_groups(choice: torch.Tensor, group_scores: torch.Tensor, top_groups: int) -> torch.Tensor:
    """`choice` (T, E) with every expert outside each token's top_groups groups set to -inf."""
    num_tokens, num_groups = group_scores.shape
    kept = group_scores.topk(top_groups, dim=-1).indices  # (T, top_groups)
    outside = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, kept, False)  # (T, G)
    outside = outside.unsqueeze(-1).expand(num_tokens, num_groups, choice.shape[1] // num_groups)
    return choice.masked_fill(outside.reshape(choice.shape), float("-inf"))


def _group_limited_greedy(logits, top_k, groups, top_groups, bias):
    scores = logits.softmax(dim=-1)
    group_best = scores.view(scores.shape[0], groups, -1).amax(dim=-1)  # (T, G)
    return _keep_top_groups(scores, group_best, top_groups).topk(top_k, dim=-1)


def _noaux_tc(logits, top_k, groups, top_groups, bias):
    scores = logits.sigmoid()
    choice = scores + bias  # the bias picks experts; it never weights them
    group_score = choice.view(scores.shape[0], groups, -1).topk(2, dim=-1).values.sum(dim=-1)  # (T, G)
    experts = _keep_top_groups(choice, group_score, top_groups).topk(top_k, dim=-1).indices
    return scores.gather(1, experts), experts


ROUTING = {
    "softmax_top_k": _softmax_top_k,
    "group_limited_greedy": _group_limited_greedy,
    "noaux_tc": _noaux_tc,
}


def route(
    logits: torch.Tensor,  # (T, num_experts) fp32 router logits
    method: str,
    top_k: int,
    normalize_top_k: bool = False,
    num_groups: int = 1,
    top_k_groups: int = 1,
    scaling_factor: float = 1.0,
    score_bias: torch.Tensor | None = None,  # (num_experts,), noaux_tc's correction
) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (T, k) fp32 weights and (T, k) expert ids."""
    weights, experts = ROUTING[method](logits, top_k, num_groups, top_k_groups, score_bias)
    if normalize_top_k:
        weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
    if scaling_factor != 1.0:
        weights = weights * scaling_factor
    return weights, experts
