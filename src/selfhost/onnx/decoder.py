"""One exported decoder in an ONNX Runtime session: token ids + past keys/values -> logits + present.

The runner keeps no state of its own: a caller holds each sequence's KV cache
(the `present` tensors of its last call) and passes it back, so prefill, decode
and a perplexity window are the same call.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from selfhost.errors import UnsupportedModelError
from selfhost.onnx import layout
from selfhost.onnx.export_info import ExportInfo

KVCache = dict[str, np.ndarray]  # past input name -> (1, kv_heads, past, head_dim)


class OnnxDecoder:
    def __init__(self, folder: Path, num_threads: int | None = None):
        try:
            import onnxruntime as ort
        except ModuleNotFoundError as e:
            raise UnsupportedModelError(f"{folder} is an ONNX export; running it needs onnxruntime: "
                                        "pip install 'selfhost[onnx]'") from e

        self.info = ExportInfo.read(folder)
        self.max_len = self.info.max_len
        options = ort.SessionOptions()
        # ONNX Runtime's default is one thread per core, which is what a single stream wants.
        options.intra_op_num_threads = num_threads or 0
        self.session = ort.InferenceSession(str(folder / layout.MODEL_FILE), options, providers=["CPUExecutionProvider"])
        self._kv_dtype = np.float16 if self.info.dtype == "fp16" else np.float32
        self._present_names = [o.name for o in self.session.get_outputs()[1:]]  # after the logits
        self._past_names = [n.replace("present.", "past_key_values.") for n in self._present_names]

    def empty_cache(self) -> KVCache:
        shape = (1, self.info.num_kv_heads, 0, self.info.head_dim)
        return {name: np.zeros(shape, self._kv_dtype) for name in self._past_names}

    def forward(self, token_ids: list[int], past: KVCache) -> tuple[np.ndarray, KVCache]:
        """New tokens of one sequence after the `past` ones -> ((len(token_ids), vocab) fp32 logits, the new cache)."""
        past_len = next(iter(past.values())).shape[2]
        feeds = {
            layout.INPUT_IDS: np.asarray([token_ids], dtype=np.int64),
            layout.ATTENTION_MASK: np.ones((1, past_len + len(token_ids)), dtype=np.int64),
            **past,
        }
        logits, *present = self.session.run(None, feeds)
        return logits[0], dict(zip(self._past_names, present))

    def window_logits(self, token_ids: torch.Tensor, rows: slice) -> torch.Tensor:
        """(T,) ids scored from an empty cache -> (len(rows), vocab) fp32 logits (a perplexity window)."""
        logits, _ = self.forward(token_ids.tolist(), self.empty_cache())
        return torch.from_numpy(logits[rows])

