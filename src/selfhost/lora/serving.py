"""Many adapters on one base in one batch: adapter slots and the gathered low-rank product.

Every adaptable projection of the served model is wrapped once in a
`MultiLoRALinear`. It keeps the A and B of every loaded adapter packed side by
side at their own ranks, columns grouped by shard of the fused projection
(q/k/v, gate/up) and, within a shard, by slot:

    low = x @ A_packed                        (T, C)   every loaded adapter's x A^T at once
    low *= onehot(slot of each row)[:, col]   (T, C)   each row keeps its own adapter's columns
    out[:, shard] += low[:, shard cols] @ B   (T, shard rows), one product per shard

with C the sum of the loaded adapters' ranks over the shards they adapt. The
base product runs once for the whole batch; the adapters cost dense products
and a mask whatever the mix of adapters, with no Python loop over requests and
no padding of small ranks to the largest. A projection none of the step's
adapters touches is skipped. Columns of loaded adapters absent from the step
are computed and masked away: cheap at LoRA ranks, and it keeps the step free
of per-step gathers.

`AdapterSlots` decides which adapter is in which of `max_loras` slots: loaded
on first use, evicted least recently used among those no running request
holds. Adapters can be added and removed while serving (`add`, `remove`, from
any thread); the packed weights only ever change on the thread that runs the
engine's steps (in `acquire` and `begin_step`).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from selfhost.errors import InvalidParameterError
from selfhost.lora.adapter_format import TARGET_MODULES, Adapter, read_adapter
from selfhost.lora.apply import LoRALinear, check_fits
from selfhost.lora.errors import AdapterError, AdapterSlotsBusyError
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
        self.onehot: torch.Tensor | None = None  # (T, max_loras) 1.0 at a row's slot; None: all rows are the base


# A slot's weights in one projection: per shard, (A (r, in), scale * B^T (r, shard rows)) or None.
SlotBlocks = list[tuple[torch.Tensor, torch.Tensor] | None]


class MultiLoRALinear(nn.Module):
    """The base projection plus, for each row, the low-rank product of its own adapter."""

    def __init__(self, base: nn.Module, rows: StepRows, shard_rows: list[tuple[int, int]], dtype: torch.dtype,
                 device: torch.device):
        super().__init__()
        self.base, self.rows, self.shard_rows = base, rows, shard_rows
        self.dtype, self.device = dtype, device
        self.blocks: dict[int, SlotBlocks] = {}  # slot -> its weights here (views into the packed tensors)
        self._pack()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor, num_threads: int = 1) -> torch.Tensor:
        out = self.base.forward(x, num_threads)  # (T, out)
        rows = self.rows
        if rows.onehot is None or self.filled.isdisjoint(rows.slots):
            return out
        low = x.to(self.dtype) @ self.lora_a  # (T, C)
        low *= rows.onehot.index_select(1, self.column_slot)  # (T, C): a row's own adapter's columns only
        for (first, last), (start, end), b in self.shard_products:  # at most 3 (q, k, v)
            if out.dtype == self.dtype:
                out[:, start:end].addmm_(low[:, first:last], b)
            else:
                out[:, start:end] += (low[:, first:last] @ b).to(out.dtype)
        return out

    @torch.no_grad()
    def load_slot(self, slot: int, shards: dict[int, tuple[torch.Tensor, torch.Tensor, float]]) -> None:
        """Put an adapter in `slot`: shard index -> (A (r, in), B (rows, r), scale); no shards empties it.

        A B with as many rows as the whole projection (a checkpoint that fuses q/k/v itself) is
        split over the shards, each with the same A."""
        blocks: SlotBlocks = [None] * len(self.shard_rows)
        for shard, (a, b, scale) in shards.items():
            whole = b.shape[0] == self.base.out_features and len(self.shard_rows) > 1
            for s in range(len(self.shard_rows)) if whole else [shard]:
                start, end = self.shard_rows[s]
                rows = b[start:end] if whole else b
                blocks[s] = (a.to(self.device, self.dtype), (rows.t() * scale).to(self.device, self.dtype))
        if any(block is not None for block in blocks):
            self.blocks[slot] = blocks
        else:
            self.blocks.pop(slot, None)
        self._pack()

    def _pack(self) -> None:
        """Lay the slots' A and B side by side: columns by shard, then by slot (setup time, not per step)."""
        a_parts, column_slot, products, spans, b_of_shard = [], [], [], [], {}
        for shard, rows in enumerate(self.shard_rows):
            first, b_parts = len(column_slot), []
            for slot in sorted(self.blocks):
                block = self.blocks[slot][shard]
                if block is not None:
                    rank = block[0].shape[0]
                    spans.append((slot, shard, len(column_slot), len(column_slot) - first, rank))
                    a_parts.append(block[0])
                    b_parts.append(block[1])
                    column_slot += [slot] * rank
            if b_parts:
                b_of_shard[shard] = torch.cat(b_parts)  # (this shard's columns, its rows)
                products.append(((first, len(column_slot)), rows, b_of_shard[shard]))
        self.lora_a = (torch.cat(a_parts).t().contiguous() if a_parts  # (in, C)
                       else torch.zeros(self.base.in_features, 0, dtype=self.dtype, device=self.device))
        self.column_slot = torch.tensor(column_slot, dtype=torch.long, device=self.device)  # (C,)
        self.shard_products = products
        self.filled = set(self.blocks)
        # The blocks become views of the packed copies, so each adapter's weights are held once.
        for slot, shard, column, b_row, rank in spans:
            a, b = self.lora_a[:, column:column + rank].t(), b_of_shard[shard][b_row:b_row + rank]
            self.blocks[slot][shard] = (a, b)


@dataclass(frozen=True)
class AdapterInfo:
    """A registered adapter: where it comes from and what it adapts."""

    folder: Path
    rank: int
    target_modules: tuple[str, ...]
    num_params: int


def describe(folder: Path, adapter: Adapter) -> AdapterInfo:
    return AdapterInfo(Path(folder), max(m.rank for m in adapter.modules.values()),
                       tuple(sorted({module for _, module in adapter.modules})), adapter.num_params)


class AdapterSlots:
    """Named adapters (folders) and the `max_loras` slots they are loaded into on demand.

    `allow_pickle`: accept folders whose weights are `adapter_model.bin` (a pickle, which can run
    code when read); otherwise only `adapter_model.safetensors`.
    """

    def __init__(self, model: CausalLM, adapters: dict[str, Path], max_loras: int = 4, max_rank: int = 16,
                 allow_pickle: bool = False):
        if not isinstance(model, CausalLM):
            raise InvalidParameterError("LoRA adapters need an architecture selfhost runs natively, "
                                        "not the transformers fallback")
        if max_loras < 1:
            raise InvalidParameterError(f"max_loras={max_loras} must be at least 1")
        if max_rank < 1:
            raise InvalidParameterError(f"max_lora_rank={max_rank} must be at least 1")
        if any(isinstance(m, LoRALinear) for m in model.modules()):
            raise InvalidParameterError("the model already carries a single adapter; serve adapters through slots")
        self.model, self.max_loras, self.max_rank, self.allow_pickle = model, max_loras, max_rank, allow_pickle
        self._lock = threading.Lock()  # the tables below; `add`/`remove` may come from any thread
        self.folders: dict[str, Path] = {}
        self.info: dict[str, AdapterInfo] = {}  # what was found in each folder read so far
        self._staged: OrderedDict[str, Adapter] = OrderedDict()  # read and checked, waiting for a slot
        self._names_used: set[str] = set()
        self.users = [0] * max_loras  # running requests per slot
        self.loaded: OrderedDict[str, int] = OrderedDict()  # name -> slot, least recently used first
        self._retired: set[int] = set()  # slots of removed adapters, emptied once no request holds them
        for name, folder in adapters.items():
            self.register(name, folder)
        self.rows = StepRows()
        self.modules: dict[tuple[int, str], MultiLoRALinear] = {}
        # The activations' dtype and device: the final norm's (embeddings and head may be quantized).
        dtype, device = model.model.norm.weight.dtype, model.model.norm.weight.device
        slices = shard_slices(model.spec)
        for layer_idx, layer in enumerate(model.model.layers):
            for fused, members in FUSED_SHARDS.items():
                parent = layer.self_attn if TARGET_MODULES[members[0]] == "self_attn" else layer.mlp
                base = getattr(parent, fused)
                wrapped = MultiLoRALinear(base, self.rows, slices.get(fused, [(0, base.out_features)]), dtype, device)
                setattr(parent, fused, wrapped)
                self.modules[(layer_idx, fused)] = wrapped

    # -- the table of names (any thread) ---------------------------------------

    def register(self, name: str, folder: Path) -> None:
        """Name a folder; it is read when a request first uses it (`add` reads and checks it now)."""
        folder = self._check_name(name, folder)
        with self._lock:
            self._register_locked(name, folder)

    def add(self, name: str, folder: Path) -> tuple[str, AdapterInfo]:
        """Read and check `folder` now (on the caller's thread) and register it; returns the key
        requests name it by, and what it holds. Raises AdapterError, and then registers nothing.

        The key is `name`, unless an adapter of that name was removed before: then a fresh key, so
        prefix-cache entries made with the old weights (keyed by adapter) are never reused."""
        folder = self._check_name(name, folder)
        adapter = self._read(folder, name)
        with self._lock:
            if name in self.folders:
                raise AdapterError(f"an adapter named {name!r} is already loaded; remove it first")
            key, n = name, 1
            while key in self._names_used:
                n += 1
                key = f"{name}#{n}"
            self._register_locked(key, folder)
            self._stage_locked(key, adapter)
            return key, self.info[key]

    def prefetch(self, key: str) -> AdapterInfo:
        """Read and check a registered adapter now, so its first request does not wait for the disk
        (nothing to do when it is loaded, or read and waiting for a slot)."""
        with self._lock:
            if key not in self.folders:
                raise InvalidParameterError(f"unknown adapter {key!r}", param="lora")
            folder = self.folders[key]
            if (key in self.loaded or key in self._staged) and key in self.info:
                return self.info[key]
        adapter = self._read(folder, key)
        with self._lock:
            if self.folders.get(key) == folder:
                self._stage_locked(key, adapter)
        return self.info.get(key) or describe(folder, adapter)

    @staticmethod
    def _check_name(name: str, folder: Path) -> Path:
        if not name or name != name.strip():
            raise InvalidParameterError(f"adapter name {name!r} must be non-empty, without surrounding spaces")
        folder = Path(folder)
        if not folder.is_dir():
            raise AdapterError(f"adapter {name!r}: {folder} is not a folder")
        return folder

    def _register_locked(self, name: str, folder: Path) -> None:
        if name in self.folders:
            raise AdapterError(f"an adapter named {name!r} is already registered")
        self.folders[name] = folder
        self._names_used.add(name)

    def _stage_locked(self, key: str, adapter: Adapter) -> None:
        # Read off the engine's thread; the first load into a slot takes it from here. At most
        # max_loras wait (the oldest is dropped, and read again from its folder when first used).
        self.info[key] = describe(self.folders[key], adapter)
        self._staged[key] = adapter
        while len(self._staged) > self.max_loras:
            self._staged.popitem(last=False)

    def remove(self, key: str) -> None:
        """Forget an adapter: new requests cannot name it; running ones finish with it."""
        with self._lock:
            if self.folders.pop(key, None) is None:
                raise InvalidParameterError(f"unknown adapter {key!r}", param="lora")
            self.info.pop(key, None)
            self._staged.pop(key, None)
            slot = self.loaded.pop(key, None)
            if slot is not None:
                self._retired.add(slot)

    @property
    def names(self) -> list[str]:
        return sorted(self.folders)

    def can_acquire(self, key: str) -> bool:
        """Whether `acquire(key)` would find a slot now (a hint for admission: another thread may take it)."""
        with self._lock:
            return key in self.loaded or self._free_slot_locked() is not None

    # -- slots (the engine's thread) --------------------------------------------

    def acquire(self, key: str) -> int:
        """The slot holding adapter `key` (loaded now if needed), held until `release`.

        Called on the engine's thread, the only one that changes the packed weights; the lock
        covers the tables alone, so a server thread asking `can_acquire` never waits for a load."""
        self._empty_retired()
        with self._lock:
            if key not in self.folders:
                raise InvalidParameterError(f"unknown adapter {key!r}; loaded: {', '.join(self.names) or 'none'}",
                                            param="lora")
            if key in self.loaded:
                self.loaded.move_to_end(key)
                slot = self.loaded[key]
                self.users[slot] += 1
                return slot
            slot = self._free_slot_locked()
            if slot is None:
                raise AdapterSlotsBusyError(f"all {self.max_loras} adapter slots are held by running requests; "
                                            "retry when some finish, or raise max_loras")
            evicted = next((name for name, s in self.loaded.items() if s == slot), None)
            if evicted is not None:
                del self.loaded[evicted]
            self.users[slot] += 1  # reserved while it loads
            folder, adapter = self.folders[key], self._staged.pop(key, None)
        try:
            self._fill(slot, adapter or self._read(folder, key))
        except BaseException:
            with self._lock:
                self.users[slot] -= 1
                self._retired.add(slot)  # whatever it holds now is emptied before the slot is used again
            raise
        with self._lock:
            if self.folders.get(key) == folder:
                self.loaded[key] = slot
            else:  # removed while it loaded: this request finishes with it, then the slot empties
                self._retired.add(slot)
        return slot

    def release(self, slot: int) -> None:
        with self._lock:
            assert self.users[slot] > 0, slot
            self.users[slot] -= 1

    def _free_slot_locked(self) -> int | None:
        """An empty slot, else the least recently used unheld one; None when every slot is held."""
        taken = set(self.loaded.values()) | {slot for slot, users in enumerate(self.users) if users > 0}
        for slot in range(self.max_loras):
            if slot not in taken:
                return slot
        return next((slot for slot in self.loaded.values() if self.users[slot] == 0), None)

    def _empty_retired(self) -> None:
        """Empty the slots of removed adapters that no request holds any more (engine thread)."""
        if not self._retired:
            return
        with self._lock:
            done = [s for s in self._retired if self.users[s] == 0 and s not in self.loaded.values()]
            self._retired.difference_update(done)
        for slot in done:
            for wrapped in self.modules.values():
                if slot in wrapped.filled:
                    wrapped.load_slot(slot, {})

    def _read(self, folder: Path, name: str) -> Adapter:
        adapter = read_adapter(folder, allow_pickle=self.allow_pickle)
        check_fits(adapter, self.model.spec)
        rank = max(m.rank for m in adapter.modules.values())
        if rank > self.max_rank:
            raise AdapterError(f"adapter {name!r} has rank {rank}, more than max_lora_rank={self.max_rank}")
        return adapter

    def _fill(self, slot: int, adapter: Adapter) -> None:
        """Put `adapter` in `slot` of every projection (and take the slot's previous adapter out)."""
        per_module: dict[tuple[int, str], dict] = {}
        for (layer_idx, module), m in adapter.modules.items():
            fused, shard = PACKED_WEIGHTS.get(module, (module, 0))
            per_module.setdefault((layer_idx, fused), {})[shard] = (m.lora_a, m.lora_b, m.scale)
        for key, wrapped in self.modules.items():
            if key in per_module or slot in wrapped.filled:
                wrapped.load_slot(slot, per_module.get(key, {}))

    def begin_step(self, row_slots: list[tuple[int | None, int]], device: torch.device) -> None:
        """row_slots: (slot or None, number of rows) per chunk, in the step's row order."""
        self._empty_retired()
        present = {slot for slot, _ in row_slots if slot is not None}
        if not present:
            self.end_step()
            return
        rows, cols, first = [], [], 0
        for slot, num in row_slots:
            if slot is not None:
                rows.extend(range(first, first + num))
                cols.extend([slot] * num)
            first += num
        onehot = torch.zeros(first, self.max_loras, dtype=self.modules[(0, "o_proj")].dtype, device=device)
        onehot[torch.tensor(rows, device=device), torch.tensor(cols, device=device)] = 1.0
        self.rows.slots = frozenset(present)
        self.rows.onehot = onehot

    def end_step(self) -> None:
        self.rows.slots, self.rows.onehot = frozenset(), None
