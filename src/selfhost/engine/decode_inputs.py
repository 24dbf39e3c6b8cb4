"""A decode step's inputs, written into buffers kept from one step to the next (CPU).

When every chunk of a step is a single token (decodes, a prompt's last token), its fields are four
integers per sequence and a padded block table; a verification of k proposed tokens (speculative
decoding, on CPU) is k + 1 such queries of one sequence. `ModelRunner._prepare` builds them as fresh lists and
one fresh tensor each step; at a ~500 us demo-model token that cost ~35-45 us, most of it for values
that did not change (the block tables). Here each field has an int64 buffer that lives as long as the
runner (a numpy view to write it, a torch view of the same memory to hand to the model), the
per-token fields are overwritten each step, and a row's block table is written again only when it
changed: a block was added, another sequence took the row, or the table's width moved.

The values, shapes and table width are exactly those `_prepare` builds (tables padded with block 0
to the longest context in the step), so the model sees the same inputs and outputs are unchanged.
The buffers are rewritten by the next step: the tensors handed out are valid for one step only.
"""

from __future__ import annotations

import numpy as np
import torch

from selfhost.engine.paged_cache import StepMetadata
from selfhost.engine.scheduler import ScheduledChunk


class DecodeInputs:
    """The inputs of steps of single-token queries (decodes, verifications), in buffers reused across steps."""

    def __init__(self, block_size: int):
        self.block_size = block_size
        self._capacity = 0  # rows the per-token buffers hold
        self._shape = (0, 0)  # (rows, width) of the block tables as last written
        self._written: list[list[int] | None] = []  # each row's table as last written ([:width], unpadded)
        self._views: tuple[torch.Tensor, ...] = ()  # the tensors handed out for `_views_shape`
        self._views_shape = (0, 0)
        self._tables = np.zeros(0, dtype=np.int64)
        self._grow(1, 1)

    def _grow(self, rows: int, width: int) -> None:
        """Buffers for at least `rows` tokens and `rows` tables of `width` blocks (doubling, so rare)."""
        if rows > self._capacity:
            self._capacity = max(rows, 2 * self._capacity)
            # ids, positions, slots, context lengths: one row each
            self._fields = np.zeros((4, self._capacity), dtype=np.int64)
            self._fields_t = torch.from_numpy(self._fields)
            # The same memory as flat int64 items: a store through it skips numpy's indexing (~10x cheaper).
            self._items = memoryview(self._fields).cast("B").cast("q")
        if rows * width > self._tables.size:
            self._tables = np.zeros(max(rows * width, 2 * self._tables.size), dtype=np.int64)
            self._tables_t = torch.from_numpy(self._tables)
        self._shape = self._views_shape = (0, 0)  # new buffers: every row is written again, new views made

    def prepare(self, chunks: list[ScheduledChunk], num_threads: int) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        """(input_ids, positions, metadata) of a step of single-token queries, as `_prepare` builds them: chunks
        of one token each, and verifications of proposed tokens (one query per checked position, every key
        of the step written before any query attends, as `_prepare` does with `verify_as_single_queries`)."""
        bs = self.block_size
        ids, positions, slots, tables = [], [], [], []
        verifying = False
        for chunk in chunks:
            seq, start, num = chunk.seq, chunk.start, chunk.num_tokens
            table = seq.block_table
            if num == 1:
                # A draft model's later passes feed the token proposed by the pass before (not yet the sequence's).
                ids.append(chunk.proposed[0] if chunk.proposed else seq.token_ids[start])
                positions.append(start)
                slots.append(table[start // bs] * bs + start % bs)
                tables.append(table)
                continue
            verifying = True  # the sequence's own token, then the proposals it checks
            ids.extend(seq.token_ids[start:start + chunk.num_own_tokens])
            ids.extend(chunk.proposed)
            end = start + num
            positions.extend(range(start, end))
            first, last = start // bs, (end - 1) // bs
            if first == last:  # one block (the usual case): consecutive slots
                slots.extend(range(table[first] * bs + start % bs, table[first] * bs + (end - 1) % bs + 1))
            else:
                slots.extend(table[position // bs] * bs + position % bs for position in range(start, end))
            tables.extend([table] * num)
        rows = len(ids)
        max_len = max(positions) + 1
        width = -(-max_len // bs)  # tables padded to the longest context in the step, as _prepare does
        if rows > self._capacity or rows * width > self._tables.size:
            self._grow(rows, width)
        fields = self._fields
        if rows == 1:  # one sequence: four item stores beat four list conversions
            items, cap = self._items, self._capacity
            items[0], items[cap], items[2 * cap], items[3 * cap] = ids[0], positions[0], slots[0], max_len
        else:
            fields[0, :rows], fields[1, :rows], fields[2, :rows] = ids, positions, slots
            fields[3, :rows] = positions
            fields[3, :rows] += 1  # each query sees its own key and every one before it
        self._write_tables(tables, rows, width)
        if self._views_shape != (rows, width):
            self._views_shape, ft = (rows, width), self._fields_t
            self._views = (ft[0, :rows], ft[1, :rows], ft[2, :rows], ft[3, :rows],
                           self._tables_t[: rows * width].view(rows, width))
        input_ids, positions_t, slot_mapping, context_lens, block_tables = self._views
        meta = StepMetadata(
            slot_mapping=slot_mapping,
            num_single=rows,
            single_block_tables=block_tables,
            single_context_lens=context_lens,
            chunks=[],
            num_threads=num_threads,
            store_first=verifying,
        )
        return input_ids, positions_t, meta

    def _write_tables(self, tables: list[list[int]], rows: int, width: int) -> None:
        """Write the rows whose table differs from what the buffer holds for them (all, when the shape moved)."""
        reshaped = self._shape != (rows, width)
        if reshaped:
            self._shape = (rows, width)
            self._written = [None] * rows
        buffer, written = self._tables, self._written
        for i, table in enumerate(tables):
            # Compared by value: a table can be rebuilt with the same length (a preempted sequence).
            row = table[:width]
            if written[i] == row:
                continue
            base = i * width
            buffer[base : base + len(row)] = row
            buffer[base + len(row) : base + width] = 0  # padding: block 0, as _prepare pads
            written[i] = row
