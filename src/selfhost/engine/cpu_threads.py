"""How many CPU threads each inference step uses, chosen by measuring.

A decode step on CPU is a few hundred tiny operations plus matrix-vector
products that stream every weight once. Two facts shape the thread counts:

* Tiny torch ops (a 9x64x80 `bmm`, a 576-wide norm) gain nothing from a
  second thread and pay a fork/join each time: 7 us single-threaded against
  30 us with two threads, measured on this class of machine. Steps with few
  tokens therefore run torch ops on one thread.
* A memory-bound matrix-vector product is about 1.8x faster on two threads
  when the cores are free. When another process holds a core, OpenBLAS's
  fixed split made it up to 40x *slower* (each product waits for a
  descheduled worker); selfhost's own kernels (../_cpu_pool.c) fall back to
  one-thread speed instead, but even they lose when the cores are busy.
  Neither setting is right everywhere, so the policy measures: it starts on
  one thread (never the disaster; on all threads where selfhost's own kernels
  do the products), now and then tries the other count for a few steps, and
  keeps whichever made steps faster. A probe that collapses is
  abandoned at once, a losing probe doubles the wait before the next one, and
  a collapse while on all threads (another process woke up) drops straight
  back to one thread. A busy machine pays one slow step now and then.

`SELFHOST_BLAS_THREADS=<n>` pins the matmul thread count instead (to compare,
or when a machine is known to be dedicated).
"""

from __future__ import annotations

import os
import time
import warnings
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from statistics import median
from typing import Callable, Iterator

import torch

# Steps up to this many tokens are memory-bound ("small"): decode batches, short prompts.
SMALL_STEP_MAX_TOKENS = 31
PINNED_BLAS_THREADS = os.environ.get("SELFHOST_BLAS_THREADS")


@dataclass(frozen=True)
class ProbeSchedule:
    window: int = 4  # steps per measurement of one setting
    first_probe_after: int = 8  # steps on one thread before the first try of all threads
    # On all threads, trying one thread again is rarely worth its slow steps: a collapse
    # already sends the chooser back at once, so this only catches slow drifts.
    first_probe_after_on_fast: int = 128
    max_probe_interval: int = 2048
    min_gain: float = 0.05  # the other setting must be this much faster to switch
    collapse_ratio: float = 3.0  # a probe step this much slower than usual stops the probe


class ThreadChooser:
    """Picks the thread count for one kind of step by timing steps.

    Two candidates: `safe` (one thread, slow but never collapses) and `fast`
    (all threads). `begin()` says which count the next step uses; `end(seconds)`
    records how long it took. Pure bookkeeping: the caller applies the count.
    """

    def __init__(self, safe: int, fast: int, schedule: ProbeSchedule = ProbeSchedule(), start_fast: bool = False):
        self.schedule = schedule
        self.safe, self.fast = safe, fast
        self.current = fast if start_fast else safe
        self._recent = deque(maxlen=schedule.window)  # step times on `current`
        self._probe: list[float] = []
        self._probing = False
        # Steps to wait, while on each setting, before trying the other one.
        self._wait = {safe: schedule.first_probe_after, fast: schedule.first_probe_after_on_fast}
        self._until_probe = self._wait[self.current]

    @property
    def can_probe(self) -> bool:
        return self.safe != self.fast

    @property
    def other(self) -> int:
        return self.fast if self.current == self.safe else self.safe

    def begin(self) -> int:
        if self.can_probe and not self._probing and self._until_probe <= 0 and len(self._recent) == self._recent.maxlen:
            self._probing, self._probe = True, []
        return self.other if self._probing else self.current

    def end(self, seconds: float) -> None:
        usual = median(self._recent) if self._recent else None
        collapsed = usual is not None and seconds > self.schedule.collapse_ratio * usual
        if self._probing:
            self._probe.append(seconds)
            if collapsed:
                self._finish_probe(won=False)
            elif len(self._probe) == self.schedule.window:
                self._finish_probe(won=median(self._probe) < (1 - self.schedule.min_gain) * usual)
            return
        if collapsed and self.current == self.fast and self.can_probe:
            # Contention: the fast setting just fell over. Go back, and wait longer before
            # the next try each time it happens.
            self._back_off(self.safe)
            self._move_to(self.safe, [])
            return
        self._recent.append(seconds)
        self._until_probe -= 1

    def _finish_probe(self, won: bool) -> None:
        self._probing = False
        if not won:
            self._back_off(self.current)
            self._until_probe = self._wait[self.current]
            return
        target = self.other
        if target == self.fast:  # all threads proved faster: try them again soon after any fallback
            self._wait[self.safe] = self.schedule.first_probe_after
        self._move_to(target, self._probe)

    def _move_to(self, setting: int, times: list[float]) -> None:
        self.current = setting
        self._recent = deque(times, maxlen=self.schedule.window)
        self._until_probe = self._wait[setting]

    def _back_off(self, setting: int) -> None:
        self._wait[setting] = min(2 * self._wait[setting], self.schedule.max_probe_interval)


def numpy_blas_thread_setter() -> Callable[[int], None]:
    """Sets numpy's BLAS thread count through its C entry point, only when it changes."""
    from threadpoolctl import ThreadpoolController

    setters = [c.set_num_threads for c in ThreadpoolController().select(user_api="blas").lib_controllers]
    current = [None]

    def set_threads(num_threads: int) -> None:
        if num_threads != current[0]:
            for set_num_threads in setters:
                set_num_threads(num_threads)
            current[0] = num_threads

    return set_threads


class CpuThreads:
    """Thread counts for torch ops and BLAS calls during one engine step on CPU."""

    @classmethod
    def for_this_process(cls) -> CpuThreads:
        import selfhost
        from selfhost.layers import linear

        if selfhost.OMP_POLICY_MISSED:
            warnings.warn(
                "torch was imported before selfhost, so OpenMP's idle threads busy-wait, which can slow CPU "
                "inference on a busy or small machine; import selfhost first, or set OMP_WAIT_POLICY=PASSIVE",
                RuntimeWarning,
                stacklevel=2,
            )

        # With selfhost's own products for large steps (chunks taken from a shared counter, see
        # ../_cpu_pool.c) a busy core slows a step down instead of stalling it, so large steps
        # run on all threads, always: a run of a few big prompt steps would otherwise spend them
        # all on one thread before the first probe (measured: 225 vs ~380 GFLOP/s), and a probe
        # compares steps of unlike size (per token, a 32-sequence decode step over long contexts
        # costs several times a prompt chunk), which once sent a whole run, its prompts included,
        # to one thread (1024-token prompt 1.63 s instead of ~0.8).
        return cls(max(1, torch.get_num_threads()), numpy_blas_thread_setter(), large_steps_all_threads=linear.USE_GEMM)

    def __init__(self, max_threads: int, set_blas_threads: Callable[[int], None], large_steps_all_threads: bool = False):
        self.max_threads = max_threads
        self._set_blas_threads = set_blas_threads
        pinned = int(PINNED_BLAS_THREADS) if PINNED_BLAS_THREADS else None
        safe, fast = (pinned, pinned) if pinned else (1, max_threads)
        # With selfhost's own kernels small steps start on all threads too (a busy core slows
        # them, it does not stall them); they still drop to one thread on a collapse and probe
        # it now and then. Starting on one thread cost a batched run's last steps, as its
        # sequences finish, twice their time (21 ms for a 1-row decode step against ~11).
        self.small_steps = ThreadChooser(safe, fast, start_fast=large_steps_all_threads)
        self.large_steps = ThreadChooser(fast, fast) if large_steps_all_threads else ThreadChooser(safe, fast)
        self.blas_threads = safe

    @contextmanager
    def step(self, num_tokens: int) -> Iterator[int]:
        """Times one step; yields the thread count its kernels take (passed to them as an argument)."""
        num_threads = self.begin(num_tokens)
        try:
            yield num_threads
        finally:
            self.end()

    def begin(self, num_tokens: int) -> int:
        """Start timing a step of `num_tokens` tokens; returns the thread count its kernels take.
        `step` without the generator context manager (~10 us of a ~500 us demo-model decode step):
        every `begin` must be followed by `end`, in a `finally`."""
        small = num_tokens <= SMALL_STEP_MAX_TOKENS
        chooser = self.small_steps if small else self.large_steps
        self.blas_threads = chooser.begin()
        self._set_blas_threads(self.blas_threads)
        # Torch's own ops: tiny ones run best on one thread; big steps give torch what the kernels get.
        torch.set_num_threads(1 if small else self.blas_threads)
        self._step = (chooser, None if small else num_tokens, time.perf_counter())
        return self.blas_threads

    def end(self) -> None:
        """Finish the step `begin` started: restore torch's threads, record its time."""
        chooser, num_tokens, start = self._step
        seconds = time.perf_counter() - start
        torch.set_num_threads(self.max_threads)
        # Big steps vary in size: compare them per token.
        chooser.end(seconds if num_tokens is None else seconds / num_tokens)
