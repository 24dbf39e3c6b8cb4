"""Accepting proposed tokens so that the output is exactly what the target model alone would give.

Greedy: a proposal is kept while it equals the target's argmax; the first disagreement is
replaced by the argmax, and if every proposal is kept the target's next argmax comes free.

Sampling (Leviathan et al., Chen et al.): proposal x_i drawn from q_i is kept with probability
min(1, p_i(x_i) / q_i(x_i)); at the first rejection the token is drawn from the normalised
residual max(0, p_i - q_i); if all k are kept, one more token is drawn from p_{k+1}. The kept
tokens then have exactly the target's distribution, whatever q is. Prompt lookup proposes
deterministically (q_i is a point mass), so its acceptance probability is p_i(x_i) and the
residual is p_i without x_i.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from selfhost.layers.sampler import argmax_rows, draw


def row_argmax(logits: torch.Tensor) -> list[int]:
    """Each row's argmax (the first maximum, as torch's), through the sampler's numpy path on CPU: ~4 us for
    nine rows of a 4,096-token vocabulary where torch's takes ~50 (a verification's rows are few and wide)."""
    return argmax_rows(logits).tolist()


def accept_greedy(target_logits: torch.Tensor, proposed: Sequence[int]) -> list[int]:
    """target_logits: (k + 1, vocab) for the positions after each of the k proposals' prefixes.

    Returns the tokens to append: the kept proposals, then the target's own next token.
    Rows are read only up to the first disagreement: the logits were just written by the LM head's
    threads, and on the 2-core machine reading all nine rows of a 4,096-token vocabulary took ~18 us
    (a cold row ~2-3 us), where most verifications stop at the first or second row.
    """
    lazy = target_logits.device.type == "cpu" and target_logits.dtype == torch.float32 and not target_logits.requires_grad
    rows = target_logits.numpy() if lazy else row_argmax(target_logits)
    out = []
    for i in range(len(proposed) + 1):
        best = int(rows[i].argmax()) if lazy else rows[i]  # numpy's first maximum, as torch's
        out.append(best)
        if i == len(proposed) or proposed[i] != best:
            return out
    return out


def accept_argmax(argmax: Sequence[int], proposed: Sequence[int]) -> list[int]:
    """`accept_greedy` from the rows' argmax, already found (by the step that made the logits)."""
    out = []
    for i, token in enumerate(proposed):
        out.append(argmax[i])
        if argmax[i] != token:
            return out
    out.append(argmax[len(proposed)])
    return out


def accept_sampled(target_probs: torch.Tensor, proposed: list[int], draft_probs: torch.Tensor | None,
                   generator: torch.Generator | None = None) -> list[int]:
    """target_probs: (k + 1, vocab) rows of p (after temperature and filters); draft_probs: (k, vocab)
    rows of q, or None for deterministic proposals (point masses). Returns the tokens to append."""
    out = []
    for i, token in enumerate(proposed):
        p = target_probs[i]
        q_token = 1.0 if draft_probs is None else float(draft_probs[i, token])
        accept = min(1.0, float(p[token]) / q_token) if q_token > 0 else 0.0
        if torch.rand((), generator=generator, device=p.device).item() < accept:
            out.append(token)
            continue
        if draft_probs is None:
            residual = p.clone()
            residual[token] = 0.0
        else:
            residual = (p - draft_probs[i]).clamp_min(0.0)
        # p == q where it matters (a zero residual): any draw from p is then exact.
        out.append(draw(residual if float(residual.sum()) > 0 else p, generator))
        return out
    out.append(draw(target_probs[len(proposed)], generator))
    return out

