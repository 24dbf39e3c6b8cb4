"""A decode step's LM head into a buffer kept across steps, with a numpy view for the sampler (CPU).

After the decoder layers have streamed every weight through the caches, each Python-level call of a
step runs cold: allocating the (rows, vocab) logits, `Linear.forward`'s checks, `compute_logits`
and the sampler's `.numpy()` cost ~25 us of a ~450 us demo-model token, against ~2 us in a warm
loop. Where the head is selfhost's fp32 `Linear` on its AVX-512 product (`_gemm_cpu.gemm`) with no
bias and the model has no final soft-cap, this calls that product with the arguments
`Linear.forward` passes it, into a buffer that lives as long as the runner: the same logits, bit for
bit. Any other head (bf16 or quantized weights, a LoRA-wrapped head, a soft-capped family) is
`None` here and the runner calls `model.compute_logits`.

The buffer is rewritten by the next step: the logits are valid for one step only (the decode path
samples them and keeps nothing).
"""

from __future__ import annotations

import numpy as np
import torch

from selfhost.layers import linear


class DecodeHead:
    """The model's LM head as the product `Linear.forward` calls, into a reused (rows, vocab) buffer."""

    def __init__(self, head: linear.Linear):
        self.head = head
        self.weight = head.weight
        self.vocab, self.in_features = head.out_features, head.in_features
        self._buffer = np.zeros((0, self.vocab), dtype=np.float32)
        self._views: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # rows -> (tensor, array) of one memory
        # None from an extension built before it had the entry (the caller then takes the logits path).
        self._gemm_argmax = getattr(linear._gemm_cpu, "gemm_argmax", None)

    @classmethod
    def for_model(cls, model) -> DecodeHead | None:
        """The head where the model's logits are that one product, else None (then `compute_logits`)."""
        head, spec = getattr(model, "lm_head", None), getattr(model, "spec", None)
        if (not linear.USE_GEMM or type(head) is not linear.Linear or head.bias is not None or spec is None
                or spec.final_softcap is not None):
            return None
        weight = head.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous():
            return None
        return cls(head)

    def __call__(self, hidden: torch.Tensor, num_threads: int) -> tuple[torch.Tensor, np.ndarray] | None:
        """(rows, vocab) fp32 logits of (rows, hidden) hidden states, as a tensor and an array over the same
        memory; None where the head's weight is no longer the one this was built for, or under autograd
        (the caller then calls `compute_logits`). `hidden` must be fp32, 2-D and contiguous, as the one-call
        decode runner returns it (checking it here cost ~5 us a step, cold)."""
        views = self._views_for(hidden.shape[0])
        if views is None:
            return None
        linear._gemm_cpu.gemm(hidden.data_ptr(), self.weight.data_ptr(), views[0].data_ptr(), hidden.shape[0],
                              self.vocab, self.in_features, num_threads)
        return views

    def greedy(self, hidden: torch.Tensor, num_threads: int) -> tuple[tuple[torch.Tensor, np.ndarray], list[int]] | None:
        """`__call__`, and each row's argmax (the first largest logit, or the first NaN, as numpy's) found in
        the same C call: read cold from Python after the layers, numpy's argmax and the array view cost
        ~25 us of a demo-model step."""
        views = self._views_for(hidden.shape[0])
        if views is None or self._gemm_argmax is None:
            return None
        tokens = self._gemm_argmax(hidden.data_ptr(), self.weight.data_ptr(), views[0].data_ptr(),
                                              hidden.shape[0], self.vocab, self.in_features, num_threads)
        return views, tokens

    def _views_for(self, rows: int) -> tuple[torch.Tensor, np.ndarray] | None:
        """The buffer's first `rows` rows, or None where this head does not run (see `__call__`)."""
        if (self.head._parameters["weight"] is not self.weight or torch.is_grad_enabled()
                or rows >= self.head.blas_from_rows):  # from there Linear.forward calls torch's product
            return None
        views = self._views.get(rows)
        if views is None:
            if rows > self._buffer.shape[0]:
                self._buffer = np.zeros((max(rows, 2 * self._buffer.shape[0]), self.vocab), dtype=np.float32)
                self._views.clear()  # views of the old buffer
            array = self._buffer[:rows]
            views = self._views[rows] = (torch.from_numpy(array), array)
        return views
