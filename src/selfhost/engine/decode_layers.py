"""A decode step's decoder layers in one C call (`_decode_layers_cpu.c`) where the model allows.

A decoded token of a 30-layer model makes ~300 kernel calls through Python; on a small CPU
that cost ~3-4 ms of a ~16 ms token while the other cores waited. The runner calls the same
kernels on the same buffers in the same order, so its hidden states equal the Python path's
bit for bit; it only skips the trips back to Python between them.

`DecodeLayers.for_model` decides once per model and cache whether the layers qualify: pre-norm
attention (q/k-normed heads included, as Qwen3's) with SwiGLU MLPs, or softmax-routed experts
without a shared one (Mixtral, Qwen3-MoE), whose attention and dense products are all of one
kind the runner calls the same kernel for (bf16 "tiles" or "rows" weights within their few-row
kernel's range, fp32 weights on the AVX-512 product, or int8 weights on their "avx2" kernel's
products), with the paged cache's C kernels, an fp32 or int8 embedding and one full-width rotary
table. The model then offers each step to it (`CausalLM.forward`): it takes decode-only steps
(embedding, every layer and the final norm in one call) and returns None for anything else (prompt
chunks, larger batches than a "rows" switch).

A draft model's greedy passes for speculative decoding run here too (`greedy_passes`): every pass's
layers, its head and argmax, the argmax fed to the next pass, in one call.
"""

from __future__ import annotations

import os
import struct
import sys

import torch
from torch import nn

from selfhost.engine.paged_cache import PagedKVCache
from selfhost.layers import activation, linear, moe
from selfhost.layers.attention import Attention
from selfhost.layers.bf16_linear import Bf16Linear
from selfhost.layers.mlp import GatedMLP
from selfhost.layers.moe import SparseMoE
from selfhost.layers.norm import RMSNorm
from selfhost.quant.int8 import Int8Embedding, Int8Linear

try:
    from selfhost.engine import _decode_layers_cpu
except ImportError:  # not compiled
    _decode_layers_cpu = None


# SELFHOST_DECODE_LAYERS=python keeps every step on the Python path (to compare).
_PYTHON_ONLY = os.environ.get("SELFHOST_DECODE_LAYERS", "c") == "python"


# The runner's product kinds (its C enum) -> how many rows a step may have for the kernel the
# layer's module would call to be the one the runner calls.
PRODUCT_KINDS = {"bf16_tiles": 0, "fp32": 1, "bf16_rows": 2, "int8": 3}
# A row switch that never comes. An int8 product's "switch" is a triple: (the most rows before its widened
# product, the rows from which its VNNI kernel runs, the rows from which its AMX one runs), the row counts
# Int8Linear.prepare was given.
NEVER = sys.maxsize


def runner_available(kind: str = "bf16_tiles") -> bool:
    return (_decode_layers_cpu is not None and not _PYTHON_ONLY
            and _decode_layers_cpu.available(PRODUCT_KINDS[kind]))


def _product_kind(module) -> tuple[str, int | tuple[int, int, int]] | None:
    """(kind, few-row switch) of the kernels `module.forward` calls, or None for a module the runner lacks."""
    if type(module) is Int8Linear:
        if module.kernel != "avx2" or module._avx2 is None:
            return None
        return "int8", (module.widened_from_rows - 1, module.vnni_from_rows, module.amx_from_rows)
    if type(module) is Bf16Linear and module.few_rows_max > 0:
        return ("bf16_tiles" if module.layout == "tiles" else "bf16_rows"), module.few_rows_max
    if type(module) is linear.Linear and linear.USE_GEMM and module.weight.is_contiguous():
        return "fp32", module.blas_from_rows - 1  # the AVX-512 product up to torch's rows (fp32_products.py)
    return None


def _rows_max(kind: str, switch: int) -> int:
    """Most rows a step may have for the runner to call the kernels the modules would: "rows" bf16
    weights and fp32 ones go to torch's matmul beyond the switch, which the runner cannot call."""
    return switch if kind in ("bf16_rows", "fp32") else NEVER


def _moe_router(mlp) -> tuple[str, int] | None:
    """(kind, switch) of a SparseMoE's router where the runner takes the layer: softmax top-k routing,
    no shared expert, no router bias, the experts on their C call (layers/moe.py's ExpertKernel)."""
    if not (moe.USE_EXPERT_KERNEL and type(mlp) is SparseMoE and mlp.routing == "softmax_top_k"
            and mlp.shared_expert is None and mlp.gate.bias is None and mlp.expert_kernel() is not None):
        return None
    router = _product_kind(mlp.gate)
    # a "rows" router would go to torch's matmul past its switch, which the runner cannot call
    return router if router is not None and router[0] != "bf16_rows" and runner_available(router[0]) else None


def _layer_products(layer) -> list | None:
    """The (kind, switch) of the layer's attention and dense MLP products; None where the runner
    cannot take the layer (a mixture-of-experts MLP brings its own kinds: _moe_router)."""
    attn, mlp = layer.self_attn, layer.mlp
    if not (type(attn) is Attention and attn.sinks is None and not layer.sandwich):
        return None
    if type(mlp) is SparseMoE:
        router = _moe_router(mlp)
        if router is None:
            return None
        own = [_product_kind(m) for m in (attn.qkv_proj, attn.o_proj)]
        return own + [router] if router[0] == "int8" else own  # an int8 router shares the layers' switches
    if type(mlp) is not GatedMLP:
        return None
    return [_product_kind(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]


def _moe_fields(mlp) -> list[int]:
    """The runner's mixture-of-experts fields of a layer (zeros for a dense MLP)."""
    if type(mlp) is not SparseMoE:
        return [0] * 11  # ROUTER_W .. SCALING in _decode_layers_cpu.c
    kind, switch = _moe_router(mlp)
    experts = mlp.expert_kernel()
    scaling_bits = struct.unpack("<i", struct.pack("<f", mlp.routed_scaling_factor))[0]
    few_rows_max = switch[0] if kind == "int8" else switch  # an int8 router's VNNI switch is the layers' (for_model)
    return [_weight(mlp.gate).data_ptr(), PRODUCT_KINDS[kind], few_rows_max, experts.table.data_ptr(), experts.kind,
            experts.few_rows_max, experts.intermediate, mlp.num_experts, mlp.top_k, int(mlp.normalize_top_k),
            scaling_bits]


def _weight(module) -> torch.Tensor:
    """The tensor a product reads as its weights: an int8 layer's integers, else `weight`."""
    return module.qweight if type(module) is Int8Linear else module.weight


def _scales(module) -> torch.Tensor | None:
    """An int8 layer's per-output scales; None for other kinds."""
    return module.scales if type(module) is Int8Linear else None


def _surroundings_qualify(model) -> bool:
    """What the runner does around the layers is what the model does: an fp32 embedding without a scale,
    one full-width rotary table pair, a plain RMSNorm at the end with the layers' weight offset."""
    embed, norm, rotaries = model.model.embed_tokens, model.model.norm, getattr(model, "rotaries", None)
    first = model.model.layers[0]
    tables = [] if not rotaries else [rotaries[0].cos, rotaries[0].signed_sin]
    if type(embed) is Int8Embedding:  # rows dequantized in the call, as Int8Embedding.forward does
        int8_rows = (embed.qweight.device.type == "cpu" and embed.qweight.is_contiguous()
                     and embed.out_dtype == torch.float32 and embed.scales.dtype == torch.float32)
        embed_ok, tables = int8_rows, tables + [embed.scales]
    elif type(embed) is nn.Embedding:
        embed_ok, tables = True, tables + [embed.weight]
    else:
        return False
    return (embed_ok and model.spec.embed_scale is None and type(norm) is RMSNorm
            and type(first.input_layernorm) is RMSNorm and norm.weight_offset == first.input_layernorm.weight_offset
            and len(rotaries) == 1 and rotaries[0].rotary_dim == first.self_attn.head_dim
            and all(t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                    for t in (norm.weight, *tables)))


class DecodeLayers:
    """The C runner bound to one model and one paged cache."""

    def __init__(self, model, cache: PagedKVCache, kind: str, switch: int):
        spec, layers = model.spec, list(model.model.layers)
        self.cache, self.spec = cache, spec
        self.kind, self.switch, self.rows_max = kind, switch, _rows_max(kind, switch)
        fields = _decode_layers_cpu.layer_fields()
        table = []
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            dense = type(mlp) is GatedMLP
            mlp_products = [mlp.gate_up_proj, mlp.down_proj] if dense else [None, None]
            mlp_weights = ([_weight(mlp.gate_up_proj), mlp.gate_up_proj.bias, _weight(mlp.down_proj), mlp.down_proj.bias]
                           if dense else [None] * 4)
            row = [layer.input_layernorm.weight, _weight(attn.qkv_proj), attn.qkv_proj.bias, _weight(attn.o_proj),
                   attn.o_proj.bias, layer.post_attention_layernorm.weight, *mlp_weights, cache.k[i], cache.v[i],
                   *cache.layer_scales(i)]
            qk_norms = [None, None] if attn.q_norm is None else [attn.q_norm.weight, attn.k_norm.weight]
            scales = [None if m is None else _scales(m) for m in (attn.qkv_proj, attn.o_proj, *mlp_products)]
            scales.append(_scales(mlp.gate) if type(mlp) is SparseMoE else None)
            packed = [getattr(m, "amx_packed", None) for m in (attn.qkv_proj, attn.o_proj, *mlp_products)]
            table += ([0 if t is None else t.data_ptr() for t in row] + [attn.sliding_window or 0]
                      + [0 if t is None else t.data_ptr() for t in (*qk_norms, *scales)] + _moe_fields(mlp)
                      + [0 if t is None else t.data_ptr() for t in packed])
            assert len(table) == (i + 1) * fields
        self.num_layers = len(layers)
        self.table = torch.tensor(table, dtype=torch.int64)
        attn = layers[0].self_attn
        self.num_heads, self.num_kv_heads, self.head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        self.scale, self.softcap = attn.scale, attn.softcap
        dense = [layer.mlp for layer in layers if type(layer.mlp) is GatedMLP]
        # the dense MLPs' width (the runner's gate|up scratch); a model of experts only has none
        self.hidden, self.intermediate = spec.hidden_size, dense[0].down_proj.in_features if dense else 32
        norm = layers[0].input_layernorm
        rotary = model.rotaries[0]
        embedding = model.model.embed_tokens
        # an int8 embedding: its integers, and its per-row scales where an fp32 one has its rows
        embed, embed_int8 = ((embedding.scales, embedding.qweight) if type(embedding) is Int8Embedding
                             else (embedding.weight, None))
        self.embed_rows, self.rotary_rows = embed.shape[0], rotary.cos.shape[0]
        few_rows_max, vnni_from, amx_from = switch if kind == "int8" else (switch, NEVER, NEVER)
        # What every step passes but never changes, parsed and checked once: a C struct behind a capsule.
        self.c_model = _decode_layers_cpu.model(
            self.table.data_ptr(), self.num_layers, PRODUCT_KINDS[kind], few_rows_max, vnni_from, amx_from,
            embed.data_ptr(),
            0 if embed_int8 is None else embed_int8.data_ptr(), embed.shape[0],
            rotary.cos.data_ptr(), rotary.signed_sin.data_ptr(), rotary.cos.shape[0], model.model.norm.weight.data_ptr(),
            self.hidden, self.intermediate, self.num_heads, self.num_kv_heads, self.head_dim, cache.block_size,
            cache.num_blocks, norm.eps, attn.q_norm.eps if attn.q_norm is not None else 0.0, model.model.norm.eps,
            norm.weight_offset, self.scale, self.softcap or 0.0, cache.kv_kind,
        )  # fmt: skip
        # The table and the struct hold addresses: keep every tensor they name alive as long as they are used.
        self._keep = (layers, cache, embed, embed_int8, rotary.cos, rotary.signed_sin, model.model.norm.weight)

    @classmethod
    def for_model(cls, model, cache) -> DecodeLayers | None:
        """The runner for this model and cache, or None where some layer or the cache does not qualify."""
        if not runner_available() or not isinstance(cache, PagedKVCache) or not cache.use_cpu_kernel:
            return None
        spec = getattr(model, "spec", None)
        layers = getattr(getattr(model, "model", None), "layers", None)
        if (spec is None or layers is None or len(spec.ropes) != 1 or spec.activation != "silu"
                or not activation.SILU_MUL_KERNEL or not _surroundings_qualify(model)):
            return None
        products = [_layer_products(layer) for layer in layers]
        if not products or any(p is None or None in p for p in products):
            return None
        kinds = {kind_and_switch for layer in products for kind_and_switch in layer}
        if len(kinds) != 1:  # one kind, one few-row switch: the runner makes one choice per product
            return None
        kind, switch = kinds.pop()
        return cls(model, cache, kind, switch) if runner_available(kind) else None

    def __call__(self, input_ids: torch.Tensor, positions: torch.Tensor, kv, num_threads: int,
                 choice_rows: int | None = None) -> torch.Tensor | None:
        """The step's final hidden states (T, hidden), normalised by the model's final norm: the embedding
        and rotary rows gathered, every layer, the norm, in one call; None for a step the runner does not
        take (the caller then runs the model's own forward). `choice_rows`: the rows the products' kernels
        are chosen for (default T): a step with verifications passes its number of sequences, so each
        checked position runs the kernels a plain decode step of those sequences runs, with its bits."""
        meta = kv.meta if kv is self.cache else None
        tokens = input_ids.shape[0]
        if (meta is None or meta.chunks or meta.num_single != tokens or tokens > self.rows_max
                or torch.is_grad_enabled()):
            return None
        out = torch.empty(tokens, self.hidden)
        tables = meta.single_block_tables
        _decode_layers_cpu.run_layers(
            self.c_model, input_ids.data_ptr(), positions.data_ptr(), out.data_ptr(), meta.slot_mapping.data_ptr(),
            tables.data_ptr(), meta.single_context_lens.data_ptr(), tokens, choice_rows or tokens, tables.shape[1],
            num_threads,
            meta.num_threads, meta.store_first,
        )  # fmt: skip
        return out

    def head_kind(self, head) -> tuple[str, int] | None:
        """(kind, switch) of an output head `greedy_passes` can call: one of the runner's product kinds whose
        rows are embedding rows (its argmax feeds the next pass); else None."""
        kind = _product_kind(head)
        if kind is None or kind[0] == "int8" or not runner_available(kind[0]) or head.out_features > self.embed_rows:
            return None
        return kind

    def greedy_passes(self, head, head_kind: tuple[str, int], fields: int, n: int, passes: int, width: int,
                      rows0: int, num_threads: int) -> None:
        """A draft model's greedy proposals for n sequences in one call (see greedy_passes in
        _decode_layers_cpu.c for the int64 buffer at address `fields`: lengths, proposal counts, first
        positions without KV, block tables n x `width`, the proposals n x `passes`, then `rows0` catch-up
        ids; rows0 0: the first proposals are given). The head's product is the kernel its module calls
        within its few-row range (beyond it, the same kernel on more rows: a proposal's bits need not be
        the module's, verification decides)."""
        kind, switch = head_kind
        bias = head.bias
        _decode_layers_cpu.greedy_passes(
            self.c_model, head.weight.data_ptr(), 0 if bias is None else bias.data_ptr(), PRODUCT_KINDS[kind], switch,
            head.out_features, fields, n, passes, width, rows0, num_threads, num_threads,
        )  # fmt: skip
