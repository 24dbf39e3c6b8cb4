"""A draft model: a smaller checkpoint with the target's tokenizer proposes the next tokens.

It runs on the engine's own parts (a ModelRunner over its own paged KV cache and block
manager), one pass per proposed token, batched over the speculating sequences. Its cache
follows each sequence: a first pass catches up on the tokens it has not seen (the prompt the
first time, afterwards the one or two tokens the last verification appended), then each
further pass feeds the token it just proposed. After a verification the draft keeps the KV
of the proposals that were accepted and drops the rest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from selfhost.engine.block_manager import BlockManager
from selfhost.engine.model_runner import ModelRunner
from selfhost.engine.kv_stores import kv_cache_type
from selfhost.engine.scheduler import ScheduledChunk
from selfhost.engine.sequence import Sequence
from selfhost.layers.sampler import draw, filter_logits
from selfhost.layers.bf16_linear import Bf16Linear, best_layout, c_kernel_available, measure_few_rows_max, tiles_available
from selfhost.layers.linear import Linear
from selfhost.models.decoder import CausalLM
from selfhost.speculative.verify import row_argmax

# A first pass of at most this many tokens runs as single-token queries (see DraftProposer._catch_up).
CATCH_UP_AS_QUERIES = 8


class DraftSequence:
    """The draft model's view of a sequence: the same token list, its own KV blocks."""

    needs_prompt_logprobs = False
    lora_slot = None
    grammar = None

    def __init__(self, target: Sequence):
        self.token_ids = target.token_ids  # shared, not copied: the target appends, the draft reads
        self.sampler_row = target.sampler_row
        self.block_table: list[int] = []
        self.block_hashes: list[bytes] = []
        self.num_computed_tokens = 0
        self.fed_from = 0  # where the proposals fed to the draft began (the sequence's length then)
        self.fed: list[int] = []  # proposals the draft computed KV for (all but the last proposed)

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)


class PassFields:
    """The int64 buffer a fused call of greedy passes reads and writes (DecodeLayers.greedy_passes), kept
    across calls (grown by doubling)."""

    def __init__(self):
        self.array = np.zeros(0, dtype=np.int64)
        self.address = 0

    def layout(self, size: int) -> np.ndarray:
        if size > self.array.size:
            self.array = np.zeros(max(size, 2 * self.array.size), dtype=np.int64)
            self.address = self.array.ctypes.data
        return self.array


@dataclass(frozen=True)
class Proposal:
    tokens: list[int]
    draft_probs: torch.Tensor | None  # (len(tokens), vocab) q rows for sampled requests; None for greedy


@torch.no_grad()
def _bf16_output_head(model: CausalLM) -> None:
    """Run a CPU draft's output head on bf16 weights (its layers stay as loaded).

    A small draft's pass is dominated by its output head (vocabulary x hidden: 0.1 ms of a 0.3 ms pass
    for the demo model's one-layer draft) and per-pass overhead; bf16 halves the bytes the head reads.
    Its logits only choose proposals, and a sampled request's q is computed from these same logits,
    so verification stays exact."""
    head = model.lm_head
    if type(head) is not Linear or head.weight.device.type != "cpu" or head.weight.dtype != torch.float32:
        return
    if not (tiles_available() or c_kernel_available()):
        return
    layout = best_layout()
    spec = model.spec
    model.lm_head = Bf16Linear.from_linear(head, measure_few_rows_max(spec.hidden_size, spec.vocab_size, layout), layout)


class DraftProposer:
    def __init__(self, model: CausalLM, num_blocks: int, block_size: int, dtype: torch.dtype,
                 device: torch.device):
        self.model = model
        _bf16_output_head(model)
        self.cache = kv_cache_type(model.spec)(model.spec, num_blocks, block_size, dtype, device)  # the draft's own kind
        self.blocks = BlockManager(num_blocks, block_size, enable_prefix_caching=False)
        self.runner = ModelRunner(model, self.cache, device)
        # (one-call decode runner, head kind) where greedy passes run in one C call; None: pass by pass.
        self._fused: tuple | None | bool = device.type == "cpu"  # True: not looked for yet
        self._fields = PassFields()
        self.caught_up_prompt = False  # whether the last `propose` caught a sequence up on a prompt's worth

    def _state(self, seq: Sequence) -> DraftSequence:
        state = seq.speculation.draft
        if state is None:
            state = seq.speculation.draft = DraftSequence(seq)
        return state

    def _sync(self, state: DraftSequence) -> None:
        """Keep the KV of the fed proposals the sequence accepted; drop the rest."""
        tokens, kept = state.token_ids, 0
        while (kept < len(state.fed) and state.fed_from + kept < len(tokens)
               and tokens[state.fed_from + kept] == state.fed[kept]):
            kept += 1
        limit = state.num_tokens - 1  # the last token is always fed again: its row proposes the next one
        if state.fed:
            limit = min(limit, state.fed_from + kept)
        state.num_computed_tokens = min(state.num_computed_tokens, limit)
        self.blocks.trim(state)
        state.fed = []

    def propose(self, seqs: list[Sequence], lengths: list[int]) -> list[Proposal]:
        """Up to lengths[i] tokens for seqs[i]; a sequence the draft cannot hold gets none."""
        states, wanted = [], []
        for seq, k in zip(seqs, lengths):
            state = self._state(seq)
            self._sync(state)
            end = state.num_tokens + k - 1  # KV the passes write: the sequence and all but the last proposal
            if k < 1 or end > self.model.max_len or not self.blocks.can_grow(state, end - state.num_computed_tokens):
                continue
            self.blocks.grow(state, end - state.num_computed_tokens)
            state.fed_from = state.num_tokens
            states.append(state)
            wanted.append(k)
        # A prompt-sized catch-up (a sequence's first proposal, or the first after a long pause) is a one-off:
        # the speculator leaves such a call out of what it expects a pass to cost.
        self.caught_up_prompt = any(s.num_tokens - s.num_computed_tokens > CATCH_UP_AS_QUERIES for s in states)
        fused = self._fused_runner() if states and all(s.sampler_row.is_greedy for s in states) else None
        if fused is not None:
            by_seq = self._greedy_passes(fused, states, wanted)
        else:
            by_seq = self._passes(states, wanted)
        out = []
        for seq in seqs:
            tokens, qs = by_seq.get(id(seq.speculation.draft), ([], []))
            out.append(Proposal(tokens, torch.stack(qs) if qs else None))
        return out

    def _passes(self, states: list[DraftSequence], wanted: list[int]) -> dict[int, tuple[list[int], list]]:
        """Pass by pass through the engine's runner: (proposals, q rows) by id of each state."""
        proposals: dict[int, list[int]] = {id(s): [] for s in states}
        probs: dict[int, list[torch.Tensor]] = {id(s): [] for s in states}
        # Pass 0: catch up on the sequence's own tokens; pass j: feed the token proposed by pass j - 1.
        chunks = [self._catch_up(s) for s in states]
        for step in range(max(wanted, default=0)):
            if step > 0:
                chunks = [ScheduledChunk(s, s.fed_from + step - 1, 1, (proposals[id(s)][-1],))
                          for s, k in zip(states, wanted) if k > step]
            logits = self.runner.last_logits(chunks)
            best = row_argmax(logits)
            for chunk, row, argmax in zip(chunks, logits, best):
                state = chunk.seq
                token, q = (argmax, None) if state.sampler_row.is_greedy else self._draw(state, row)
                proposals[id(state)].append(token)
                if q is not None:
                    probs[id(state)].append(q)
                if step > 0:
                    state.fed.append(chunk.proposed[0])
                state.num_computed_tokens = chunk.start + chunk.num_tokens
        return {id(s): (proposals[id(s)], probs[id(s)]) for s in states}

    def _fused_runner(self) -> tuple | None:
        """(the draft's one-call decode runner, its head's kind) where every greedy pass can run in one C call."""
        if self._fused is True:
            runner = self.runner._decode_runner()
            head_kind = runner.head_kind(self.model.lm_head) if runner is not None else None
            self._fused = (runner, head_kind) if head_kind is not None else None
        return self._fused

    def _greedy_passes(self, fused: tuple, states: list[DraftSequence],
                       wanted: list[int]) -> dict[int, tuple[list[int], list]]:
        """`_passes` for greedy sequences in one C call (DecodeLayers.greedy_passes): the same passes over the
        same cache. Python right after the C kernels runs cold (a torch call ~10 us), so the call's fields
        go into one int64 buffer kept across calls: ~60 us of Python a call where tensors had cost ~250."""
        runner, head_kind = fused
        order = sorted(range(len(states)), key=lambda i: -wanted[i])  # the C call's passes take a prefix of rows
        states, wanted = [states[i] for i in order], [wanted[i] for i in order]
        n, passes, bs = len(states), wanted[0], self.blocks.block_size
        lengths = [s.num_tokens for s in states]  # where each first proposal goes
        froms = [s.num_computed_tokens for s in states]
        width = -(-max(length + k - 1 for length, k in zip(lengths, wanted)) // bs)
        # A prompt to catch up on (the first pass of a sequence) goes through the engine's general path.
        rows0 = sum(lengths) - sum(froms) if all(a - b <= CATCH_UP_AS_QUERIES for a, b in zip(lengths, froms)) else 0
        fields = self._fields.layout(3 * n + n * width + n * passes + rows0)
        fields[:n], fields[n:2 * n], fields[2 * n:3 * n] = lengths, wanted, froms
        at = 3 * n
        for state in states:
            row = state.block_table[:width]
            fields[at:at + len(row)] = row
            fields[at + len(row):at + width] = 0
            at += width
        proposals_at = at
        if rows0:
            ids = []
            for state, start, length in zip(states, froms, lengths):
                ids += state.token_ids[start:length]
            fields[proposals_at + n * passes:proposals_at + n * passes + rows0] = ids
        else:
            logits = self.runner.last_logits([self._catch_up(s) for s in states])
            fields[proposals_at:proposals_at + n * passes:passes] = row_argmax(logits)
        if rows0 or passes > 1:
            threads = self.runner.cpu_threads
            num_threads = threads.begin(max(rows0, n))
            try:
                runner.greedy_passes(self.model.lm_head, head_kind, self._fields.address, n, passes, width, rows0,
                                     num_threads)
            finally:
                threads.end()
        proposed = fields[proposals_at:proposals_at + n * passes].tolist()
        out = {}
        for i, (state, length, k) in enumerate(zip(states, lengths, wanted)):
            tokens = proposed[i * passes:i * passes + k]
            state.fed = tokens[:-1]  # passes 1.. fed all but the last proposal
            state.num_computed_tokens = length + k - 1
            out[id(state)] = (tokens, [])
        return out

    @staticmethod
    def _catch_up(state: DraftSequence) -> ScheduledChunk:
        """The first pass's chunk: the tokens the draft has no KV for (after a verification, the one or two
        it appended). A few of them go as one token and its followers, like a verification, so that on CPU
        they run as single queries through the one-call decode runner rather than as a prompt chunk."""
        start, num = state.num_computed_tokens, state.num_tokens - state.num_computed_tokens
        if 1 < num <= CATCH_UP_AS_QUERIES:
            return ScheduledChunk(state, start, num, tuple(state.token_ids[start + 1:start + num]))
        return ScheduledChunk(state, start, num)

    @staticmethod
    def _draw(state: DraftSequence, logits: torch.Tensor) -> tuple[int, torch.Tensor]:
        """A sampled request's draft token: a draw from q (the request's own temperature and filters over
        the draft's logits), with q kept for the rejection test."""
        row = state.sampler_row
        q = filter_logits(logits.unsqueeze(0).float(), [row]).softmax(dim=-1)[0]
        return draw(q, row.generator(q.device)), q

    def release(self, seq: Sequence) -> None:
        if seq.speculation is not None and seq.speculation.draft is not None:
            self.blocks.free(seq.speculation.draft)
            seq.speculation.draft = None
