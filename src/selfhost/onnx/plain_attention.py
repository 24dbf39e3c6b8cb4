"""Attention from standard ONNX operators, for shapes GroupQueryAttention refuses.

ONNX Runtime's CPU GroupQueryAttention needs head_dim to be a multiple of 16;
real checkpoints are, some tiny test models are not. This path spells the same
computation out (rotary by table lookup, past + new keys by Concat, grouped
heads by reshaping the queries, causal / windowed / padding mask, soft-cap,
softmax), and it is also what the benchmark compares the fused kernel against.

Shapes: B batch, S new tokens, T = past + S keys, Hq/Hkv heads, G = Hq/Hkv, D head_dim.
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto

from selfhost.layers.rotary import RopeSpec, rope_angles
from selfhost.onnx.graph_builder import GraphBuilder

_INT64 = np.dtype(np.int64)
_INT64_MAX = np.iinfo(np.int64).max


class PlainAttention:
    """Per-graph state shared by every layer: positions and one mask per distinct window."""

    def __init__(self, g: GraphBuilder, io_dtype: np.dtype, input_ids: str, attention_mask: str):
        self.g, self.io_dtype = g, io_dtype
        self.mask = attention_mask
        new = g.op("Gather", [g.op("Shape", [input_ids], name="plain/ids_shape"), g.constant(1, _INT64)],
                   name="plain/num_new", axis=0)
        self.num_new = g.op("Unsqueeze", [new, g.constant([0], _INT64)], name="plain/num_new_1d")  # (1,) = [S]
        neg_new = g.op("Neg", [self.num_new], name="plain/neg_num_new")
        # A token's position counts the real tokens before it (left padding keeps position 0 for the first).
        cumulative = g.op("CumSum", [attention_mask, g.constant(1, _INT64)], name="plain/cumsum")  # (B, T)
        positions_all = g.op("Sub", [cumulative, g.constant(1, _INT64)], name="plain/positions_all")
        self.positions = g.op("Slice", [positions_all, neg_new, g.constant([_INT64_MAX], _INT64), g.constant([1], _INT64)],
                              name="plain/positions")  # (B, S)
        self._masks: dict[int | None, str] = {}

    def rotary_tables(self, index: int, rope: RopeSpec, max_len: int) -> tuple[str, str]:
        """cos and rotate-half-signed sin rows for this step's positions: (B, 1, S, rotary_dim)."""
        g = self.g
        angles = rope_angles(rope, max_len).numpy()
        cos, sin = np.cos(angles) * rope.attention_factor, np.sin(angles) * rope.attention_factor
        cos_full = np.concatenate([cos, cos], axis=-1).astype(self.io_dtype)
        signed_sin = np.concatenate([-sin, sin], axis=-1).astype(self.io_dtype)
        rows = []
        for name, table in (("cos", cos_full), ("signed_sin", signed_sin)):
            picked = g.op("Gather", [g.weight(f"rotary{index}.{name}_full", table), self.positions],
                          name=f"rotary{index}/{name}", axis=0)  # (B, S, rotary_dim)
            rows.append(g.op("Unsqueeze", [picked, g.constant([1], _INT64)], name=f"rotary{index}/{name}_heads"))
        return rows[0], rows[1]

    def keep_mask(self, window: int | None, group: int) -> str:
        """Boolean (B, 1, G*S, T): key t is visible to new token s (the S rows repeated for each query of a group)."""
        if (window, group) in self._masks:
            return self._masks[window, group]
        g = self.g
        total = g.op("Gather", [g.op("Shape", [self.mask], name="plain/mask_shape"), g.constant(1, _INT64)],
                     name="plain/total", axis=0)
        key_pos = g.op("Range", [g.constant(0, _INT64), total, g.constant(1, _INT64)], name="plain/key_pos")  # (T,)
        past = g.op("Sub", [total, g.op("Squeeze", [self.num_new], name="plain/num_new_0d")], name="plain/past")
        query_pos = g.op("Range", [past, total, g.constant(1, _INT64)], name="plain/query_pos")  # (S,)
        query_col = g.op("Unsqueeze", [query_pos, g.constant([1], _INT64)], name="plain/query_col")  # (S, 1)
        distance = g.op("Sub", [query_col, key_pos], name="plain/distance")  # (S, T): q - k
        keep = g.op("GreaterOrEqual", [distance, g.constant(0, _INT64)], name="plain/causal")
        if window is not None:
            inside = g.op("Less", [distance, g.constant(window, _INT64)], name="plain/window")
            keep = g.op("And", [keep, inside], name="plain/keep")
        if group > 1:
            keep = g.op("Tile", [keep, g.constant([group, 1], _INT64)], name="plain/keep_grouped")  # (G*S, T)
        real_keys = g.op("Cast", [g.op("Unsqueeze", [self.mask, g.constant([1, 2], _INT64)], name="plain/mask_4d")],
                         name="plain/real_keys", to=TensorProto.BOOL)  # (B, 1, 1, T) bool
        self._masks[window, group] = g.op("And", [keep, real_keys], name="plain/keep_mask")
        return self._masks[window, group]

    def rotate(self, x: str, cos: str, signed_sin: str, rotary_dim: int, head_dim: int, name: str) -> str:
        """x (B, heads, S, D): rotate-half rotary on the first rotary_dim dims."""
        g, half = self.g, rotary_dim // 2
        rot, rest = x, None
        if rotary_dim < head_dim:
            rot, rest = g.op("Split", [x, g.constant([rotary_dim, head_dim - rotary_dim], _INT64)], num_outputs=2,
                             name=f"{name}/split_rotary", axis=-1)
        first, second = g.op("Split", [rot, g.constant([half, half], _INT64)], num_outputs=2, name=f"{name}/halves",
                             axis=-1)
        rolled = g.op("Concat", [second, first], name=f"{name}/roll", axis=-1)
        out = g.op("Add", [g.op("Mul", [rot, cos], name=f"{name}/cos"), g.op("Mul", [rolled, signed_sin],
                                                                             name=f"{name}/sin")], name=f"{name}/rotary")
        return out if rest is None else g.op("Concat", [out, rest], name=f"{name}/join", axis=-1)

    def __call__(self, q: str, k: str, v: str, past_key: str, past_value: str, present_key: str, present_value: str,
                 rope: tuple[str, str], rotary_dim: int, num_heads: int, num_kv_heads: int, head_dim: int,
                 scale: float, window: int | None, softcap: float | None, name: str) -> str:
        """q (B, S, Hq*D), k and v (B, S, Hkv*D) -> (B, S, Hq*D); writes the present key/value outputs."""
        g, group = self.g, num_heads // num_kv_heads

        def heads(x: str, n: str, count: int) -> str:
            split = g.op("Reshape", [x, g.constant([0, 0, count, head_dim], _INT64)], name=f"{name}/{n}_heads")
            return g.op("Transpose", [split], name=f"{name}/{n}_bnsd", perm=[0, 2, 1, 3])  # (B, count, S, D)

        q = self.rotate(heads(q, "q", num_heads), *rope, rotary_dim, head_dim, f"{name}/q")
        k = self.rotate(heads(k, "k", num_kv_heads), *rope, rotary_dim, head_dim, f"{name}/k")
        keys = g.op("Concat", [past_key, k], outputs=[present_key], name=f"{name}/present_key", axis=2)  # (B, Hkv, T, D)
        values = g.op("Concat", [past_value, heads(v, "v", num_kv_heads)], outputs=[present_value],
                      name=f"{name}/present_value", axis=2)
        # Queries of one KV head's group side by side: (B, Hkv, G*S, D), so one MatMul covers the group.
        grouped = g.op("Reshape", [q, g.constant([0, num_kv_heads, -1, head_dim], _INT64)], name=f"{name}/q_grouped")
        key_t = g.op("Transpose", [keys], name=f"{name}/key_t", perm=[0, 1, 3, 2])
        scores = g.op("MatMul", [grouped, key_t], name=f"{name}/scores")  # (B, Hkv, G*S, T)
        scores = g.op("Mul", [scores, g.constant(scale, self.io_dtype)], name=f"{name}/scale")
        if softcap is not None:
            cap = g.constant(softcap, self.io_dtype)
            scores = g.op("Mul", [g.op("Tanh", [g.op("Div", [scores, cap], name=f"{name}/cap_div")],
                                       name=f"{name}/cap_tanh"), cap], name=f"{name}/softcap")
        # The lowest finite value, not -inf: a padding query that sees no key then gets a finite uniform
        # row instead of NaNs, which would reach real rows through its keys (0 * NaN) in later layers.
        lowest = g.constant(np.finfo(self.io_dtype).min, self.io_dtype)
        masked = g.op("Where", [self.keep_mask(window, group), scores, lowest], name=f"{name}/mask")
        probs = g.op("Softmax", [masked], name=f"{name}/softmax", axis=-1)
        out = g.op("MatMul", [probs, values], name=f"{name}/weighted")  # (B, Hkv, G*S, D)
        out = g.op("Reshape", [out, g.constant([0, num_heads, -1, head_dim], _INT64)], name=f"{name}/out_heads")
        out = g.op("Transpose", [out], name=f"{name}/out_bsnd", perm=[0, 2, 1, 3])  # (B, S, Hq, D)
        return g.op("Reshape", [out, g.constant([0, 0, num_heads * head_dim], _INT64)], name=f"{name}/out")
