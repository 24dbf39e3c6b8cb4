"""The paged KV cache and the per-step attention over it.

Memory is one tensor for keys and one for values, head-major: values
(layers, kv_heads, num_blocks, block_size, head_dim), keys dims-major inside a
block (layers, kv_heads, num_blocks, head_dim, block_size). A step's tokens arrive
flat; `StepMetadata` says where each token's KV goes (`slot_mapping`) and how
the queries group into sequences.
- Single-token queries (decodes, and the last token of a prompt): on CPU in
  fp32, the C kernel (`_paged_attention_cpu.c`) walks each block table and reads
  keys and values in place (it also applies rotary and writes the new keys and
  values: `rope_attend`); elsewhere, the blocks are gathered
  into a padded copy and attended as one batched matmul per layer.
- Multi-token prompt chunks: on AVX-512 CPUs in fp32, every chunk of the step in
  one C call (`_prefill_attention_cpu.c`, keys read in place; on AMX tiles over a
  bf16 cache); elsewhere one
  sequence at a time through SDPA, over the step's own keys when the chunk
  starts the prompt and over its gathered blocks otherwise.

The cache may hold bf16 or int8 under fp32 activations (`kv_dtype`): a batched decode
step on CPU reads more bytes of keys and values than of weights; bf16 halves them, int8
quarters them. bf16: keys and values are rounded to bf16 (to nearest even) as they are
written and widened exactly as they are read. int8: each token's key (and value) of each
kv head is stored as round(x * 127 / max|x|) with its scale max|x| / 127 beside it
(`k_scale`, `v_scale`: (layers, kv_heads, num_blocks, block_size) fp32): a relative
error of at most 1/254 of the row's largest element; its keys are kept in pairs of
dimensions and its values in pairs of keys, the operands of AVX512-VNNI's vpdpwssd. The C
kernels take bf16 on AVX-512 and int8 on AVX-512 with BW and VNNI (an int8 key's scale
multiplies its scores, a value's its probabilities: the integers themselves go into the
products), the torch paths anywhere (they dequantize what they gather).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from selfhost.engine.kv_layout import (
    KV_KINDS,
    dequantize_rows,
    key_rows,
    quantize_rows,
    value_rows,
)
from selfhost.engine.zeroed_memory import zeros_on_demand
from selfhost.layers.attention import attend_one_sequence
from selfhost.models.spec import ModelSpec

try:
    from selfhost.engine import _paged_attention_cpu
except ImportError:  # not compiled (no C compiler at install, or a source tree without `pip install`)
    _paged_attention_cpu = None
try:
    from selfhost.engine import _prefill_attention_cpu
except ImportError:
    _prefill_attention_cpu = None

# SELFHOST_PAGED_ATTENTION=torch keeps the gather-based torch paths on CPU (to compare).
_TORCH_ONLY = os.environ.get("SELFHOST_PAGED_ATTENTION", "c") == "torch"
CPU_KERNEL_ENABLED = _paged_attention_cpu is not None and not _TORCH_ONLY
PREFILL_KERNEL_ENABLED = _prefill_attention_cpu is not None and _prefill_attention_cpu.available() and not _TORCH_ONLY


def narrow_cache_kernels_available(kv_dtype: torch.dtype = torch.bfloat16) -> bool:
    """Both C kernels read (and the decode one writes) a bf16 cache on AVX-512 CPUs, an int8 one where
    they also have AVX512-BW and VNNI."""
    return (CPU_KERNEL_ENABLED and PREFILL_KERNEL_ENABLED
            and _paged_attention_cpu.narrow_cache_available(KV_KINDS[kv_dtype]))


def prompt_tiles_available() -> bool:
    """Prompt attention over a bf16 cache multiplies on AMX tiles here (an fp32 cache takes the AVX-512 kernel)."""
    return narrow_cache_kernels_available() and _prefill_attention_cpu.tiles_available()


@dataclass
class StepMetadata:
    slot_mapping: torch.Tensor  # (T,) flat cache slot of each token
    # Single-token queries: the first num_single tokens of the step.
    num_single: int
    single_block_tables: torch.Tensor | None  # (S, max_blocks) padded with block 0
    single_context_lens: torch.Tensor | None  # (S,) keys visible to each, including itself
    # Multi-token chunks: (first token index in the step, num tokens, start position, block table)
    chunks: list[tuple[int, int, int, torch.Tensor]]
    num_threads: int = 1  # threads the attention kernels take this step (the engine's choice, cpu_threads.py)
    # Some sequence has several single-token queries (a speculative verification, laid out as one query
    # per checked position): every key must be in the cache before any of them attends.
    store_first: bool = False
    # Additive score masks of the single-token queries, per sliding window: built
    # by the first layer that needs one, reused by every other layer of the step.
    single_masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _chunk_arrays: tuple[torch.Tensor, ...] | None = None
    _slot_split: tuple[torch.Tensor, torch.Tensor] | None = None

    def slot_blocks_and_offsets(self, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Each token's block and offset in it, from slot_mapping; built once per step."""
        if self._slot_split is None:
            self._slot_split = (self.slot_mapping // block_size, self.slot_mapping % block_size)
        return self._slot_split

    def chunk_arrays(self) -> tuple[torch.Tensor, ...]:
        """The chunks as the prefill kernel takes them: padded block tables (C, max_blocks)
        and each chunk's first row, token count and start position; built once per step."""
        if self._chunk_arrays is None:
            width = max(len(table) for _, _, _, table in self.chunks)
            tables = torch.zeros(len(self.chunks), width, dtype=torch.long)
            for row, (_, _, _, table) in enumerate(self.chunks):
                tables[row, : len(table)] = table
            columns = torch.tensor([chunk[:3] for chunk in self.chunks], dtype=torch.long).T.contiguous()
            self._chunk_arrays = (tables, *columns)
        return self._chunk_arrays

    def single_query_mask(self, num_kv_heads: int, padded_len: int, sliding_window: int | None) -> torch.Tensor:
        """(Hkv*S, 1, L) fp32 additive mask: 0 where a query sees the key, -inf elsewhere."""
        if sliding_window not in self.single_masks:
            lens = self.single_context_lens
            key_pos = torch.arange(padded_len, device=lens.device).unsqueeze(0)  # (1, L)
            hidden = key_pos >= lens.unsqueeze(1)  # (S, L): padding past each context
            if sliding_window is not None:
                hidden |= key_pos <= lens.unsqueeze(1) - 1 - sliding_window
            mask = torch.zeros(hidden.shape, dtype=torch.float32, device=lens.device).masked_fill_(hidden, float("-inf"))
            # Batch rows are (kv head, sequence) pairs, kv head major.
            self.single_masks[sliding_window] = mask.unsqueeze(1).repeat(num_kv_heads, 1, 1)
        return self.single_masks[sliding_window]


def batched_single_query_attention(
    q: torch.Tensor,  # (S, H, D)
    k: torch.Tensor,  # (Hkv, S, L, D) keys gathered per sequence, padded to L
    v: torch.Tensor,  # (Hkv, S, L, D)
    mask: torch.Tensor,  # (Hkv*S, 1, L) fp32, additive
    scale: float,
    softcap: float | None,
) -> torch.Tensor:
    num_seqs, num_heads, head_dim = q.shape
    num_kv_heads, _, max_len, _ = k.shape
    group = num_heads // num_kv_heads
    # One batched matmul over (kv head, sequence) pairs; the G query heads that
    # share a kv head are the rows of each product.
    qg = q.reshape(num_seqs, num_kv_heads, group, head_dim).transpose(0, 1).reshape(-1, group, head_dim)
    keys_t = k.view(-1, max_len, head_dim).transpose(1, 2)  # (Hkv*S, D, L)
    if softcap is None and q.dtype == torch.float32:
        scores = torch.baddbmm(mask, qg, keys_t, alpha=scale)  # mask + scale * q.k in one kernel
    else:
        # Half precision scales and caps in fp32, as the reference does.
        scores = torch.bmm(qg, keys_t).float() * scale  # (Hkv*S, G, L)
        if softcap is not None:
            scores = torch.tanh(scores / softcap) * softcap
        scores += mask
    probs = scores.softmax(dim=-1).to(v.dtype)
    out = torch.bmm(probs, v.view(-1, max_len, head_dim))  # (Hkv*S, G, D)
    return out.view(num_kv_heads, num_seqs, group, head_dim).transpose(0, 1).reshape(num_seqs, num_heads, head_dim)


class PagedKVCache:
    def __init__(self, spec: ModelSpec, num_blocks: int, block_size: int, dtype: torch.dtype, device: torch.device,
                 kv_dtype: torch.dtype | None = None):
        """dtype: the activations' (queries, outputs); kv_dtype: what the cache stores (default: dtype)."""
        kv_dtype = kv_dtype or dtype
        # Head-major blocks: gathering a sequence's blocks yields each kv head's values
        # as one contiguous (L, head_dim) run, ready for a batched matmul. Inside a block
        # keys are dims-major, (head_dim, block_size): a vector load then holds one
        # dimension of consecutive keys, so the CPU kernels form a block's scores with
        # plain multiply-adds (no horizontal sums, no transposition).
        shape = (spec.num_layers, spec.num_kv_heads, num_blocks, block_size, spec.head_dim)
        # An int8 cache keeps its keys in pairs of dimensions, (D/2, block_size, 2), and its values in
        # pairs of keys, (block_size/2, D, 2): the decode kernel multiplies 16 keys' pair of dimensions
        # by a query's pair, and 16 dimensions of a pair of values by their weights, in one VNNI
        # instruction each.
        key_block, value_block = (spec.head_dim, block_size), (block_size, spec.head_dim)
        if kv_dtype == torch.int8:
            if spec.head_dim % 2 or block_size % 2:
                raise ValueError(f"an int8 KV cache needs an even head_dim and block_size, not {spec.head_dim} "
                                 f"and {block_size}")
            key_block, value_block = (spec.head_dim // 2, block_size, 2), (block_size // 2, spec.head_dim, 2)
        # on CPU, pages are mapped as sequences fill them, not all at load (zeroed_memory.py)
        self.k = zeros_on_demand(shape[:3] + key_block, kv_dtype, device)
        self.v = zeros_on_demand(shape[:3] + value_block, kv_dtype, device)
        # int8: one scale per token and kv head for keys and for values
        self.k_scale = self.v_scale = None
        if kv_dtype == torch.int8:
            self.k_scale = zeros_on_demand(shape[:4], torch.float32, device)
            self.v_scale = zeros_on_demand(shape[:4], torch.float32, device)
        self.block_size, self.num_blocks = block_size, num_blocks
        self.num_kv_heads, self.head_dim = spec.num_kv_heads, spec.head_dim
        self.meta: StepMetadata | None = None
        # what the C kernels are told the cache holds (they take fp32 activations only)
        self.kv_kind = KV_KINDS.get(kv_dtype, 0)
        kernel_cache = kv_dtype == dtype or (
            self.kv_kind != 0 and narrow_cache_kernels_available(kv_dtype) and spec.head_dim % 16 == 0
            and block_size % 16 == 0
        )  # fmt: skip
        # Single-token queries read fp32 blocks in place through the C kernel when it is built,
        # and so do prompt chunks on CPUs with AVX-512 (bf16 and int8 blocks: see above).
        self.use_cpu_kernel = CPU_KERNEL_ENABLED and device.type == "cpu" and dtype == torch.float32 and kernel_cache
        self.use_prefill_kernel = (
            PREFILL_KERNEL_ENABLED and device.type == "cpu" and dtype == torch.float32 and kernel_cache
            and spec.head_dim % 16 == 0 and spec.head_dim <= 1024
            and num_blocks * block_size * spec.head_dim < 2**31  # gathered with int32 offsets
        )  # fmt: skip
        # Where the CPU has AMX, prompt attention over a bf16 or int8 cache multiplies on tiles:
        # queries and probabilities rounded to bf16 like the activations of the bf16 weight
        # products that come with a narrow cache; ~7x the AVX-512 kernel on a 1024-token prompt.
        self.use_prefill_tiles = (
            self.use_prefill_kernel and self.kv_kind != 0 and _prefill_attention_cpu.tiles_available()
            and spec.head_dim % 32 == 0 and spec.head_dim <= 256
        )  # fmt: skip

    @staticmethod
    def bytes_per_block(spec: ModelSpec, block_size: int, dtype: torch.dtype) -> int:
        """Keys and values of `block_size` tokens, an int8 cache's scales included."""
        scales = 2 * spec.num_layers * spec.num_kv_heads * 4 if dtype == torch.int8 else 0
        return (spec.kv_bytes_per_token * dtype.itemsize + scales) * block_size

    def layer_scales(self, layer_idx: int) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """An int8 cache's key and value scales of one layer, (Hkv, num_blocks, block_size) each; else Nones."""
        if self.k_scale is None:
            return None, None
        return self.k_scale[layer_idx], self.v_scale[layer_idx]

    def _scale_pointers(self, layer_idx: int) -> tuple[int, int]:
        k_scale, v_scale = self.layer_scales(layer_idx)
        return (0, 0) if k_scale is None else (k_scale.data_ptr(), v_scale.data_ptr())

    def attend(self, layer_idx, q, k, v, scale, sliding_window, softcap):
        meta = self.meta
        num_kv_heads = self.num_kv_heads
        self.write_step_kv(layer_idx, k, v)  # first: queries see themselves
        num_single = meta.num_single
        single_out = None
        if num_single and self.use_cpu_kernel:
            single_out = self._single_query_kernel(layer_idx, q[:num_single], scale, sliding_window, softcap)
        elif num_single:
            gathered_k, gathered_v = self.single_keys_values(layer_idx, q.dtype)
            mask = meta.single_query_mask(num_kv_heads, gathered_k.shape[2], sliding_window)
            single_out = batched_single_query_attention(q[:num_single], gathered_k, gathered_v, mask, scale, softcap)
        if single_out is not None and not meta.chunks:
            return single_out
        out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        if single_out is not None:
            out[:num_single] = single_out
        if self.use_prefill_kernel and softcap is None and q.shape[1] // num_kv_heads <= 16:
            self._prefill_kernel(layer_idx, q, out, scale, sliding_window)
            return out
        for first, num, start, table in meta.chunks:
            keys, values = self.chunk_keys_values(layer_idx, k, v, first, num, start, table, q.dtype)
            out[first : first + num] = attend_one_sequence(
                q[first : first + num], keys, values, start, scale, sliding_window, softcap
            )
        return out

    def write_step_kv(self, layer_idx, k, v) -> None:
        """This step's keys (dims-major in their block; int8: pairs of dimensions) and values (rows; int8:
        pairs of keys) into their slots."""
        k_layer, v_layer = self.k[layer_idx], self.v[layer_idx]
        num_kv_heads, head_dim = self.num_kv_heads, self.head_dim
        blocks, offsets = self.meta.slot_blocks_and_offsets(self.block_size)
        slots = self.meta.slot_mapping
        k_scale, v_scale = self.layer_scales(layer_idx)
        if k_scale is None:
            k_layer[:, blocks, :, offsets] = k.to(k_layer.dtype)  # advanced indices first: (T, Hkv, D)
            v_layer.view(num_kv_heads, -1, head_dim).index_copy_(1, slots, v.transpose(0, 1).to(v_layer.dtype))
            return
        # int8: each row to its own scale; keys in pairs of dimensions (Hkv, NB, D/2, BS, 2), values in
        # pairs of keys (Hkv, NB, BS/2, D, 2); both indexed as (T, Hkv, ...)
        (k, k_scales), (v, v_scales) = quantize_rows(k), quantize_rows(v)  # (T, Hkv, D), (T, Hkv)
        k_layer[:, blocks, :, offsets] = k.view(*k.shape[:2], head_dim // 2, 2)
        v_layer[:, blocks, offsets // 2, :, offsets % 2] = v
        k_scale[:, blocks, offsets] = k_scales.T  # advanced indices together: (Hkv, T)
        v_scale.view(num_kv_heads, -1).index_copy_(1, slots, v_scales.T.contiguous())

    def single_keys_values(self, layer_idx, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The single-token queries' blocks gathered: keys and values (Hkv, S, padded length, D) in `dtype`."""
        num_kv_heads, head_dim = self.num_kv_heads, self.head_dim
        tables = self.meta.single_block_tables  # (S, max_blocks)
        num_single, padded_len, flat = tables.shape[0], tables.shape[1] * self.block_size, tables.flatten()
        keys, values = self._blocks_in(layer_idx, flat, dtype)
        shape = (num_kv_heads, num_single, padded_len, head_dim)
        return keys.view(shape), values.view(shape)

    def _blocks_in(self, layer_idx, blocks, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values of `blocks` of one layer as (Hkv, len(blocks) * block_size, D) rows in `dtype`."""
        num_kv_heads = self.num_kv_heads
        keys, values = key_rows(self.k[layer_idx], blocks), value_rows(self.v[layer_idx], blocks)
        k_scale, v_scale = self.layer_scales(layer_idx)
        if k_scale is None:
            return keys.to(dtype), values.to(dtype)
        k_scales = k_scale.index_select(1, blocks).view(num_kv_heads, -1)
        v_scales = v_scale.index_select(1, blocks).view(num_kv_heads, -1)
        return dequantize_rows(keys, k_scales, dtype), dequantize_rows(values, v_scales, dtype)

    def chunk_keys_values(self, layer_idx, k, v, first, num, start, table, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The keys and values a prompt chunk attends to, (Hkv, start + num, D) each in `dtype`: the step's
        own when the chunk starts the prompt, else its blocks gathered from the cache."""
        k_layer = self.k[layer_idx]
        if start == 0:  # a whole prompt, or its first chunk: its keys are this step's own
            keys, values = k[first : first + num].transpose(0, 1), v[first : first + num].transpose(0, 1)
            if k_layer.dtype == torch.int8:  # as the cache holds them, like every other path
                return dequantize_rows(*quantize_rows(keys), dtype), dequantize_rows(*quantize_rows(values), dtype)
            if k_layer.dtype != dtype:
                keys, values = keys.to(k_layer.dtype).to(dtype), values.to(k_layer.dtype).to(dtype)
            return keys, values
        keys, values = self._blocks_in(layer_idx, table, dtype)
        return keys[:, : start + num], values[:, : start + num]

    def rope_attend(self, layer_idx, heads, cos, sin, num_heads, scale, sliding_window, softcap):
        """Rotary on q and k, the cache write and attention through the C kernels, in one call
        for a decode-only step and in three (rotate and store, single queries, prompt chunks)
        for a step with prompt chunks.

        heads: (T, H + 2*Hkv, D), the unrotated q/k/v projection; cos, sin: (T, 1, D).
        Returns (T, H, D), or None where the step or the layer needs the general path
        (partial rotary, the torch kernels, soft-capped or very wide prompt attention); the
        caller then rotates and calls `attend`. Saves the torch ops of rotary and the cache
        write: ~15 us per layer of a decode step, ~1.3 ms per layer of a 1024-token prompt.
        """
        meta = self.meta
        num_tokens, _, head_dim = heads.shape
        num_kv_heads, num_blocks, block_size = self.num_kv_heads, self.num_blocks, self.block_size
        if not self.use_cpu_kernel or cos.shape[-1] != head_dim:
            return None
        heads, cos, sin = heads.contiguous(), cos.contiguous(), sin.contiguous()
        if not meta.chunks:
            if meta.num_single != num_tokens:
                return None
            out = torch.empty(num_tokens, num_heads, head_dim)
            tables = meta.single_block_tables
            _paged_attention_cpu.rope_decode_attention(
                heads.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                meta.slot_mapping.data_ptr(), self.k[layer_idx].data_ptr(), self.v[layer_idx].data_ptr(),
                tables.data_ptr(), meta.single_context_lens.data_ptr(), out.data_ptr(),
                num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_blocks, tables.shape[1],
                scale, softcap or 0.0, sliding_window or 0,
                meta.num_threads, self.kv_kind, meta.store_first, *self._scale_pointers(layer_idx),
            )  # fmt: skip
            return out
        if not (self.use_prefill_kernel and softcap is None and num_heads // num_kv_heads <= 16):
            return None
        q = torch.empty(num_tokens, num_heads, head_dim)
        _paged_attention_cpu.rope_store(
            heads.data_ptr(), cos.data_ptr(), sin.data_ptr(), meta.slot_mapping.data_ptr(),
            self.k[layer_idx].data_ptr(), self.v[layer_idx].data_ptr(), q.data_ptr(),
            num_tokens, num_heads, num_kv_heads, head_dim, block_size, num_blocks, meta.num_threads, self.kv_kind,
            *self._scale_pointers(layer_idx),
        )  # fmt: skip
        out = torch.empty_like(q)
        if meta.num_single:
            out[: meta.num_single] = self._single_query_kernel(layer_idx, q[: meta.num_single], scale, sliding_window,
                                                               softcap)
        self._prefill_kernel(layer_idx, q, out, scale, sliding_window)
        return out

    def _prefill_kernel(self, layer_idx, q, out, scale, sliding_window) -> None:
        """Every prompt chunk of the step in one C call, keys and values read in place."""
        if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
            q = q.contiguous()
        tables, first, count, start = self.meta.chunk_arrays()
        num_kv_heads, num_blocks, block_size, head_dim = self.num_kv_heads, self.num_blocks, self.block_size, self.head_dim
        _prefill_attention_cpu.prefill_attention(
            q.data_ptr(), self.k[layer_idx].data_ptr(), self.v[layer_idx].data_ptr(), out.data_ptr(),
            tables.data_ptr(), first.data_ptr(), count.data_ptr(), start.data_ptr(),
            len(self.meta.chunks), q.stride(0), q.shape[1], num_kv_heads, head_dim, block_size, num_blocks,
            tables.shape[1], sliding_window or 0, scale,
            self.meta.num_threads, self.kv_kind, self.use_prefill_tiles, *self._scale_pointers(layer_idx),
        )  # fmt: skip

    def _single_query_kernel(self, layer_idx, q, scale, sliding_window, softcap) -> torch.Tensor:
        """The C kernel: each single-token query reads its blocks where they lie, no gather."""
        meta = self.meta
        q = q.contiguous()
        out = torch.empty_like(q)
        tables, lens = meta.single_block_tables, meta.single_context_lens
        num_seqs, num_heads, head_dim = q.shape
        num_kv_heads, num_blocks, block_size = self.num_kv_heads, self.num_blocks, self.block_size
        _paged_attention_cpu.decode_attention(
            q.data_ptr(), self.k[layer_idx].data_ptr(), self.v[layer_idx].data_ptr(),
            tables.data_ptr(), lens.data_ptr(), out.data_ptr(),
            num_seqs, num_heads, num_kv_heads, head_dim, block_size, num_blocks, tables.shape[1],
            scale, softcap or 0.0, sliding_window or 0,
            meta.num_threads, self.kv_kind, *self._scale_pointers(layer_idx),
        )  # fmt: skip
        return out
