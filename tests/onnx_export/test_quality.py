"""Quantized ONNX exports of the demo model: perplexity within +5% (int4) / +1% (int8) of the fp32 export.

Also that the MatMulNBits blocks selfhost writes mean to ONNX Runtime exactly what
selfhost meant (a one-node graph against the dequantized weights).
"""

import numpy as np
import onnxruntime as ort
import pytest
from onnx import TensorProto

from selfhost import LLM
from selfhost.hub import EMBEDDED_MODEL_DIR
from selfhost.onnx.block_quant import dequantize_blocks, quantize_blocks
from selfhost.onnx.graph_builder import GraphBuilder, MS_DOMAIN
from selfhost.quant.perplexity import perplexity
from tests.quant.test_demo_model import PASSAGE


@pytest.fixture(scope="module")
def fp32_perplexity(onnx_export):
    llm = LLM(str(onnx_export(EMBEDDED_MODEL_DIR)))
    ids = llm.tokenizer.encode(PASSAGE)
    native = LLM(device="cpu", weight_dtype=None, max_num_seqs=1)
    # The fp32 export scores the passage as selfhost does.
    assert perplexity(llm.model, ids, 256).perplexity == pytest.approx(perplexity(native.model, ids, 256).perplexity,
                                                                       rel=1e-5)
    return ids, perplexity(llm.model, ids, 256).perplexity


@pytest.mark.parametrize("dtype,quant,bound", [("fp32", "int4", 0.05), ("fp32", "int8", 0.01), ("fp16", "int4", 0.05)])
def test_quantized_export_perplexity(onnx_export, fp32_perplexity, dtype, quant, bound):
    ids, base = fp32_perplexity
    llm = LLM(str(onnx_export(EMBEDDED_MODEL_DIR, dtype=dtype, quant=quant)))
    assert (llm.model.info.dtype, llm.model.info.quant) == (dtype, quant)
    ppl = perplexity(llm.model, ids, 256).perplexity
    assert base < ppl <= base * (1 + bound)  # rounding costs something, never more than the bound


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("in_features", [64, 80])  # 80: a last block padded with zeros
def test_matmulnbits_reads_the_blocks_as_written(bits, in_features):
    rng = np.random.default_rng(bits)
    weight = rng.standard_normal((24, in_features)).astype(np.float32)
    x = rng.standard_normal((3, in_features)).astype(np.float32)
    q = quantize_blocks(weight, bits, np.dtype(np.float32))
    g = GraphBuilder("one_matmul")
    g.input("x", TensorProto.FLOAT, [3, in_features])
    g.op("MatMulNBits", ["x", g.weight("w", q.packed), g.weight("s", q.scales), g.weight("z", q.zero_points)],
         outputs=["y"], domain=MS_DOMAIN, K=in_features, N=24, bits=bits, block_size=q.block_size, accuracy_level=0)
    g.output("y", TensorProto.FLOAT, [3, 24])
    session = ort.InferenceSession(g.model().SerializeToString(), providers=["CPUExecutionProvider"])
    [y] = session.run(None, {"x": x})
    dequantized = dequantize_blocks(q)
    np.testing.assert_allclose(y, x @ dequantized.T, atol=1e-4, rtol=1e-4)
    # and the rounding is as fine as the bits allow: half a step per block at most
    step = np.abs(weight).max() * 2 / (2**bits - 1)
    assert np.abs(dequantized - weight).max() <= step / 2 + 1e-6
