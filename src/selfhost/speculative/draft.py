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

import torch

from selfhost.engine.block_manager import BlockManager
from selfhost.engine.model_runner import ModelRunner
from selfhost.engine.kv_stores import kv_cache_type
from selfhost.engine.scheduler import ScheduledChunk
from selfhost.engine.sequence import Sequence
from selfhost.layers.sampler import filter_logits
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
        same cache, without ~0.2 ms of Python each (a one-layer demo draft's pass is ~40 us of C)."""
        runner, head_kind = fused
        order = sorted(range(len(states)), key=lambda i: -wanted[i])  # the C call's passes take a prefix of rows
        states, wanted = [states[i] for i in order], [wanted[i] for i in order]
        n, passes, bs = len(states), wanted[0], self.blocks.block_size
        starts = [s.num_tokens for s in states]  # where each first proposal goes
        width = -(-max(start + k - 1 for start, k in zip(starts, wanted)) // bs)
        tables = torch.zeros(n, width, dtype=torch.int64)
        for i, state in enumerate(states):
            row = state.block_table[:width]
            tables[i, :len(row)] = torch.tensor(row, dtype=torch.int64)
        tokens = torch.zeros(n, passes, dtype=torch.int64)
        chunks = [self._catch_up(s) for s in states]
        ends = torch.tensor([c.num_tokens for c in chunks], dtype=torch.int64).cumsum(0)
        threads = self.runner.cpu_threads
        with threads.step(int(ends[-1])) as num_threads, torch.inference_mode():
            if all(c.num_tokens == 1 or c.proposed for c in chunks):  # single queries: pass 0 in the call too
                first = self.runner._decode_inputs.prepare(chunks, num_threads)
            else:  # a prompt to catch up on: pass 0 on the general path
                first = None
                tokens[:, 0] = torch.tensor(row_argmax(self.runner._last_logits(chunks, num_threads)))
            if first is not None or passes > 1:
                runner.greedy_passes(self.model.lm_head, head_kind, first, ends - 1, tokens,
                                     torch.tensor(starts, dtype=torch.int64), tables,
                                     torch.tensor(wanted, dtype=torch.int64), num_threads)
        out = {}
        for state, start, k, row in zip(states, starts, wanted, tokens.tolist()):
            proposed = row[:k]
            state.fed = proposed[:-1]  # passes 1.. fed all but the last proposal
            state.num_computed_tokens = start + k - 1
            out[id(state)] = (proposed, [])
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
        return int(torch.multinomial(q, 1, generator=row.generator(q.device))), q

    def release(self, seq: Sequence) -> None:
        if seq.speculation is not None and seq.speculation.draft is not None:
            self.blocks.free(seq.speculation.draft)
            seq.speculation.draft = None
