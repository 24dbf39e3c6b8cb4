"""Runs one scheduled step: build inputs, forward, logits, sample.

Inputs are assembled as Python lists and cross to the device once per field.
Only sequences whose chunk completes them need logits, so the LM head runs on
those rows alone (a prompt chunk in the middle of a long prompt needs none).
"""

from __future__ import annotations

import torch

from selfhost.engine.paged_cache import PagedKVCache, StepMetadata
from selfhost.engine.scheduler import ScheduledChunk
from selfhost.layers.sampler import SampleResult, sample
from selfhost.models.decoder import CausalLM


class ModelRunner:
    def __init__(self, model: CausalLM, cache: PagedKVCache, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prepare(self, chunks: list[ScheduledChunk]) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        single_tables: list[list[int]] = []
        single_lens: list[int] = []
        multi: list[tuple[int, int, int, list[int]]] = []
        for chunk in chunks:
            seq, start, num = chunk.seq, chunk.start, chunk.num_tokens
            input_ids.extend(seq.token_ids[start : start + num])
            positions.extend(range(start, start + num))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + num))
            if num == 1:
                single_tables.append(table)
                single_lens.append(start + 1)
            else:
                multi.append((len(input_ids) - num, num, start, table))
        # Pad tables only to the longest context in the step, not the longest table.
        max_blocks = -(-max(single_lens, default=0) // bs)
        meta = StepMetadata(
            slot_mapping=self._tensor(slots),
            num_single=len(single_tables),
            single_block_tables=self._tensor([t[:max_blocks] + [0] * (max_blocks - len(t)) for t in single_tables])
            if single_tables
            else None,
            single_context_lens=self._tensor(single_lens) if single_lens else None,
            chunks=[(first, num, start, self._tensor(table)) for first, num, start, table in multi],
        )
        return self._tensor(input_ids), self._tensor(positions), meta

    @torch.inference_mode()
    def run(self, chunks: list[ScheduledChunk]) -> tuple[list[ScheduledChunk], SampleResult | None]:
        """Forward the step; returns the chunks that produced a token and the sampled tokens."""
        # Single-token queries first: they are attended as one batch (see paged_cache).
        chunks = sorted(chunks, key=lambda c: c.num_tokens != 1)
        input_ids, positions, meta = self._prepare(chunks)
        self.cache.meta = meta
        hidden = self.model(input_ids, positions, self.cache)
        self.cache.meta = None
        ends, rows, finishing = 0, [], []
        for chunk in chunks:
            ends += chunk.num_tokens
            if chunk.completes_sequence:
                rows.append(ends - 1)
                finishing.append(chunk)
        if not finishing:
            return [], None
        logits = self.model.compute_logits(hidden[rows] if len(rows) < hidden.shape[0] else hidden)
        return finishing, sample(logits, [c.seq.sampler_row for c in finishing])
