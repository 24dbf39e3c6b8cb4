"""A decode step's LM head into a buffer kept across steps, with a numpy view for the sampler (CPU).

After the decoder layers have streamed every weight through the caches, each Python-level call of a
step runs cold: allocating the (rows, vocab) logits, `Linear.forward`'s checks, `compute_logits`
and the sampler's `.numpy()` cost ~25 us of a ~450 us demo-model token, against ~2 us in a warm
loop. Where the head is selfhost's fp32 `Linear` on its AVX-512 product (`_gemm_cpu.gemm`) with no
bias, or a bf16 `Bf16Linear` in the "tiles" layout within its few-row kernel's rows
(`_bf16_tiles_cpu.linear_few_rows`: ~50 us of Python a demo-model step around it, in `forward`,
`compute_logits` and the sampler), and the model has no final soft-cap, this calls that product with
the arguments the module's `forward` passes it, into a buffer that lives as long as the runner: the
same logits, bit for bit. Any other head (quantized weights, "rows" bf16, a LoRA-wrapped head, a
soft-capped family) is `None` here and the runner calls `model.compute_logits`.

The buffer is rewritten by the next step: the logits are valid for one step only (the decode path
samples them and keeps nothing).
"""

from __future__ import annotations

import numpy as np
import torch

from selfhost.layers import linear
from selfhost.layers.bf16_linear import Bf16Linear, _bf16_tiles_cpu, tiles_available


class DecodeHead:
    """The model's LM head as the product its `forward` calls, into a reused (rows, vocab) buffer."""

    def __init__(self, head: linear.Linear | Bf16Linear):
        self.head = head
        self.weight = head.weight
        self.vocab, self.in_features = head.out_features, head.in_features
        self._buffer = np.zeros((0, self.vocab), dtype=np.float32)
        self._views: dict[int, tuple[torch.Tensor, np.ndarray]] = {}  # rows -> (tensor, array) of one memory
        w, n, k = self.weight.data_ptr(), self.vocab, self.in_features
        if type(head) is Bf16Linear:
            bias = 0 if head.bias is None else head.bias.data_ptr()
            product, argmax = _bf16_tiles_cpu.linear_few_rows, _bf16_tiles_cpu.linear_few_rows_argmax
            self.rows_limit = head.few_rows_max + 1  # from there Bf16Linear calls the many-row product
            self._product = lambda x, y, rows, threads: product(x, w, bias, y, rows, n, k, threads)
            self._argmax = lambda x, y, rows, threads: argmax(x, w, bias, y, rows, n, k, threads)
        else:
            product, argmax = linear._gemm_cpu.gemm, getattr(linear._gemm_cpu, "gemm_argmax", None)
            self.rows_limit = head.blas_from_rows  # from there Linear.forward calls torch's product
            self._product = lambda x, y, rows, threads: product(x, w, y, rows, n, k, threads)
            # None from an extension built before it had the entry (the caller then takes the logits path).
            self._argmax = None if argmax is None else lambda x, y, rows, threads: argmax(x, w, y, rows, n, k, threads)

    @classmethod
    def for_model(cls, model) -> DecodeHead | None:
        """The head where the model's logits are that one product, else None (then `compute_logits`)."""
        head, spec = getattr(model, "lm_head", None), getattr(model, "spec", None)
        if spec is None or spec.final_softcap is not None:
            return None
        if type(head) is Bf16Linear:
            usable = (head.layout == "tiles" and head.few_rows_max > 0 and head.weight.device.type == "cpu"
                      and tiles_available())
            return cls(head) if usable else None
        if not linear.USE_GEMM or type(head) is not linear.Linear or head.bias is not None:
            return None
        weight = head.weight
        if weight.dtype != torch.float32 or weight.device.type != "cpu" or not weight.is_contiguous():
            return None
        return cls(head)

    def __call__(self, hidden: torch.Tensor, num_threads: int,
                 choice_rows: int | None = None) -> tuple[torch.Tensor, np.ndarray] | None:
        """(rows, vocab) fp32 logits of (rows, hidden) hidden states, as a tensor and an array over the same
        memory; None where the head's weight is no longer the one this was built for, or under autograd
        (the caller then calls `compute_logits`). `hidden` must be fp32, 2-D and contiguous, as the one-call
        decode runner returns it (checking it here cost ~5 us a step, cold). `choice_rows`: the rows the
        kernel is chosen for, as the runner's (decode_layers.py)."""
        views = self._views_for(hidden.shape[0], choice_rows)
        if views is None:
            return None
        self._product(hidden.data_ptr(), views[0].data_ptr(), hidden.shape[0], num_threads)
        return views

    def greedy(self, hidden: torch.Tensor, num_threads: int,
               choice_rows: int | None = None) -> tuple[tuple[torch.Tensor, np.ndarray], list[int]] | None:
        """`__call__`, and each row's argmax (the first largest logit, or the first NaN, as numpy's) found in
        the same C call: read cold from Python after the layers, numpy's argmax and the array view cost
        ~25 us of a demo-model step."""
        views = self._views_for(hidden.shape[0], choice_rows)
        if views is None or self._argmax is None:
            return None
        return views, self._argmax(hidden.data_ptr(), views[0].data_ptr(), hidden.shape[0], num_threads)

    def _views_for(self, rows: int, choice_rows: int | None) -> tuple[torch.Tensor, np.ndarray] | None:
        """The buffer's first `rows` rows, or None where this head does not run (see `__call__`)."""
        if (self.head._parameters["weight"] is not self.weight or torch.is_grad_enabled()
                or (choice_rows or rows) >= self.rows_limit):
            return None
        views = self._views.get(rows)
        if views is None:
            if rows > self._buffer.shape[0]:
                self._buffer = np.zeros((max(rows, 2 * self._buffer.shape[0]), self.vocab), dtype=np.float32)
                self._views.clear()  # views of the old buffer
            array = self._buffer[:rows]
            views = self._views[rows] = (torch.from_numpy(array), array)
        return views
