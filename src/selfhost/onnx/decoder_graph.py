"""selfhost's decoder (models/decoder.py) written as one ONNX graph with past/present keys and values.

The graph is built directly from the loaded model's tensors and ModelSpec, one
node per operation, around ONNX Runtime's fused contrib operators:
`GroupQueryAttention` (rotary from precomputed cos/sin tables, the causal and
sliding-window masks, grouped KV heads, soft-capping and the KV concatenation in
one kernel) and, for quantized exports, `MatMulNBits`. Norms are the standard
`RMSNormalization` (opset 23). Every family's variation is read from the spec
(biases, q/k norms, Gemma's (1 + w) norms and embedding scale, sandwich norms,
soft-caps, per-layer windows and rotary tables), so no family is special-cased.

Shapes: B batch, S new tokens, P past tokens, H hidden, Hq/Hkv heads, D head_dim.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto

from selfhost.layers.linear import Linear
from selfhost.layers.rotary import rope_angles
from selfhost.errors import InvalidParameterError
from selfhost.models.decoder import CausalLM, DecoderLayer
from selfhost.models.spec import ModelSpec
from selfhost.onnx import layout
from selfhost.onnx.block_quant import ACCURACY_LEVEL, quantize_blocks
from selfhost.onnx.graph_builder import MS_DOMAIN, NUMPY_TO_ONNX, GraphBuilder
from selfhost.onnx.plain_attention import PlainAttention

_INT64 = np.dtype(np.int64)


def _array(t: torch.Tensor) -> np.ndarray:
    return t.detach().to(torch.float32).cpu().numpy()


def fused_attention_fits(spec: ModelSpec) -> bool:
    """Whether ONNX Runtime's CPU GroupQueryAttention accepts these shapes: head_dim a multiple
    of 16, and cos/sin tables (rotary_dim / 2 wide) a multiple of 8."""
    return spec.head_dim % 16 == 0 and all((rope.rotary_dim // 2) % 8 == 0 for rope in spec.ropes)


def pick_attention(requested: str, spec: ModelSpec) -> str:
    """With "auto", the fused kernel wherever it fits, else plain; "fused" where it cannot fit is refused."""
    fits = fused_attention_fits(spec)
    if requested == "fused" and not fits:
        raise InvalidParameterError(
            f"GroupQueryAttention needs head_dim a multiple of 16 and rotary_dim a multiple of 16 (this model: "
            f"head_dim {spec.head_dim}, rotary_dim {sorted({r.rotary_dim for r in spec.ropes})}); use attention='auto'")
    if requested == "auto":
        return "fused" if fits else "plain"
    return requested


class DecoderGraph:
    """Builds the graph for one model.

    weight_bits: None keeps weights in `io_dtype`; 4 or 8 stores them as MatMulNBits blocks.
    attention: "fused" (GroupQueryAttention) or "plain" (standard ops, plain_attention.py).
    """

    def __init__(self, model: CausalLM, io_dtype: np.dtype, weight_bits: int | None, attention: str):
        self.model, self.spec = model, model.spec
        self.io_dtype = np.dtype(io_dtype)
        self.onnx_dtype = NUMPY_TO_ONNX[self.io_dtype]
        self.weight_bits = weight_bits
        self.attention_kind = attention
        self.g = GraphBuilder("selfhost_decoder")
        self.plain: PlainAttention | None = None

    # --- building blocks -------------------------------------------------------------

    def _fp(self, array: np.ndarray) -> np.ndarray:
        return array.astype(self.io_dtype)

    def linear(self, x: str, module: Linear, name: str, weight: np.ndarray | None = None) -> str:
        """x @ W^T (+ b). W in full precision is stored transposed (K, N), as MatMul wants it."""
        g = self.g
        w = _array(module.weight) if weight is None else weight  # (N, K)
        if self.weight_bits is None:
            y = g.op("MatMul", [x, g.weight(f"{name}.weight_t", self._fp(w.T))], name=f"{name}/MatMul")
        else:
            q = quantize_blocks(w, self.weight_bits, self.io_dtype)
            y = g.op(
                "MatMulNBits",
                [x, g.weight(f"{name}.qweight", q.packed), g.weight(f"{name}.scales", q.scales),
                 g.weight(f"{name}.qzeros", q.zero_points)],
                name=f"{name}/MatMulNBits", domain=MS_DOMAIN, K=q.in_features, N=q.out_features, bits=q.bits,
                block_size=q.block_size, accuracy_level=ACCURACY_LEVEL,
            )
        if module.bias is not None:
            y = g.op("Add", [y, g.weight(f"{name}.bias", self._fp(_array(module.bias)))], name=f"{name}/Add")
        return y

    def rms_norm(self, x: str, norm, name: str) -> str:
        # Gemma's (1 + w) convention is folded into the stored weight.
        weight = _array(norm.weight) + norm.weight_offset
        return self.g.op("RMSNormalization", [x, self.g.weight(f"{name}.weight", self._fp(weight))],
                         name=name, axis=-1, epsilon=float(norm.eps))

    def head_norm(self, x: str, norm, num_heads: int, name: str) -> str:
        """RMSNorm over each head of x (B, S, heads*D) (Qwen3 / Gemma 3 q/k norms)."""
        g, d = self.g, self.spec.head_dim
        heads = g.op("Reshape", [x, g.constant([0, 0, num_heads, d], _INT64)], name=f"{name}/Reshape")  # (B, S, heads, D)
        normed = self.rms_norm(heads, norm, name)
        return g.op("Reshape", [normed, g.constant([0, 0, num_heads * d], _INT64)], name=f"{name}/Flatten")

    def activation(self, gate: str, name: str) -> str:
        act = self.spec.activation
        if act == "silu":
            return self.g.op("Mul", [gate, self.g.op("Sigmoid", [gate], name=f"{name}/Sigmoid")], name=f"{name}/Silu")
        approximate = "tanh" if act == "gelu_tanh" else "none"
        return self.g.op("Gelu", [gate], name=f"{name}/Gelu", approximate=approximate)

    def rotary_tables(self) -> list[tuple[str, str]]:
        """One (cos, sin) pair per rotary spec: (max_len, rotary_dim/2), scaled by the attention factor."""
        tables = []
        for i, rope in enumerate(self.spec.ropes):
            angles = rope_angles(rope, self.model.max_len).numpy()
            cos, sin = np.cos(angles) * rope.attention_factor, np.sin(angles) * rope.attention_factor
            tables.append((self.g.weight(f"rotary{i}.cos", self._fp(cos)), self.g.weight(f"rotary{i}.sin", self._fp(sin))))
        return tables

    # --- the model -------------------------------------------------------------------

    def attention(self, x: str, layer: DecoderLayer, i: int, rope: tuple[str, str], seqlens_k: str, total: str) -> str:
        g, spec, attn = self.g, self.spec, layer.self_attn
        prefix = f"model.layers.{i}.self_attn"
        qkv = self.linear(x, attn.qkv_proj, f"{prefix}.qkv_proj")  # (B, S, (Hq + 2*Hkv) * D)
        if attn.q_norm is None and self.plain is None:
            query, key, value = qkv, "", ""  # packed: GroupQueryAttention splits it itself
        else:
            sizes = g.constant([attn.q_size, attn.kv_size, attn.kv_size], _INT64)
            query, key, value = g.op("Split", [qkv, sizes], num_outputs=3, name=f"{prefix}/Split", axis=-1)
        if attn.q_norm is not None:
            query = self.head_norm(query, attn.q_norm, spec.num_heads, f"{prefix}.q_norm")
            key = self.head_norm(key, attn.k_norm, spec.num_kv_heads, f"{prefix}.k_norm")
        window = attn.sliding_window
        if self.plain is not None:
            out = self.plain(query, key, value, layout.PAST_KEY % i, layout.PAST_VALUE % i, layout.PRESENT_KEY % i,
                             layout.PRESENT_VALUE % i, rope, spec.ropes[spec.layer_rope[i]].rotary_dim, spec.num_heads,
                             spec.num_kv_heads, spec.head_dim, float(attn.scale), window, attn.softcap, prefix)
            return self.linear(out, attn.o_proj, f"{prefix}.o_proj")
        out, _, _ = g.op(
            "GroupQueryAttention",
            [query, key, value, layout.PAST_KEY % i, layout.PAST_VALUE % i, seqlens_k, total, rope[0], rope[1]],
            outputs=[f"{prefix}/attn_out", layout.PRESENT_KEY % i, layout.PRESENT_VALUE % i],
            name=f"{prefix}/GroupQueryAttention", domain=MS_DOMAIN,
            num_heads=spec.num_heads, kv_num_heads=spec.num_kv_heads, scale=float(attn.scale),
            do_rotary=1, rotary_interleaved=0,
            # GroupQueryAttention's window counts like selfhost's (key kept while q - k < window).
            local_window_size=window if window is not None else -1,
            softcap=float(attn.softcap or 0.0),
        )  # (B, S, Hq * D)
        return self.linear(out, attn.o_proj, f"{prefix}.o_proj")

    def mlp(self, x: str, layer: DecoderLayer, i: int) -> str:
        g, prefix = self.g, f"model.layers.{i}.mlp"
        gate_up = self.linear(x, layer.mlp.gate_up_proj, f"{prefix}.gate_up_proj")  # (B, S, 2 * I)
        inter = self.spec.intermediate_size
        gate, up = g.op("Split", [gate_up, g.constant([inter, inter], _INT64)], num_outputs=2,
                        name=f"{prefix}/Split", axis=-1)
        hidden = g.op("Mul", [self.activation(gate, prefix), up], name=f"{prefix}/Mul")
        return self.linear(hidden, layer.mlp.down_proj, f"{prefix}.down_proj")

    def build(self) -> onnx.ModelProto:
        g, spec, model = self.g, self.spec, self.model
        batch, new, total_len = "batch_size", "sequence_length", "total_sequence_length"
        ids = g.input(layout.INPUT_IDS, TensorProto.INT64, [batch, new])
        mask = g.input(layout.ATTENTION_MASK, TensorProto.INT64, [batch, total_len])
        for i in range(spec.num_layers):
            for name in (layout.PAST_KEY % i, layout.PAST_VALUE % i):
                g.input(name, self.onnx_dtype, [batch, spec.num_kv_heads, "past_sequence_length", spec.head_dim])
        # GroupQueryAttention reads, per row, the index of its last real key and the padded total length.
        keys_per_row = g.op("ReduceSum", [mask, g.constant([1], _INT64)], name="mask/ReduceSum", keepdims=0)
        last_key = g.op("Sub", [keys_per_row, g.constant(1, _INT64)], name="mask/Sub")
        seqlens_k = g.op("Cast", [last_key], name="mask/seqlens_k", to=TensorProto.INT32)  # (B,)
        mask_len = g.op("Gather", [g.op("Shape", [mask], name="mask/Shape"), g.constant(1, _INT64)],
                        name="mask/Gather", axis=0)
        total = g.op("Cast", [mask_len], name="mask/total_seq_len", to=TensorProto.INT32)  # scalar

        embed = g.weight("model.embed_tokens.weight", self._fp(_array(model.model.embed_tokens.weight)))
        x = g.op("Gather", [embed, ids], name="embed/Gather")  # (B, S, H)
        if spec.embed_scale is not None:
            x = g.op("Mul", [x, g.constant(spec.embed_scale, self.io_dtype)], name="embed/scale")
        if self.attention_kind == "plain":
            self.plain = PlainAttention(g, self.io_dtype, ids, mask)
            tables = [self.plain.rotary_tables(i, rope, model.max_len) for i, rope in enumerate(spec.ropes)]
        else:
            tables = self.rotary_tables()
        for i, (layer, rope_idx) in enumerate(zip(model.model.layers, spec.layer_rope)):
            prefix = f"model.layers.{i}"
            attn_out = self.attention(self.rms_norm(x, layer.input_layernorm, f"{prefix}.input_layernorm"),
                                      layer, i, tables[rope_idx], seqlens_k, total)
            if spec.sandwich_norms:
                x = g.op("Add", [x, self.rms_norm(attn_out, layer.post_attention_layernorm,
                                                  f"{prefix}.post_attention_layernorm")], name=f"{prefix}/attn_residual")
                mlp_out = self.mlp(self.rms_norm(x, layer.pre_feedforward_layernorm,
                                                 f"{prefix}.pre_feedforward_layernorm"), layer, i)
                mlp_out = self.rms_norm(mlp_out, layer.post_feedforward_layernorm, f"{prefix}.post_feedforward_layernorm")
            else:
                x = g.op("Add", [x, attn_out], name=f"{prefix}/attn_residual")
                mlp_out = self.mlp(self.rms_norm(x, layer.post_attention_layernorm,
                                                 f"{prefix}.post_attention_layernorm"), layer, i)
            x = g.op("Add", [x, mlp_out], name=f"{prefix}/mlp_residual")  # (B, S, H)
        x = self.rms_norm(x, model.model.norm, "model.norm")
        logits = self.lm_head(x)
        if spec.final_softcap is not None:
            cap = g.constant(spec.final_softcap, self.io_dtype)
            logits = g.op("Mul", [g.op("Tanh", [g.op("Div", [logits, cap], name="softcap/Div")], name="softcap/Tanh"),
                                  cap], name="softcap/Mul")
        # Logits leave the graph in fp32 whatever the activations: the samplers on both sides want fp32.
        g.op("Cast", [logits], outputs=[layout.LOGITS], name="logits/Cast", to=TensorProto.FLOAT)
        g.output(layout.LOGITS, TensorProto.FLOAT, [batch, new, spec.vocab_size])
        for i in range(spec.num_layers):
            for name in (layout.PRESENT_KEY % i, layout.PRESENT_VALUE % i):
                g.output(name, self.onnx_dtype, [batch, spec.num_kv_heads, total_len, spec.head_dim])
        return g.model()

    def lm_head(self, x: str) -> str:
        g, model = self.g, self.model
        if self.spec.tie_embeddings and self.weight_bits is None:
            # Share the embedding table: ONNX Runtime folds the transpose once when the session loads,
            # so the file holds the table once.
            table_t = g.op("Transpose", ["model.embed_tokens.weight"], name="lm_head/Transpose", perm=[1, 0])
            return g.op("MatMul", [x, table_t], name="lm_head/MatMul")  # (B, S, vocab)
        return self.linear(x, model.lm_head, "lm_head")


def build_decoder_graph(model: CausalLM, io_dtype: np.dtype, weight_bits: int | None,
                        attention: str = "auto") -> onnx.ModelProto:
    return DecoderGraph(model, io_dtype, weight_bits, pick_attention(attention, model.spec)).build()
