"""Distillation's training windows: a fixed grid over the token stream, visited in a new order each epoch.

train/'s BatchSampler shifts its windows by a random offset every epoch. A cached
teacher has scored each window once, with that window's own context, so the
student must see the very same windows for the cached targets to be the ones the
teacher would give live: window i always covers tokens [i*T, i*T + T].
"""

from __future__ import annotations

import torch

from selfhost.train.data import BatchSampler


def grid_starts(num_tokens: int, context_len: int) -> torch.Tensor:
    """First token of every window of context_len inputs (+1 target) that fits in the stream."""
    return torch.arange(0, num_tokens - context_len, context_len)


class GridSampler(BatchSampler):
    """BatchSampler over grid windows: same batches, state and exact resume, no random offset."""

    def _epoch_starts(self, epoch: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        starts = grid_starts(self.num_tokens, self.context_len)
        return starts[torch.randperm(len(starts), generator=gen)]


def windows_at(tokens: torch.Tensor, starts: torch.Tensor, context_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, context_len) inputs and next-token targets of the windows starting at `starts`."""
    windows = tokens[starts.to(tokens.device)[:, None] + torch.arange(context_len + 1, device=tokens.device)]
    return windows[:, :-1], windows[:, 1:]
