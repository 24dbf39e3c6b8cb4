"""Token masks on logits: the C loop against the tensor definition (every bit pattern kind, odd vocabularies)."""

from __future__ import annotations

import pytest
import torch

import selfhost.layers.sampler as sampler
from selfhost.layers.sampler import TokenMasks, apply_token_masks


@pytest.mark.skipif(sampler._token_mask_cpu is None, reason="the C extension is not compiled on this machine")
@pytest.mark.parametrize("vocab", [32000, 32003, 100, 31])
def test_c_loop_equals_the_tensor_path(vocab, monkeypatch):
    torch.manual_seed(vocab)
    words = -(-vocab // 32)
    logits = torch.randn(5, vocab)
    bitmasks = torch.randint(-(2**31), 2**31 - 1, (3, words), dtype=torch.int32)
    bitmasks[0, : words // 2] = 0  # all forbidden
    bitmasks[1, : words // 2] = -1  # all allowed
    masks = TokenMasks([4, 0, 2], bitmasks)
    fast = apply_token_masks(logits.clone(), masks)
    monkeypatch.setattr(sampler, "_token_mask_cpu", None)
    reference = apply_token_masks(logits.clone(), masks)
    assert torch.equal(fast, reference)
    assert torch.equal(fast[[1, 3]], logits[[1, 3]])  # unconstrained rows untouched
    bit = lambda row, token: (int(bitmasks[row, token // 32]) >> (token % 32)) & 1  # noqa: E731
    assert all((fast[4, t] == float("-inf")) == (bit(0, t) == 0) for t in range(0, vocab, 7))
