"""Turn a step's logits into next tokens, one row per sequence.

Penalties, temperature and the top-k / top-p / min-p filters are applied as
batched tensor ops; only the final draw loops over rows, because each request
may carry its own seeded generator (that is what makes `seed` reproducible
whatever else shares the batch).

A layer: it takes plain per-row values (`SamplerRow`) and returns plain
tuples. The engine maps a request's SamplingParams onto a row and turns the
tuples into its own output types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

try:
    from selfhost.layers import _token_mask_cpu
except ImportError:  # not compiled here: the tensor path below
    _token_mask_cpu = None

# (output_ids, logits_row) -> logits_row, applied before sampling (e.g. a JSON grammar mask).
LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]
# Chosen token's logprob and the top alternatives as [(token id, logprob), ...], best first.
Logprobs = tuple[float, list[tuple[int, float]]]


@dataclass
class SamplerRow:
    """One sequence's sampling settings. `prompt_ids` / `output_ids` are the live lists the caller appends to."""

    prompt_ids: list[int]
    output_ids: list[int]
    temperature: float = 1.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int | None = None
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    num_logprobs: int | None = None  # alternatives returned per token; None: no logprobs at all
    logits_processors: tuple[LogitsProcessor, ...] = ()
    seed: int | None = None
    # One generator per device, made on first use: a draw takes a generator on the device of the
    # probabilities it draws from.
    _generators: dict[torch.device, torch.Generator] = field(default_factory=dict, repr=False)

    @property
    def is_greedy(self) -> bool:
        return self.temperature == 0

    @property
    def has_penalties(self) -> bool:
        return self.repetition_penalty != 1.0 or self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    @property
    def is_plain_greedy(self) -> bool:
        """Greedy, with nothing to apply before the argmax and no logprobs to return."""
        return (self.temperature == 0 and self.num_logprobs is None and not self.logits_processors
                and not self.has_penalties)

    def generator(self, device: torch.device) -> torch.Generator | None:
        """This row's seeded generator on `device` (None without a seed); it advances with every draw."""
        if self.seed is None:
            return None
        generator = self._generators.get(device)
        if generator is None:
            generator = self._generators[device] = torch.Generator(device=device).manual_seed(self.seed)
        return generator


@dataclass(frozen=True)
class TokenMasks:
    """Which tokens some rows may sample: `bitmasks[j]` (int32 words, bit t of word t // 32) is row `rows[j]`'s."""

    rows: list[int]
    bitmasks: torch.Tensor  # (len(rows), ceil(vocab / 32)) int32


def apply_token_masks(logits: torch.Tensor, masks: TokenMasks) -> torch.Tensor:
    """Set the logits of tokens a row's mask forbids to -inf (in place, all rows at once).

    On CPU a small C loop does it word by word (_token_mask_cpu.c); elsewhere one tensor op
    over the unpacked bits.
    """
    vocab = logits.shape[1]
    bitmasks = masks.bitmasks.contiguous()
    if _token_mask_cpu is not None and logits.device.type == "cpu" and logits.dtype == torch.float32 \
            and logits.stride(1) == 1:
        rows = torch.tensor(masks.rows, dtype=torch.int64)
        _token_mask_cpu.forbid(logits.data_ptr(), logits.stride(0), vocab, rows.data_ptr(), len(masks.rows),
                               bitmasks.data_ptr(), bitmasks.shape[1])
        return logits
    bits = np.unpackbits(bitmasks.cpu().numpy().view(np.uint8), axis=1, bitorder="little")[:, :vocab]
    allowed = torch.from_numpy(bits).to(device=logits.device, dtype=torch.bool)
    rows = torch.tensor(masks.rows, dtype=torch.long, device=logits.device)
    logits[rows] = logits[rows].masked_fill(~allowed, float("-inf"))
    return logits


@dataclass(frozen=True)
class SampleResult:
    token_ids: list[int]
    logprobs: list[Logprobs | None]  # per row; None when the row asked for none


def apply_penalties(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    for i, row in enumerate(rows):
        if not row.has_penalties:
            continue
        if row.repetition_penalty != 1.0:
            # Multiplicative penalty over prompt and output tokens alike.
            seen = torch.tensor(row.prompt_ids + row.output_ids, dtype=torch.long, device=logits.device).unique()
            scores = logits[i, seen]
            logits[i, seen] = torch.where(scores > 0, scores / row.repetition_penalty, scores * row.repetition_penalty)
        if row.output_ids and (row.presence_penalty or row.frequency_penalty):
            # Additive OpenAI-style penalties count generated tokens only.
            out = torch.tensor(row.output_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= row.frequency_penalty * counts + row.presence_penalty * (counts > 0).to(logits.dtype)
    return logits


def filter_logits(logits: torch.Tensor, rows: list[SamplerRow]) -> torch.Tensor:
    """Temperature, then top-k, top-p and min-p, as -inf masks."""
    device = logits.device
    temps = torch.tensor([r.temperature for r in rows], device=device).unsqueeze(1)
    logits = logits / temps
    top_ks = [r.top_k for r in rows]
    top_ps = [r.top_p for r in rows]
    min_ps = [r.min_p for r in rows]
    if any(k is not None for k in top_ks) or any(p < 1.0 for p in top_ps):
        sorted_logits, sorted_idx = logits.sort(dim=-1, descending=True)
        vocab = logits.shape[1]
        k = torch.tensor([min(k or vocab, vocab) for k in top_ks], device=device).unsqueeze(1)
        ranks = torch.arange(vocab, device=device).unsqueeze(0)
        remove = ranks >= k
        probs = sorted_logits.masked_fill(remove, float("-inf")).softmax(dim=-1)
        # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
        mass_before = probs.cumsum(dim=-1) - probs
        remove |= mass_before >= torch.tensor(top_ps, device=device).unsqueeze(1)
        sorted_logits = sorted_logits.masked_fill(remove, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, sorted_idx, sorted_logits)
    if any(p > 0 for p in min_ps):
        probs = logits.softmax(dim=-1)
        threshold = torch.tensor(min_ps, device=device).unsqueeze(1) * probs.max(dim=-1, keepdim=True).values
        logits = logits.masked_fill(probs < threshold, float("-inf"))
    return logits


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """Index of each row's largest logit (the first where several tie, as torch's). On CPU through
    numpy: torch's argmax took 0.9-1.7 ms for a 32 x 32,000 decode batch here, numpy's 0.13."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
        return torch.from_numpy(logits.numpy().argmax(axis=-1))
    return logits.argmax(dim=-1)


def plain_greedy(logits: np.ndarray) -> SampleResult:
    """`sample` for rows that are all plain greedy (`SamplerRow.is_plain_greedy`) without masks, from
    (N, vocab) fp32 logits as an array: each row's first largest logit, as `argmax_rows`."""
    return SampleResult(logits.argmax(axis=-1).tolist(), [None] * logits.shape[0])


def draw(weights: torch.Tensor, generator: torch.Generator | None = None) -> int:
    """One index drawn with probability proportional to `weights` (non-negative, not all zero).

    On CPU by inverse CDF (a uniform from `generator` against the float64 running sum): ~10 us for
    4,096 entries, where torch.multinomial takes ~110-210 (most of a small model's sampled decode step)."""
    if weights.device.type != "cpu":
        return int(torch.multinomial(weights, 1, generator=generator))
    cdf = weights.double().numpy().cumsum()
    u = float(torch.rand((), dtype=torch.float64, generator=generator)) * cdf[-1]
    # The first entry whose running sum exceeds u: never one of zero weight (its sum equals its predecessor's).
    return min(int(np.searchsorted(cdf, u, side="right")), len(cdf) - 1)


def sample(logits: torch.Tensor, rows: list[SamplerRow], token_masks: TokenMasks | None = None) -> SampleResult:
    """logits: (N, vocab) fp32, one row per entry of `rows`; `token_masks` limit what some rows may sample.

    Logprobs are the model's own distribution, before any mask, penalty or filter.
    """
    if token_masks is None and all(r.is_plain_greedy for r in rows):
        # The argmax alone, as below: ~10 us less of a demo-model decode step (~0.5 ms).
        if logits.device.type == "cpu" and logits.dtype == torch.float32 and not logits.requires_grad:
            return plain_greedy(logits.numpy())
        return SampleResult(logits.argmax(dim=-1).tolist(), [None] * len(rows))
    want_logprobs = [r.num_logprobs is not None for r in rows]
    raw_logprobs = logits.log_softmax(dim=-1) if any(want_logprobs) else None
    if token_masks is not None:
        logits = apply_token_masks(logits.clone(), token_masks)

    if any(r.has_penalties for r in rows):
        logits = apply_penalties(logits.clone(), rows)
    if any(r.logits_processors for r in rows):
        logits = logits.clone()
        for i, row in enumerate(rows):
            for process in row.logits_processors:
                logits[i] = process(row.output_ids, logits[i])
    chosen = argmax_rows(logits)
    sampled_rows = [i for i, r in enumerate(rows) if not r.is_greedy]
    if sampled_rows:
        sub_rows = [rows[i] for i in sampled_rows]
        probs = filter_logits(logits[sampled_rows], sub_rows).softmax(dim=-1)
        chosen[sampled_rows] = torch.tensor([draw(probs[j], r.generator(probs.device))
                                             for j, r in enumerate(sub_rows)], dtype=chosen.dtype)

    token_ids = chosen.tolist()
    logprobs: list = [None] * len(rows)
    if raw_logprobs is not None:
        max_k = max(r.num_logprobs or 0 for r in rows)
        chosen_lp = raw_logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1).tolist()
        top_vals, top_ids = raw_logprobs.topk(max(max_k, 1), dim=-1)
        top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
        for i, row in enumerate(rows):
            if want_logprobs[i]:
                k = row.num_logprobs
                logprobs[i] = (chosen_lp[i], list(zip(top_ids[i][:k], top_vals[i][:k])))
    return SampleResult(token_ids, logprobs)


def score_tokens(logits: torch.Tensor, target_ids: list[int], num_top: list[int]) -> list[Logprobs]:
    """Log probability of a given next token per row, plus that row's `num_top[i]` best alternatives.

    logits: (N, vocab) fp32, row i predicting `target_ids[i]`. Scores prompt
    tokens, so no penalty, temperature or filter applies: the raw distribution.
    """
    logprobs = logits.log_softmax(dim=-1)
    targets = torch.tensor(target_ids, dtype=torch.long, device=logits.device)
    chosen = logprobs.gather(1, targets.unsqueeze(1)).squeeze(1).tolist()
    max_k = max(num_top, default=0)
    top_vals, top_ids = logprobs.topk(max_k, dim=-1) if max_k else (logprobs[:, :0], logprobs[:, :0].long())
    top_vals, top_ids = top_vals.tolist(), top_ids.tolist()
    return [(lp, list(zip(ids[:k], vals[:k]))) for lp, ids, vals, k in zip(chosen, top_ids, top_vals, num_top)]
