"""A small helper that accumulates ONNX nodes and initializers with unique names.

The decoder graph (decoder_graph.py) is written against this, so it reads as a
sequence of operations rather than protobuf plumbing.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

MS_DOMAIN = "com.microsoft"  # ONNX Runtime's contrib operators (GroupQueryAttention, MatMulNBits)
# Opset 23 has RMSNormalization as a standard op, so the graph passes onnx.checker without contrib norms.
ONNX_OPSET = 23
IR_VERSION = 10  # what onnxruntime 1.20+ reads

NUMPY_TO_ONNX = {
    np.dtype(np.float32): TensorProto.FLOAT,
    np.dtype(np.float16): TensorProto.FLOAT16,
    np.dtype(np.int64): TensorProto.INT64,
    np.dtype(np.int32): TensorProto.INT32,
    np.dtype(np.uint8): TensorProto.UINT8,
}


class GraphBuilder:
    def __init__(self, name: str):
        self.name = name
        self.nodes: list[onnx.NodeProto] = []
        self.initializers: list[onnx.TensorProto] = []
        self.inputs: list[onnx.ValueInfoProto] = []
        self.outputs: list[onnx.ValueInfoProto] = []
        self._counts: dict[str, int] = {}

    def unique(self, prefix: str) -> str:
        n = self._counts.get(prefix, 0)
        self._counts[prefix] = n + 1
        return prefix if n == 0 else f"{prefix}_{n}"

    def input(self, name: str, dtype: int, shape: list[int | str]) -> str:
        self.inputs.append(helper.make_tensor_value_info(name, dtype, shape))
        return name

    def output(self, name: str, dtype: int, shape: list[int | str]) -> None:
        self.outputs.append(helper.make_tensor_value_info(name, dtype, shape))

    def weight(self, name: str, array: np.ndarray) -> str:
        """A named initializer (kept as given: callers choose the dtype)."""
        # (np.ascontiguousarray would turn a 0-d scalar into shape (1,).)
        self.initializers.append(numpy_helper.from_array(np.asarray(array, order="C"), name))
        return name

    def constant(self, value, dtype: np.dtype) -> str:
        """A small initializer holding `value`; scalars are 0-d."""
        array = np.asarray(value, dtype=dtype)
        key = f"const/{array.dtype}{list(array.shape)}/{'_'.join(str(v) for v in array.reshape(-1).tolist())}"
        if key not in self._counts:
            self._counts[key] = 1
            self.weight(key, array)
        return key

    def op(self, op_type: str, inputs: list[str], num_outputs: int = 1, name: str | None = None,
           outputs: list[str] | None = None, domain: str = "", **attrs) -> str | list[str]:
        """Append one node; returns its output name (or names when num_outputs > 1)."""
        node_name = self.unique(name or op_type)
        outputs = outputs or [f"{node_name}/out{i}" for i in range(num_outputs)]
        self.nodes.append(helper.make_node(op_type, inputs, outputs, name=node_name, domain=domain or None, **attrs))
        return outputs[0] if len(outputs) == 1 else outputs

    def model(self) -> onnx.ModelProto:
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.initializers)
        return helper.make_model(
            graph,
            opset_imports=[helper.make_opsetid("", ONNX_OPSET), helper.make_opsetid(MS_DOMAIN, 1)],
            ir_version=IR_VERSION,
            producer_name="selfhost",
        )
