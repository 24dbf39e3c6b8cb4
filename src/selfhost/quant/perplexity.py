"""Sliding-window perplexity of a model over a token sequence.

Windows of `window` tokens advance by `stride` (< window); each window scores
only the tokens the previous windows did not, so every token after the first
is predicted exactly once, with at least `window - stride` tokens of context
(except near the start).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch

from selfhost.errors import InvalidParameterError
from selfhost.layers.attention import attend_one_sequence
from selfhost.models.decoder import CausalLM


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    mean_nll: float  # nats per token
    num_tokens: int  # tokens scored
    window: int
    stride: int


class _WindowKV:
    """A KVStore for one forward pass over a whole window: attend to its own keys only."""

    def attend(self, layer_idx, q, k, v, scale, sliding_window, softcap):
        # (T, H, D) -> (H, T, D) keys and values at positions 0..T-1
        return attend_one_sequence(q, k.transpose(0, 1), v.transpose(0, 1), 0, scale, sliding_window, softcap)


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a whole document (no warning about exceeding the model's context: windows handle that)."""
    return tokenizer.hf.encode(text, add_special_tokens=True, verbose=False)


def _native_window_logits(model: CausalLM, window_ids: torch.Tensor, rows: slice) -> torch.Tensor:
    """(T,) ids -> (len(rows), vocab) fp32 logits of those rows, attending within the window only."""
    hidden = model(window_ids, torch.arange(len(window_ids), device=window_ids.device), _WindowKV())  # (T, hidden)
    return model.compute_logits(hidden[rows])


@torch.inference_mode()
def perplexity(model: CausalLM, token_ids: list[int], window: int | None = None, stride: int | None = None) -> PerplexityResult:
    """exp(mean negative log-likelihood) of `token_ids[1:]` given what precedes each."""
    window = window or min(model.max_len, 512)
    stride = stride or window // 2
    # stride < window: a window's first token is context only, so windows must overlap by one.
    if not 1 <= stride < window <= model.max_len:
        raise InvalidParameterError(
            f"window {window} and stride {stride} must satisfy 1 <= stride < window <= {model.max_len} (the model's context)"
        )
    if len(token_ids) < 2:
        raise InvalidParameterError(f"text has {len(token_ids)} token(s); perplexity needs at least 2")
    # An ONNX export's runner (onnx/decoder.py) scores a window itself; a native model runs it here.
    window_logits = getattr(model, "window_logits", None) or partial(_native_window_logits, model)
    device = next(model.buffers()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")
    ids = torch.tensor(token_ids, dtype=torch.long, device=device)
    nll_sum, scored, prev_end = 0.0, 0, 1  # token 0 is never predicted
    for begin in range(0, len(token_ids), stride):
        end = min(begin + window, len(token_ids))
        first = max(prev_end, begin + 1)  # first target this window scores
        logits = window_logits(ids[begin:end], slice(first - 1 - begin, end - 1 - begin))  # (n, vocab): first..end-1
        nll = torch.nn.functional.cross_entropy(logits, ids[first:end], reduction="sum")
        nll_sum += nll.item()
        scored += end - first
        prev_end = end
        if end == len(token_ids):
            break
    mean = nll_sum / scored
    return PerplexityResult(math.exp(mean), mean, scored, window, stride)
