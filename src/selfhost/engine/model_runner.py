"""Runs one scheduled step: build inputs, forward, logits, sample.

Inputs are assembled as Python lists and cross to the device once per field.
Only sequences whose chunk completes them need logits, so the LM head runs on
those rows alone (a prompt chunk in the middle of a long prompt needs none).
The exception is a request that asks for prompt logprobs: its prefill rows go
through the LM head too, in slices, and only when such a request is in the step.

Decode steps (every chunk one token that completes its sequence, some followed by proposed tokens
to verify) take a lean path on CPU:
their inputs are written into buffers kept across steps (decode_inputs.py) and `_run_decode`
skips the general bookkeeping. At a ~500 us demo-model token, Python around the model was
~200 us of it; outputs are the general path's, bit for bit (tests/engine/test_decode_path.py).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from selfhost.engine.decode_head import DecodeHead
from selfhost.engine.decode_inputs import DecodeInputs
from selfhost.engine.decode_layers import DecodeLayers
from selfhost.engine.paged_cache import PagedKVCache, StepMetadata
from selfhost.engine.scheduler import ScheduledChunk
from selfhost.engine.sequence import Sequence
from selfhost.engine.cpu_threads import CpuThreads
from selfhost.layers.sampler import SampleResult, sample, score_tokens
from selfhost.models.decoder import CausalLM
from selfhost.outputs import TokenLogprob

log = logging.getLogger(__name__)

# Prompt rows scored per LM-head call: bounds the (rows, vocab) logits held at once.
SCORE_ROWS_PER_SLICE = 256


@dataclass(frozen=True)
class StepResult:
    finishing: list[ScheduledChunk]  # chunks that produced a token, in `sampled` order
    sampled: SampleResult | None
    # Newly scored prompt tokens per sequence, in prompt order.
    prompt_logprobs: list[tuple[Sequence, list[TokenLogprob]]] = field(default_factory=list)
    # Chunks carrying proposed tokens, each with its (1 + proposals, vocab) logits to verify them against
    # and, where the step found them already, those rows' argmax (the greedy choice at each position).
    verifying: list[tuple[ScheduledChunk, torch.Tensor, list[int] | None]] = field(default_factory=list)


class ModelRunner:
    grammars = None  # the engine's GrammarCompiler: masks for rows with an output constraint
    adapters = None  # the engine's AdapterSlots where LoRA adapters are served: each row's slot per step
    supports_prompt_logprobs = True

    def __init__(self, model: CausalLM, cache: PagedKVCache, device: torch.device):
        self.model = model
        self.cache = cache
        self.device = device
        self.block_size = cache.block_size
        self.cpu_threads = CpuThreads.for_this_process() if device.type == "cpu" else None
        self._layers_runner: DecodeLayers | None | bool = device.type == "cpu"  # True: not looked for yet
        # Steps of single-token chunks write their inputs into buffers kept across steps (CPU tensors);
        # None keeps every step on the general path (`_prepare`, `_run`): the tests' reference.
        self._decode_inputs = DecodeInputs(self.block_size) if device.type == "cpu" else None
        self._decode_head: DecodeHead | None | bool = device.type == "cpu"  # True: not looked for yet

    @property
    def verify_as_single_queries(self) -> bool:
        """Verifications go through the fused decode kernel as single-token queries (it reads each
        query's keys in place, so k + 1 queries cost k + 1 reads of a context a decode step reads once);
        elsewhere they are prompt-like chunks."""
        return self.cache.use_cpu_kernel

    def _is_multi_token_query(self, chunk: ScheduledChunk) -> bool:
        return chunk.num_tokens != 1 and not (chunk.proposed and self.verify_as_single_queries)

    def _tensor(self, values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=self.device)

    def _prepare(
        self, chunks: list[ScheduledChunk], num_threads: int
    ) -> tuple[torch.Tensor, torch.Tensor, StepMetadata]:
        bs = self.block_size
        input_ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        single_tables: list[list[int]] = []
        single_lens: list[int] = []
        multi: list[tuple[int, int, int, list[int]]] = []
        store_first = False
        for chunk in chunks:
            seq, start, num = chunk.seq, chunk.start, chunk.num_tokens
            input_ids.extend(seq.token_ids[start : start + chunk.num_own_tokens])
            input_ids.extend(chunk.proposed)
            positions.extend(range(start, start + num))
            table = seq.block_table
            slots.extend(table[p // bs] * bs + p % bs for p in range(start, start + num))
            if num == 1 or (chunk.proposed and self.verify_as_single_queries):
                # A verification as single-token queries: position start + i sees start + i + 1 keys.
                single_tables.extend([table] * num)
                single_lens.extend(range(start + 1, start + num + 1))
                store_first |= num > 1
            else:
                multi.append((len(input_ids) - num, num, start, table))
        # Pad tables only to the longest context in the step, not the longest table.
        max_blocks = -(-max(single_lens, default=0) // bs)
        # One tensor for the step's fields, sliced into views: each torch.tensor call costs a few us.
        num_tokens = len(input_ids)
        flat = input_ids + positions + slots + single_lens
        for t in single_tables:
            flat.extend(t[:max_blocks])
            flat.extend([0] * (max_blocks - len(t)))
        fields = self._tensor(flat)
        num_single, lens_at = len(single_tables), 3 * num_tokens
        meta = StepMetadata(
            slot_mapping=fields[2 * num_tokens : lens_at],
            num_single=num_single,
            single_block_tables=fields[lens_at + num_single :].view(num_single, max_blocks) if num_single else None,
            single_context_lens=fields[lens_at : lens_at + num_single] if num_single else None,
            chunks=[(first, num, start, self._tensor(table)) for first, num, start, table in multi],
            num_threads=num_threads,
            store_first=store_first,
        )
        return fields[:num_tokens], fields[num_tokens : 2 * num_tokens], meta

    def run(self, chunks: list[ScheduledChunk]) -> StepResult:
        """Forward the step; sample for chunks that complete their sequence, score asked-for prompt rows."""
        if self.cpu_threads is None:
            return self._run(chunks, num_threads=1)
        decode = self._decode_rows(chunks) if self._decode_inputs is not None else None
        if decode is not None:
            return self._run_decode(chunks, *decode)
        with self.cpu_threads.step(sum(c.num_tokens for c in chunks)) as num_threads:
            return self._run(chunks, num_threads)

    def _decode_rows(self, chunks: list[ScheduledChunk]) -> tuple[list, list | None, bool, bool] | None:
        """Each sampled chunk's sampler row, their grammars (None where none is constrained), whether every
        sequence is plain greedy and whether any chunk verifies proposals, when the step is a decode step: every
        chunk one token of its own that completes its sequence and scores no prompt token, some of them
        followed by proposed tokens to verify (as single queries: `verify_as_single_queries`). None for any
        other step (the general path)."""
        rows, grammars, constrained, greedy, verifying = [], [], False, True, False
        for chunk in chunks:
            seq = chunk.seq
            if (chunk.num_own_tokens != 1 or chunk.start + 1 != len(seq.token_ids)
                    or (seq.prompt_logprobs is not None and seq.needs_prompt_logprobs)):
                return None
            if chunk.proposed:  # speculation never proposes for a constrained sequence
                if not self.verify_as_single_queries:
                    return None
                verifying = True
                greedy = greedy and seq.plain_greedy
                continue
            rows.append(seq.sampler_row)
            grammars.append(seq.grammar)
            constrained = constrained or seq.grammar is not None
            greedy = greedy and seq.plain_greedy
        return rows, grammars if constrained else None, greedy and not constrained, verifying

    def _run_decode(self, chunks: list[ScheduledChunk], rows: list, grammars: list | None, greedy: bool,
                    verifying: bool) -> StepResult:
        """`_run` for a decode step: one row per query, in the chunks' order (what `_run` does for such a
        step, without its sort, row bookkeeping and gather; the head into a kept buffer)."""
        threads = self.cpu_threads
        # `step` without its generator's Python
        num_threads = threads.begin(sum(c.num_tokens for c in chunks) if verifying else len(chunks))
        try:
            # torch.inference_mode()'s own guard, entered directly: the decorator's Python (a copy of the
            # mode object per call) cost ~8 us of a decode step here, run cold after the layers.
            with torch._C._InferenceMode(True):
                hidden, from_runner = self._decode_hidden(chunks, num_threads)
                # kernels chosen for the step's sequences: a checked position gets a plain decode's bits
                sequences = len(chunks)
                if self._decode_head is True:
                    self._decode_head = DecodeHead.for_model(self.model)
                # The head takes the runner's states (fp32, 2-D, contiguous by construction) only.
                head = self._decode_head if from_runner and self._decode_head else None
                logits = tokens = None
                if head is not None and greedy:  # every row's argmax found with the logits, in C
                    found = head.greedy(hidden, num_threads, sequences)
                    if found is not None:
                        (logits, _), tokens = found
                elif head is not None:
                    views = head(hidden, num_threads, sequences)
                    logits = views[0] if views is not None else None
                if logits is None:
                    logits = self.model.compute_logits(hidden, num_threads)
                if verifying:
                    return self._split_verified(chunks, logits, tokens, rows, grammars)
                if tokens is not None:
                    return StepResult(chunks, SampleResult(tokens, [None] * len(tokens)))
                masks = self.grammars.step_masks(grammars) if grammars is not None else None
                return StepResult(chunks, sample(logits, rows, masks))
        finally:
            threads.end()

    def _split_verified(self, chunks: list[ScheduledChunk], logits: torch.Tensor, tokens: list[int] | None,
                        rows: list, grammars: list | None) -> StepResult:
        """A decode step with verifications: each verifying chunk's rows go back to be checked, the other
        chunks' last rows are sampled (their sampler `rows` and `grammars` in the chunks' order). `tokens`:
        every row's argmax where the step is all plain greedy (then they are the sampled tokens too)."""
        finishing, sampled_rows, verified, end = [], [], [], 0
        for chunk in chunks:
            first, end = end, end + chunk.num_tokens
            if chunk.proposed:
                verified.append((chunk, logits[first:end], None if tokens is None else tokens[first:end]))
            else:
                finishing.append(chunk)
                sampled_rows.append(first)
        sampled = None
        if finishing and tokens is not None:
            sampled = SampleResult([tokens[i] for i in sampled_rows], [None] * len(sampled_rows))
        elif finishing:
            masks = self.grammars.step_masks(grammars) if grammars is not None else None
            sampled = sample(logits[sampled_rows], rows, masks)
        return StepResult(finishing, sampled, [], verified)

    def _decode_hidden(self, chunks: list[ScheduledChunk], num_threads: int) -> tuple[torch.Tensor, bool]:
        """A decode step's final hidden states, and whether the one-call runner made them: its inputs from
        the kept buffers, then the runner straight away (what CausalLM.forward offers the step first,
        without the module call around it) where the model has no hooks of its own, else the model's forward."""
        input_ids, positions, meta = self._decode_inputs.prepare(chunks, num_threads)
        runner, model = self._decode_runner(), self.model
        if runner is not None and not (model._forward_hooks or model._forward_pre_hooks):
            self.cache.meta = meta
            try:
                hidden = runner(input_ids, positions, self.cache, num_threads, len(chunks))
            finally:
                self.cache.meta = None
            if hidden is not None:
                return hidden, True
        return self._hidden(chunks, input_ids, positions, meta, num_threads), False

    def last_logits(self, chunks: list[ScheduledChunk]) -> torch.Tensor:
        """Forward the step; the logits of each chunk's last row, in `chunks`' order (a draft model's passes)."""
        if self.cpu_threads is None:
            return self._last_logits(chunks, num_threads=1)
        with self.cpu_threads.step(sum(c.num_tokens for c in chunks)) as num_threads:
            return self._last_logits(chunks, num_threads)

    @torch.inference_mode()
    def _last_logits(self, chunks: list[ScheduledChunk], num_threads: int) -> torch.Tensor:
        ordered, hidden = self._forward(chunks, num_threads, _last_rows)
        ends, row_of = 0, {}
        for chunk in ordered:
            ends += chunk.num_tokens
            row_of[id(chunk)] = ends - 1
        return self.model.compute_logits(hidden[[row_of[id(c)] for c in chunks]], num_threads)

    def _forward(self, chunks: list[ScheduledChunk], num_threads: int,
                 rows_read=None) -> tuple[list[ScheduledChunk], torch.Tensor]:
        """The step's hidden states; rows follow the returned order of the chunks. `rows_read(chunks)`,
        given the chunks in that order, names the rows the caller will read: the others are left
        unset past the last layer's attention (CausalLM.forward's output_rows)."""
        if self._decode_inputs is not None and all(c.num_tokens == 1 for c in chunks):
            inputs = self._decode_inputs.prepare(chunks, num_threads)  # all single queries: order kept
        else:
            # Single-token queries first: they are attended as one batch (see paged_cache).
            chunks = sorted(chunks, key=self._is_multi_token_query)
            inputs = self._prepare(chunks, num_threads)
        return chunks, self._hidden(chunks, *inputs, num_threads, rows_read(chunks) if rows_read else None)

    def _hidden(self, chunks: list[ScheduledChunk], input_ids: torch.Tensor, positions: torch.Tensor,
                meta: StepMetadata, num_threads: int, rows: list[int] | None = None) -> torch.Tensor:
        """The model's final hidden states for the step's prepared inputs; with `rows`, only those
        rows are computed past the last layer's attention (a prompt's last layer then multiplies one
        row, not thousands) and the other rows of the result are unset memory that nobody reads.
        Adapters keep every row: their per-row slots are laid out for the whole step."""
        num_tokens = input_ids.shape[0]
        output_rows = None
        if rows is not None and len(rows) < num_tokens and self.adapters is None and isinstance(self.model, CausalLM):
            output_rows = self._tensor(rows or [num_tokens - 1])  # rows read: none, when no chunk ends here
        self.cache.meta = meta
        if self.adapters is not None:
            self.adapters.begin_step([(c.seq.lora_slot, c.num_tokens) for c in chunks], self.device)
        try:
            if output_rows is None:
                return self.model(input_ids, positions, self.cache, num_threads, self._decode_runner())
            read = self.model(input_ids, positions, self.cache, num_threads, self._decode_runner(), output_rows)
        finally:
            self.cache.meta = None
            if self.adapters is not None:
                self.adapters.end_step()
        hidden = read.new_empty((num_tokens, read.shape[1]))
        hidden[output_rows] = read
        return hidden

    def _decode_runner(self) -> DecodeLayers | None:
        """The one-call decode runner for this model and cache, looked for on the first step (after
        any LoRA wrapping of the layers); never with adapters, whose products it does not know."""
        if self.adapters is not None:
            return None
        if self._layers_runner is True:
            self._layers_runner = DecodeLayers.for_model(self.model, self.cache)
            if self._layers_runner is not None:
                log.info("decode steps run every layer in one C call (engine/decode_layers.py, %s products)",
                         self._layers_runner.kind)
        return self._layers_runner or None

    @torch.inference_mode()
    def _run(self, chunks: list[ScheduledChunk], num_threads: int) -> StepResult:
        chunks, hidden = self._forward(chunks, num_threads, _rows_run_reads)
        # Only the rows _rows_run_reads names were computed: a new reader of `hidden` goes there too.
        ends, rows, finishing, scoring, verifying = 0, [], [], [], []
        for chunk in chunks:
            if chunk.seq.needs_prompt_logprobs:
                scoring.append((chunk, ends))
            ends += chunk.num_tokens
            if chunk.proposed:
                # Every row: the one before each proposal checks it, the last gives the token after them.
                verifying.append((chunk, ends - chunk.num_tokens))
            elif chunk.completes_sequence:
                rows.append(ends - 1)
                finishing.append(chunk)
        prompt_logprobs = self._score_prompts(hidden, scoring, num_threads) if scoring else []
        num_sampled = len(rows)
        for chunk, first in verifying:
            rows.extend(range(first, first + chunk.num_tokens))
        if not rows:
            return StepResult([], None, prompt_logprobs)
        in_order = rows == list(range(hidden.shape[0]))  # every row, as laid out: no gather needed
        logits = self.model.compute_logits(hidden if in_order else hidden[rows], num_threads)
        verified, i = [], num_sampled
        for chunk, _ in verifying:
            verified.append((chunk, logits[i:i + chunk.num_tokens], None))
            i += chunk.num_tokens
        sampled = None
        if finishing:
            sampled = sample(logits[:num_sampled], [c.seq.sampler_row for c in finishing],
                             self.grammars.step_masks([c.seq.grammar for c in finishing]))
        return StepResult(finishing, sampled, prompt_logprobs, verified)

    def _score_prompts(
        self, hidden: torch.Tensor, scoring: list[tuple[ScheduledChunk, int]], num_threads: int
    ) -> list[tuple[Sequence, list[TokenLogprob]]]:
        """Log probabilities of the prompt tokens this step's chunks predict (row at position p predicts p + 1)."""
        rows, targets, num_top, owners = [], [], [], []
        for chunk, first_row in scoring:
            seq = chunk.seq
            # Skip tokens already scored: a preempted sequence recomputes its prompt from the start.
            lo = max(chunk.start, len(seq.prompt_logprobs) - 1)
            hi = min(chunk.start + chunk.num_tokens, len(seq.prompt_ids) - 1)
            if hi <= lo:
                continue
            rows.extend(range(first_row + lo - chunk.start, first_row + hi - chunk.start))
            targets.extend(seq.prompt_ids[lo + 1 : hi + 1])
            num_top.extend([seq.params.prompt_logprobs] * (hi - lo))
            owners.append((seq, hi - lo))
        scored: list[TokenLogprob] = []
        for i in range(0, len(rows), SCORE_ROWS_PER_SLICE):
            part = slice(i, i + SCORE_ROWS_PER_SLICE)
            logits = self.model.compute_logits(hidden[rows[part]], num_threads)
            scored.extend(
                TokenLogprob(token_id, logprob, dict(top))
                for token_id, (logprob, top) in zip(targets[part], score_tokens(logits, targets[part], num_top[part]))
            )
        out, i = [], 0
        for seq, num in owners:
            out.append((seq, scored[i : i + num]))
            i += num
        return out


def _rows_run_reads(chunks: list[ScheduledChunk]) -> list[int]:
    """The hidden rows ModelRunner._run reads, the chunks in row order: every row of a chunk that
    scores prompt tokens or verifies proposals, the last row of one that completes its sequence."""
    rows, end = [], 0
    for chunk in chunks:
        first, end = end, end + chunk.num_tokens
        if chunk.seq.needs_prompt_logprobs or chunk.proposed:
            rows.extend(range(first, end))
        elif chunk.completes_sequence:
            rows.append(end - 1)
    return rows


def _last_rows(chunks: list[ScheduledChunk]) -> list[int]:
    """Each chunk's last row, the chunks in row order (a draft model's passes read only these)."""
    rows, end = [], 0
    for chunk in chunks:
        end += chunk.num_tokens
        rows.append(end - 1)
    return rows
