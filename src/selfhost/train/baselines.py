"""Count-based baselines a trained model has to beat, on the model's own terms.

Both are fitted on the training tokens and scored on exactly the (input,
target) pairs of the validation windows the trainer evaluates, so their
losses (nats per token) compare directly with the model's validation loss.
"""

from __future__ import annotations

import math

import torch

BIGRAM_DISCOUNT = 0.75  # the usual absolute-discounting constant; not tuned on validation data


def unigram_loss(train: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Add-one smoothed token frequencies, ignoring context."""
    counts = torch.bincount(train, minlength=vocab_size).double() + 1.0
    log_probs = counts.log() - counts.sum().log()
    return -log_probs[targets.reshape(-1)].mean().item()


def bigram_loss(train: torch.Tensor, inputs: torch.Tensor, targets: torch.Tensor, vocab_size: int) -> float:
    """Interpolated absolute discounting: P(w|v) = max(c(v,w) - d, 0) / c(v) + d * n(v) / c(v) * P_uni(w),
    where n(v) is how many distinct tokens followed v; unseen contexts fall back to P_uni."""
    uni = torch.bincount(train, minlength=vocab_size).double() + 1.0
    uni = uni / uni.sum()
    prev, nxt = inputs.reshape(-1), targets.reshape(-1)
    pair_ids = train[:-1] * vocab_size + train[1:]
    pairs, pair_counts = torch.unique(pair_ids, return_counts=True)
    context_counts = torch.bincount(train[:-1], minlength=vocab_size).double()
    followers = torch.bincount(pairs // vocab_size, minlength=vocab_size).double()

    # c(v, w) for each validation pair, by binary search in the sorted unique pairs.
    query = prev * vocab_size + nxt
    idx = torch.searchsorted(pairs, query).clamp(max=len(pairs) - 1)
    c_vw = torch.where(pairs[idx] == query, pair_counts[idx], 0).double()
    c_v = context_counts[prev]
    seen = c_v > 0
    safe_c_v = c_v.clamp(min=1.0)
    discounted = (c_vw - BIGRAM_DISCOUNT).clamp(min=0.0) / safe_c_v
    backoff = BIGRAM_DISCOUNT * followers[prev] / safe_c_v
    probs = torch.where(seen, discounted + backoff * uni[nxt], uni[nxt])
    return -probs.log().mean().item()


def baseline_losses(train: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> dict[str, float]:
    """{"unigram": nats, "bigram": nats} on the (N, T+1) validation windows."""
    inputs, targets = windows[:, :-1], windows[:, 1:]
    return {
        "unigram": unigram_loss(train, targets, vocab_size),
        "bigram": bigram_loss(train, inputs, targets, vocab_size),
    }


def perplexity(loss: float) -> float:
    return math.exp(loss)
