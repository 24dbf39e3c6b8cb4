"""The per-step thread chooser: keeps the faster setting, abandons collapsing probes."""

import pytest
import torch

from selfhost.engine.cpu_threads import CpuThreads, ProbeSchedule, ThreadChooser

SCHEDULE = ProbeSchedule(window=3, first_probe_after=4, first_probe_after_on_fast=16, max_probe_interval=64)


def drive(chooser: ThreadChooser, cost: dict[int, float], steps: int) -> list[int]:
    """Run `steps` steps where each thread count takes cost[count] seconds; return the counts used."""
    used = []
    for _ in range(steps):
        threads = chooser.begin()
        used.append(threads)
        chooser.end(cost[threads])
    return used


def test_switches_to_the_faster_setting_and_stays():
    chooser = ThreadChooser(1, 2, SCHEDULE)
    used = drive(chooser, {1: 0.030, 2: 0.018}, 40)
    assert used[:4] == [1, 1, 1, 1]  # measures the first setting before probing
    assert used[4:7] == [2, 2, 2]  # the probe
    assert chooser.current == 2
    # On all threads, one thread is tried again only after first_probe_after_on_fast steps, and loses.
    first_retry = used.index(1, 7)
    assert first_retry == 7 + SCHEDULE.first_probe_after_on_fast
    assert used[7:].count(1) == SCHEDULE.window
    assert used[-5:].count(2) >= 4


def test_keeps_current_when_the_other_is_slower_and_backs_off():
    chooser = ThreadChooser(1, 2, SCHEDULE)
    used = drive(chooser, {1: 0.020, 2: 0.025}, 200)
    assert chooser.current == 1
    probe_starts = [i for i in range(1, len(used)) if used[i] == 2 and used[i - 1] == 1]
    gaps = [b - a for a, b in zip(probe_starts, probe_starts[1:])]
    assert gaps == sorted(gaps) and gaps[-1] > gaps[0]  # exponential back-off


def test_a_collapsing_probe_is_abandoned_after_one_step():
    chooser = ThreadChooser(1, 2, SCHEDULE)
    used = drive(chooser, {1: 0.020, 2: 0.800}, 12)
    assert used[4] == 2 and used[5] == 1  # one slow step, then straight back
    assert chooser.current == 1


def test_a_collapse_on_the_fast_setting_drops_back_to_one_thread():
    chooser = ThreadChooser(1, 2, SCHEDULE)
    drive(chooser, {1: 0.030, 2: 0.018}, 10)
    assert chooser.current == 2
    used = drive(chooser, {1: 0.030, 2: 0.500}, 3)  # another process takes a core
    assert used[0] == 2 and used[1:] == [1, 1]
    assert chooser.current == 1


def test_a_single_candidate_never_probes():
    chooser = ThreadChooser(1, 1, SCHEDULE)
    assert not chooser.can_probe
    assert set(drive(chooser, {1: 0.01}, 50)) == {1}


def test_step_sets_blas_threads_and_one_torch_thread_for_small_steps():
    seen = []
    threads = CpuThreads(max_threads=2, set_blas_threads=seen.append)
    before = torch.get_num_threads()
    with threads.step(num_tokens=1):
        assert torch.get_num_threads() == 1
    with threads.step(num_tokens=256):
        assert torch.get_num_threads() == threads.blas_threads == 1  # starts safe
    threads.large_steps.current = 2
    with threads.step(num_tokens=256):
        assert torch.get_num_threads() == threads.blas_threads == 2
    assert seen == [1, 1, 2]
    assert torch.get_num_threads() == 2
    torch.set_num_threads(before)


def test_one_transient_collapse_costs_few_steps_on_one_thread():
    chooser = ThreadChooser(1, 2, SCHEDULE)
    drive(chooser, {1: 0.030, 2: 0.018}, 10)
    assert chooser.current == 2
    drive(chooser, {1: 0.030, 2: 0.500}, 1)  # one step collides with another process
    assert chooser.current == 1
    used = drive(chooser, {1: 0.030, 2: 0.018}, 2 * SCHEDULE.first_probe_after + 2 * SCHEDULE.window)
    assert chooser.current == 2
    assert used.count(1) <= 2 * SCHEDULE.first_probe_after + SCHEDULE.window


def test_a_chooser_can_start_on_all_threads_and_still_falls_back_on_collapse():
    chooser = ThreadChooser(1, 2, SCHEDULE, start_fast=True)
    used = drive(chooser, {1: 0.030, 2: 0.018}, 10)
    assert used == [2] * 10  # no probe of one thread before first_probe_after_on_fast steps
    used = drive(chooser, {1: 0.030, 2: 0.500}, 3)
    assert used[0] == 2 and used[1:] == [1, 1]


def test_large_steps_keep_all_threads_only_when_asked():
    assert CpuThreads(2, lambda n: None).large_steps.current == 1
    assert CpuThreads(2, lambda n: None).small_steps.current == 1
    threads = CpuThreads(2, lambda n: None, large_steps_all_threads=True)
    assert threads.large_steps.current == 2 and threads.small_steps.current == 2
    assert threads.small_steps.can_probe and not threads.large_steps.can_probe
    # Steps of unlike size (a prompt chunk, then a long-context decode batch) never move it,
    # where they would send an ordinary chooser to one thread as a "collapse".
    for chooser, expected in ((threads.large_steps, {2}), (ThreadChooser(1, 2, start_fast=True), {1, 2})):
        used = []
        for step in range(300):
            used.append(chooser.begin())
            chooser.end(0.0005 if step % 7 else 0.005)
        assert set(used) == expected


class Recording:
    """Stands in for a C kernel module: records the thread count each call passes, then runs the real kernel."""

    def __init__(self, module, calls: list):
        self._module, self._calls = module, calls

    def __getattr__(self, name):
        real = getattr(self._module, name)
        if not callable(real) or name in ("available", "limit_isa", "narrow_cache_available", "layer_fields", "model"):
            return real
        # Where each kernel takes its thread count: gemm's is 7th; the attention kernels' comes
        # just before their trailing arguments (kv_kind; the fused decode step's store_first too;
        # the prefill kernel's tiles flag; then an int8 cache's two scale addresses); the one-call
        # decode runner takes the products' and the attention's counts before its flags.
        positions = {"gemm": (6,), "gemm_argmax": (6,), "decode_attention": (-4,), "rope_decode_attention": (-5,), "rope_store": (-4,),
                     "prefill_attention": (-5,), "run_layers": (-3, -2), "greedy_passes": (-2, -1)}[name]

        def call(*args):
            self._calls.extend((name, args[p]) for p in positions)
            return real(*args)

        return call


@pytest.mark.parametrize("chosen", [1, 2])
def test_every_kernel_of_a_step_gets_the_choosers_thread_count(tiny_checkpoint, monkeypatch, chosen):
    """The step's thread count is passed down to the products and the attention kernel alike
    (decode attention used to read torch's count, which a decode step sets to 1)."""
    from selfhost import LLM, SamplingParams
    from selfhost.engine import decode_layers, paged_cache
    from selfhost.layers import linear

    if not (paged_cache.CPU_KERNEL_ENABLED and linear.USE_GEMM):
        pytest.skip("needs the C attention kernel and the AVX-512 product (this CPU lacks AVX-512)")
    calls: list = []
    monkeypatch.setattr(paged_cache, "_paged_attention_cpu", Recording(paged_cache._paged_attention_cpu, calls))
    monkeypatch.setattr(linear, "_gemm_cpu", Recording(linear._gemm_cpu, calls))
    monkeypatch.setattr(decode_layers, "_decode_layers_cpu", Recording(decode_layers._decode_layers_cpu, calls))
    expected = {"gemm", "rope_decode_attention"}  # the Python path's decode steps
    if decode_layers.runner_available("fp32"):
        expected = {"gemm", "run_layers"}  # prompts through the layers, decode steps through the runner
    llm = LLM(str(tiny_checkpoint("llama")), kv_cache_memory="64MiB")
    threads = llm.engine.runner.cpu_threads
    for chooser in (threads.small_steps, threads.large_steps):
        chooser.safe = chooser.fast = chooser.current = chosen  # pinned: no probing
    llm.generate([[5, 6, 7, 8]], SamplingParams(max_tokens=4, temperature=0, ignore_eos=True))
    kernels = {name for name, _ in calls}
    assert expected <= kernels
    assert {count for _, count in calls} == {chosen}


@pytest.mark.parametrize(
    "imports,environment,warned",
    [
        ("import torch, selfhost", {}, True),  # libgomp loaded with no policy: too late to set one
        ("import selfhost, torch", {}, False),
        ("import torch, selfhost", {"OMP_WAIT_POLICY": "PASSIVE"}, False),  # the user set it before torch
    ],
)
def test_engine_warns_once_when_torch_was_imported_first(tiny_checkpoint, imports, environment, warned):
    import os
    import subprocess
    import sys

    code = f"""{imports}
from selfhost import LLM
LLM({str(tiny_checkpoint("llama"))!r}, kv_cache_memory="16MiB")
LLM({str(tiny_checkpoint("llama"))!r}, kv_cache_memory="16MiB")
"""
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | environment
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stderr.count("torch was imported before selfhost") == (1 if warned else 0), out.stderr
