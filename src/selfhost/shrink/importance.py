"""How much each layer, attention head and MLP channel matters, measured on calibration text.

- A layer's score is the mean angular distance between its input and its output
  hidden state, arccos(cos(x_in, x_out)) / pi per token (ShortGPT's "block
  influence"): a block that barely turns the residual stream can go, and an
  identity block scores exactly 0.
- A head's score is the energy it writes into the residual stream, sum over
  tokens of ||W_o[:, head] a_head||^2, where a_head is its attention output.
- An MLP channel's score is the same for one column of down_proj:
  sum over tokens of a_j^2 * ||W_down[:, j]||^2.
Heads and channels are scored by what reaches the residual stream, not by their
activations alone, so a large activation read by tiny weights counts for little.

The decoder calls its submodules through `.forward` (no hooks fire), so the
recorders are installed as instance attributes that shadow `forward` for one
calibration pass and are removed afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch
from rich.console import Console
from rich.progress import Progress
from torch import nn

from selfhost.errors import InvalidParameterError
from selfhost.models.decoder import CausalLM
from selfhost.train.attention import BatchCausalAttention

CALIBRATION_BATCH = 8  # windows per forward pass


@dataclass(frozen=True)
class Importance:
    layer_scores: torch.Tensor  # (L,) mean angular distance / pi; low: the block barely changes its input
    head_scores: torch.Tensor  # (L, H) energy each query head writes to the residual stream
    channel_scores: torch.Tensor  # (L, I) energy each MLP channel writes to the residual stream
    num_tokens: int

    def layers_least_important_first(self) -> list[int]:
        return sorted(range(len(self.layer_scores)), key=lambda i: (self.layer_scores[i].item(), i))


def calibration_windows(token_ids: list[int], window: int, max_windows: int) -> torch.Tensor:
    """(N, window) non-overlapping windows from the start of the calibration tokens."""
    if len(token_ids) < window:
        raise InvalidParameterError(
            f"the calibration text is {len(token_ids)} tokens, shorter than one window of {window}; "
            "give more text (--calibration) or a shorter --calibration-window"
        )
    count = min(max_windows, len(token_ids) // window)
    return torch.tensor(token_ids[: count * window], dtype=torch.long).view(count, window)


@contextmanager
def _shadow_forward(module: nn.Module, wrap: Callable[[Callable], Callable]) -> Iterator[None]:
    module.forward = wrap(type(module).forward.__get__(module))
    try:
        yield
    finally:
        del module.forward


def _angle(x_in: torch.Tensor, x_out: torch.Tensor) -> torch.Tensor:
    """Per-token angle between two (N, hidden) states, in units of pi."""
    cos = torch.nn.functional.cosine_similarity(x_in.float(), x_out.float(), dim=-1)
    return torch.arccos(cos.clamp(-1.0, 1.0)) / math.pi


@torch.no_grad()
def measure_importance(model: CausalLM, windows: torch.Tensor, console: Console | None = None,
                       show_progress: bool = True) -> Importance:
    """Scores of every layer, head and MLP channel of a full-precision `model` over (N, T) `windows`."""
    spec = model.spec
    L, H, D = spec.num_layers, spec.num_heads, spec.head_dim
    layer_sum = torch.zeros(L, dtype=torch.float64)
    head_sum = torch.zeros(L, H, dtype=torch.float64)
    channel_sum = torch.zeros(L, spec.intermediate_size, dtype=torch.float64)

    def layer_recorder(i: int):
        def wrap(forward):
            # A layer takes the stream with the layer before's MLP output still to add (`pending`) and hands
            # its own on the same way (DecoderLayer.forward): its input and output are those sums.
            def recorded(x, cos, sin, kv, num_threads=1, rows=None, pending=None):
                out, out_pending = forward(x, cos, sin, kv, num_threads, rows, pending)
                x_in = x if pending is None else x + pending
                x_out = out if out_pending is None else out + out_pending
                layer_sum[i] += _angle(x_in, x_out).sum().double()
                return out, out_pending
            return recorded
        return wrap

    def head_recorder(i: int, o_proj: nn.Linear):
        # ||W_h a||^2 = a^T (W_h^T W_h) a: one D x D Gram matrix per head instead of an (N, H, hidden) product.
        w = o_proj.weight.float().view(spec.hidden_size, H, D)  # (hidden, H, D)
        gram = torch.einsum("ohd,ohe->hde", w, w)  # (H, D, D)

        def wrap(forward):
            def recorded(a, *args, **kwargs):
                heads = a.float().view(-1, H, D)  # (N, H, D)
                head_sum[i] += torch.einsum("nhd,hde,nhe->h", heads, gram, heads).double()
                return forward(a, *args, **kwargs)
            return recorded
        return wrap

    def channel_recorder(i: int, down_proj: nn.Linear):
        column_energy = down_proj.weight.float().pow(2).sum(0)  # (I,)

        def wrap(forward):
            def recorded(a, *args, **kwargs):
                channel_sum[i] += (a.float().pow(2).sum(0) * column_energy).double()
                return forward(a, *args, **kwargs)
            return recorded
        return wrap

    recorders = []
    for i, layer in enumerate(model.model.layers):
        recorders += [(layer, layer_recorder(i)), (layer.self_attn.o_proj, head_recorder(i, layer.self_attn.o_proj)),
                      (layer.mlp.down_proj, channel_recorder(i, layer.mlp.down_proj))]
    device = next(model.parameters()).device
    with ExitStack() as stack, Progress(console=console or Console(stderr=True), transient=True,
                                        disable=not show_progress) as progress:
        for module, wrap in recorders:
            stack.enter_context(_shadow_forward(module, wrap))
        task = progress.add_task("calibration", total=len(windows))
        for batch in windows.split(CALIBRATION_BATCH):
            B, T = batch.shape
            positions = torch.arange(T, device=device).repeat(B)
            model(batch.reshape(-1).to(device), positions, BatchCausalAttention(B, T), torch.get_num_threads())
            progress.advance(task, B)
    num_tokens = windows.numel()
    return Importance((layer_sum / num_tokens).float(), (head_sum / num_tokens).float(),
                      (channel_sum / num_tokens).float(), num_tokens)
