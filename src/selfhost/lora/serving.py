"""Many adapters on one base in one batch: adapter slots and the gathered low-rank product.

Every adaptable projection of the served model is wrapped once in a
`MultiLoRALinear` holding `max_loras` slots of zero-padded A and B (scale
folded into B). A step's rows each name a slot, or none for the base model.
The base product runs once for the whole batch; the adapters add

    low = x @ A_step^T                        (T, N*S*R)   the step's adapters' A at once
    low *= onehot(adapter of each row)        keeps each row's own adapter
    out[:, shard] += low[shard] @ B_shard     (T, shard rows), per shard of a fused projection

with N the adapters present in the step (gathered from the L slots), S shards
of a fused projection (q/k/v, gate/up) and R the slot rank: dense products and
a mask whatever the mix of adapters, and no Python loop over requests. A
projection none of the step's adapters touches is skipped.
The work grows with N*S*R, padding included (a rank-4 adapter in rank-16 slots
costs rank 16); a segmented product over rows sorted by adapter would avoid both.

`AdapterSlots` decides which adapter is in which slot: loaded on first use,
evicted least recently used among those no running request holds.
"""

from __future__ import annotations

from collections import OrderedDict
from pathlib import Path

import torch
from torch import nn

from selfhost.errors import InvalidParameterError
from selfhost.lora.adapter_format import TARGET_MODULES, AdapterError, read_adapter
from selfhost.lora.apply import LoRALinear, check_fits
from selfhost.models.decoder import CausalLM
from selfhost.models.families import PACKED_WEIGHTS
from selfhost.models.loader import shard_slices

# selfhost's projections and the PEFT modules fused into each, in row order.
FUSED_SHARDS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"),
    "down_proj": ("down_proj",),
}


class StepRows:
    """Which adapter each row of the current step uses: set by the model runner around a forward."""

    def __init__(self):
        self.slots: frozenset[int] = frozenset()  # the slots present in the step
        self.index: torch.Tensor | None = None  # (N,) those slots, ascending; None: all L slots, in order
        self.onehot: torch.Tensor | None = None  # (T, N) 1.0 at a row's adapter; None: every row is the base model


class MultiLoRALinear(nn.Module):
    """The base projection plus, for each row, the low-rank product of its own adapter."""

    def __init__(self, base: nn.Module, rows: StepRows, shard_rows: list[tuple[int, int]], max_loras: int,
                 max_rank: int, dtype: torch.dtype, device: torch.device):
        super().__init__()
        self.base, self.rows, self.shard_rows = base, rows, shard_rows
        self.filled: set[int] = set()  # slots whose adapter changes this projection
        self.register_buffer("lora_a", torch.zeros(max_loras, len(shard_rows), max_rank, base.in_features,
                                                   dtype=dtype, device=device), persistent=False)
        for shard, (start, end) in enumerate(shard_rows):  # one B per shard, (L, R, shard rows), scale folded in
            self.register_buffer(f"lora_b{shard}", torch.zeros(max_loras, max_rank, end - start, dtype=dtype,
                                                               device=device), persistent=False)

    @property
    def lora_b(self) -> list[torch.Tensor]:
        return [self._buffers[f"lora_b{shard}"] for shard in range(len(self.shard_rows))]

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        out = self.base.forward(x, num_threads)  # (T, out)
        rows = self.rows
        if rows.onehot is None or self.filled.isdisjoint(rows.slots):
            return out
        a = self.lora_a if rows.index is None else self.lora_a.index_select(0, rows.index)  # (N, S, R, in)
        n, num_shards, rank = a.shape[:3]
        low = x.to(a.dtype) @ a.reshape(n * num_shards * rank, -1).t()  # (T, N*S*R)
        low = low.view(-1, n, num_shards, rank) * rows.onehot[:, :, None, None]  # (T, N, S, R): own adapter only
        for shard, ((start, end), b) in enumerate(zip(self.shard_rows, self.lora_b)):  # at most 3 (q, k, v)
            b = b if rows.index is None else b.index_select(0, rows.index)  # (N, R, shard rows)
            out[:, start:end] += (low[:, :, shard].reshape(-1, n * rank) @ b.view(n * rank, -1)).to(out.dtype)
        return out

    @torch.no_grad()
    def load_slot(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Fill `slot`: shard index -> (A (r, in), B (rows, r), scale); every other shard is zeroed.

        A B with as many rows as the whole projection (a checkpoint that fuses q/k/v itself) is
        split over the shards, each with the same A."""
        self.lora_a[slot].zero_()
        for b in self.lora_b:
            b[slot].zero_()
        for shard, (a, b, scale) in shards.items():
            whole = b.shape[0] == self.base.out_features and len(self.shard_rows) > 1
            for s in range(len(self.shard_rows)) if whole else [shard]:
                start, end = self.shard_rows[s]
                rows = b[start:end] if whole else b
                self.lora_a[slot, s, :a.shape[0]] = a
                self.lora_b[s][slot, :a.shape[0]] = rows.t() * scale
        if shards:
            self.filled.add(slot)
        else:
            self.filled.discard(slot)


class AdapterSlots:
    """Named adapters (folders) and the `max_loras` slots they are loaded into on demand."""

    def __init__(self, model: CausalLM, adapters: dict[str, Path], max_loras: int = 4, max_rank: int = 16):
        if not isinstance(model, CausalLM):
            raise InvalidParameterError("LoRA adapters need an architecture selfhost runs natively, "
                                        "not the transformers fallback")
        if max_loras < 1:
            raise InvalidParameterError(f"max_loras={max_loras} must be at least 1")
        if max_rank < 1:
            raise InvalidParameterError(f"max_lora_rank={max_rank} must be at least 1")
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            raise InvalidParameterError("the model already carries a single adapter; serve adapters through slots")
        self.model, self.max_loras, self.max_rank = model, max_loras, max_rank
        self.folders: dict[str, Path] = {}
        for name, folder in adapters.items():
            self.register(name, folder)
        self.rows = StepRows()
        self.users = [0] * max_loras  # running requests per slot
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self.modules: dict[tuple[int, str], MultiLoRALinear] = {}
        # The activations' dtype and device: the final norm's (embeddings and head may be quantized).
        dtype, device = model.model.norm.weight.dtype, model.model.norm.weight.device
        slices = shard_slices(model.spec)
        for layer_idx, layer in enumerate(model.model.layers):
            for fused, members in FUSED_SHARDS.items():
                parent = layer.self_attn if TARGET_MODULES[members[0]] == "self_attn" else layer.mlp
                base = getattr(parent, fused)
                rows = slices.get(fused, [(0, base.out_features)])
                wrapped = MultiLoRALinear(base, self.rows, rows, max_loras, max_rank, dtype, device)
                setattr(parent, fused, wrapped)
                self.modules[(layer_idx, fused)] = wrapped

    def register(self, name: str, folder: Path) -> None:
        if not name or name != name.strip():
            raise InvalidParameterError(f"adapter name {name!r} must be non-empty, without surrounding spaces")
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterError(f"adapter {name!r}: {folder} is not a folder")
        self.folders[name] = folder

    @property
    def names(self) -> list[str]:
        return sorted(self.folders)

    def acquire(self, name: str) -> int:
        """The slot holding adapter `name` (loaded now if needed), held until `release`."""
        if name not in self.folders:
            raise InvalidParameterError(f"unknown adapter {name!r}; loaded: {', '.join(self.names) or 'none'}",
                                        param="lora")
        if name not in self.loaded:
            self._load(name, self._free_slot())
        self.loaded.move_to_end(name)
        slot = self.loaded[name]
        self.users[slot] += 1
        return slot

    def release(self, slot: int) -> None:
        assert self.users[slot] > 0, slot
        self.users[slot] -= 1

    def _free_slot(self) -> int:
        taken = set(self.loaded.values())
        for slot in range(self.max_loras):
            if slot not in taken:
                return slot
        for name, slot in self.loaded.items():  # least recently used first
            if self.users[slot] == 0:
                del self.loaded[name]
                return slot
        raise InvalidParameterError(f"all {self.max_loras} adapter slots are held by running requests; "
                                    "raise max_loras or retry when some finish", param="lora")

    def _load(self, name: str, slot: int) -> None:
        adapter = read_adapter(self.folders[name])
        check_fits(adapter, self.model.spec)
        too_big = max(m.rank for m in adapter.modules.values())
        if too_big > self.max_rank:
            raise AdapterError(f"adapter {name!r} has rank {too_big}, more than max_lora_rank={self.max_rank}")
        per_module: dict[tuple[int, str], dict] = {}
        for (layer_idx, module), m in adapter.modules.items():
            fused, shard = PACKED_WEIGHTS.get(module, (module, 0))
            per_module.setdefault((layer_idx, fused), {})[shard] = (m.lora_a, m.lora_b, m.scale)
        for key, wrapped in self.modules.items():
            wrapped.load_slot(slot, per_module.get(key, {}))
        self.loaded[name] = slot

    def begin_step(self, row_slots: list[tuple[int | None, int]], device: torch.device) -> None:
        """row_slots: (slot or None, number of rows) per chunk, in the step's row order."""
        present = sorted({slot for slot, _ in row_slots if slot is not None})
        if not present:
            self.end_step()
            return
        column = {slot: i for i, slot in enumerate(present)}
        rows, cols, first = [], [], 0
        for slot, num in row_slots:
            if slot is not None:
                rows.extend(range(first, first + num))
                cols.extend([column[slot]] * num)
            first += num
        onehot = torch.zeros(first, len(present), dtype=self.modules[(0, "o_proj")].lora_a.dtype, device=device)
        onehot[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = 1.0
        self.rows.slots = frozenset(present)
        self.rows.index = None if len(present) == self.max_loras else torch.tensor(present, device=device)
        self.rows.onehot = onehot

    def end_step(self) -> None:
        self.rows.slots, self.rows.index, self.rows.onehot = frozenset(), None, None
