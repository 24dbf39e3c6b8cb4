"""Decides, every step, which sequences run and how many of their tokens.

Continuous batching: sequences join the running set at any step and leave it
the moment they finish. Running sequences go first (oldest first), so decoding
never stalls behind a long prompt; waiting sequences are admitted in arrival
order while the step's token budget and the sequence cap allow, and long
prompts are split into chunks across steps. When KV blocks run out, the most
recently admitted sequence is preempted: its blocks are released and it is
recomputed later from its tokens so far (full blocks usually come back from
the prefix cache).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from selfhost.engine.block_manager import BlockManager
from selfhost.engine.sequence import Sequence


@dataclass(frozen=True)
class ScheduledChunk:
    seq: Sequence
    start: int  # first token position computed this step
    num_tokens: int  # the sequence's own tokens, then the proposed ones
    # Speculative decoding: tokens proposed after the sequence's last one, verified in this step.
    proposed: tuple[int, ...] = ()

    @property
    def num_own_tokens(self) -> int:
        return self.num_tokens - len(self.proposed)

    @property
    def completes_sequence(self) -> bool:
        """After this chunk every token has KV: the step yields the next token's logits."""
        return self.start + self.num_own_tokens == self.seq.num_tokens


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 admit: Callable[[Sequence], bool] | None = None):
        """admit(seq): whatever else a waiting sequence needs before it runs (a LoRA adapter slot); False: it
        waits, and later arrivals that need nothing it lacks may go ahead of it."""
        self.block_manager = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.admit = admit
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []  # admission order
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> list[ScheduledChunk]:
        budget = self.max_num_batched_tokens
        chunks: list[ScheduledChunk] = []
        scheduled: set[int] = set()
        i = 0
        while i < len(self.running) and budget > 0:
            seq = self.running[i]
            num = min(seq.num_uncomputed, budget)
            proposed = self._fitting_proposal(seq, budget)
            num += len(proposed)
            while not self.block_manager.can_grow(seq, num):
                victim = self._newest_unscheduled(scheduled)
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.block_manager.grow(seq, num)
                chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num, proposed))
                scheduled.add(id(seq))
                budget -= num
                i += 1
        held_back: list[Sequence] = []
        while self.waiting and budget > 0 and len(self.running) < self.max_num_seqs:
            seq = self.waiting[0]
            if self.admit is not None and not self.admit(seq):
                held_back.append(self.waiting.popleft())
                continue
            if not seq.block_table:
                self.block_manager.match_prefix(seq)
            num = min(seq.num_uncomputed, budget)
            if not self.block_manager.can_grow(seq, num):
                self.block_manager.free(seq)  # hand matched blocks back while it waits
                break  # first come, first served: nobody overtakes the head of the queue
            self.waiting.popleft()
            self.block_manager.record_admission(seq)
            self.block_manager.grow(seq, num)
            self.running.append(seq)
            chunks.append(ScheduledChunk(seq, seq.num_computed_tokens, num))
            budget -= num
        self.waiting.extendleft(reversed(held_back))  # still first in line once they can go
        return chunks

    def _fitting_proposal(self, seq: Sequence, budget: int) -> tuple[int, ...]:
        """The tokens proposed for a decoding sequence, when the step's budget and free blocks take
        them all: a proposal never costs another sequence its place or its blocks."""
        proposed = seq.proposed
        if not proposed or seq.num_uncomputed != 1 or 1 + len(proposed) > budget:
            return ()
        if not self.block_manager.can_grow(seq, 1 + len(proposed)):
            return ()
        return tuple(proposed)

    def _newest_unscheduled(self, scheduled: set[int]) -> Sequence:
        for seq in reversed(self.running):
            if id(seq) not in scheduled:
                return seq
        raise AssertionError("a scheduled sequence cannot be preempted")

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.block_manager.free(seq)
        seq.num_preemptions += 1
        self.num_preemptions += 1
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and release its blocks at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
