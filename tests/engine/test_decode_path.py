"""The decode path (model_runner.py's `_run_decode`, decode_inputs.py, decode_head.py) against the
general path it shortcuts: the same tokens, logprobs and text, bit for bit, whatever the batch does."""

import random
import time
from types import SimpleNamespace

import pytest
import torch

from selfhost import LLM, SamplingParams
from selfhost.engine.cpu_threads import CpuThreads
from selfhost.engine.decode_head import DecodeHead
from selfhost.engine.decode_inputs import DecodeInputs
from selfhost.engine.model_runner import ModelRunner
from selfhost.engine.paged_cache import PagedKVCache
from selfhost.engine.scheduler import ScheduledChunk
from selfhost.structured_output import StructuredOutput

PARAMS = {
    "greedy": dict(temperature=0),
    "greedy_logprobs": dict(temperature=0, logprobs=3),
    "seeded_top_p": dict(temperature=0.9, top_p=0.9, logprobs=2),
    "penalties": dict(temperature=0, repetition_penalty=1.3, frequency_penalty=0.5),
    "stop_string": dict(temperature=0, stop=("a",)),
    "regex": dict(temperature=0.8, structured_output=StructuredOutput(regex="[a-m ]{3,40}")),
}


def general(llm: LLM) -> LLM:
    """The reference: every step through `_prepare` and `_run`, as before the decode path."""
    llm.engine.runner._decode_inputs = None
    return llm


def workload(n: int, seed: int, settings: dict):
    rng = random.Random(seed)
    prompts = [[rng.randrange(3, 512) for _ in range(rng.randint(1, 40))] for _ in range(n)]
    params = [SamplingParams(max_tokens=rng.randint(1, 30), ignore_eos=True, seed=i, **settings) for i in range(n)]
    return prompts, params


def run_staggered(llm, prompts, params, arrivals_per_step=2):
    """Requests join a few per step and finish at different lengths: the decode batch grows and shrinks."""
    engine, pending, seqs = llm.engine, list(enumerate(zip(prompts, params))), {}
    while pending or engine.has_work:
        for _ in range(arrivals_per_step):
            if pending:
                i, (prompt, sp) = pending.pop(0)
                seqs[i] = engine.add_request(f"r{i}", prompt, sp)
        engine.step()
    outs = [seqs[i].to_output() for i in range(len(prompts))]
    return [(o.token_ids, o.text, o.finish_reason,
             None if o.logprobs is None else [(lp.token_id, lp.logprob, sorted(lp.top.items())) for lp in o.logprobs])
            for o in outs]


def count_decode_steps(monkeypatch) -> list:
    steps = []
    original = ModelRunner._run_decode

    def counting(self, chunks, *args):
        steps.append(len(chunks))
        return original(self, chunks, *args)

    monkeypatch.setattr(ModelRunner, "_run_decode", counting)
    return steps


@pytest.mark.parametrize("family,weights", [("qwen2", "float32"), ("gemma2", "float32"),  # gemma2: soft-capped head
                                            ("qwen2", "bfloat16")])  # a bf16 head (its tiles kernel)
@pytest.mark.parametrize("case", sorted(PARAMS))
def test_outputs_equal_the_general_path(tiny_checkpoint, monkeypatch, family, weights, case):
    path = str(tiny_checkpoint(family))
    prompts, params = workload(10, seed=len(case), settings=PARAMS[case])
    expected = run_staggered(general(LLM(path, kv_cache_memory="4MiB", weight_dtype=weights)), prompts, params)
    steps = count_decode_steps(monkeypatch)
    assert run_staggered(LLM(path, kv_cache_memory="4MiB", weight_dtype=weights), prompts, params) == expected
    assert steps and max(steps) > 1  # decode steps of one and of several sequences took the path


@pytest.mark.parametrize("kv_cache_dtype", ["float32", "bfloat16", "int8"])
def test_preemption_and_prefix_hits_equal_the_general_path(tiny_checkpoint, kv_cache_dtype):
    """A cache with room for ~128 tokens: sequences are preempted and come back with tables rebuilt
    (often from the prefix cache), so a row's table changes under the same sequence."""
    path = str(tiny_checkpoint("qwen2"))
    prompts, params = workload(12, seed=2, settings=dict(temperature=0))
    prompts += [prompts[0] * 3, prompts[0] * 3 + [7]]  # shared full blocks: prefix hits
    params += params[:2]
    per_token = PagedKVCache.bytes_per_block(LLM(path).model.spec, 1,
                                             {"float32": torch.float32, "bfloat16": torch.bfloat16,
                                              "int8": torch.int8}[kv_cache_dtype])
    tight = dict(kv_cache_memory=128 * per_token, max_num_seqs=12, kv_cache_dtype=kv_cache_dtype)
    expected = run_staggered(general(LLM(path, **tight)), prompts, params, arrivals_per_step=12)
    llm = LLM(path, **tight)
    assert run_staggered(llm, prompts, params, arrivals_per_step=12) == expected
    assert llm.engine.stats().num_preemptions > 0


def reference_prepare(chunks, block_size):
    runner = ModelRunner.__new__(ModelRunner)  # `_prepare` reads only these (the cache for verifications)
    runner.block_size, runner.device = block_size, torch.device("cpu")
    runner.cache = SimpleNamespace(use_cpu_kernel=True)  # verifications as single queries, as on CPU
    return runner._prepare(chunks, num_threads=2)


def test_inputs_equal_prepare_as_tables_grow_change_and_rows_come_and_go():
    bs = 4
    inputs = DecodeInputs(bs)
    a = SimpleNamespace(token_ids=list(range(10, 15)), block_table=[3, 8])
    b = SimpleNamespace(token_ids=list(range(20, 29)), block_table=[1, 2, 5])
    c = SimpleNamespace(token_ids=[7] * 30, block_table=list(range(20, 28)))

    def step(*seqs, proposed=None, verify=None):
        chunks = [ScheduledChunk(s, len(s.token_ids) - 1, 1) for s in seqs]
        if proposed is not None:  # a draft model's pass: the one token fed is the last proposal
            chunks[0] = ScheduledChunk(seqs[0], len(seqs[0].token_ids), 1, (proposed,))
        for i, tokens in (verify or {}).items():  # speculative decoding: the last token, then proposals to check
            chunks[i] = ScheduledChunk(seqs[i], len(seqs[i].token_ids) - 1, 1 + len(tokens), tuple(tokens))
        got, want = inputs.prepare(chunks, 2), reference_prepare(chunks, bs)
        for g, w in zip(got[:2], want[:2]):
            assert torch.equal(g, w)
        gm, wm = got[2], want[2]
        assert (gm.num_single, gm.chunks, gm.num_threads) == (wm.num_single, [], 2)
        assert gm.store_first == wm.store_first == bool(verify)
        for name in ("slot_mapping", "single_block_tables", "single_context_lens"):
            assert torch.equal(getattr(gm, name), getattr(wm, name)), name

    def grow(seq):
        seq.token_ids.append(len(seq.token_ids))
        if len(seq.block_table) * bs < len(seq.token_ids):
            seq.block_table.append(40 + len(seq.block_table))

    step(a)
    for _ in range(6):  # a block added on the way, the width moves
        grow(a)
        step(a)
    step(a, b)
    grow(b)
    step(a, b)
    a.block_table[:] = [9, 11, 12, 13][: len(a.block_table)]  # rebuilt under the same sequence, same length
    step(a, b)
    step(b, a)  # rows swap
    step(a, b, c)  # more rows than the buffers had: they grow
    grow(c)
    step(c)
    step(c, a, proposed=99)
    # Verifications: k + 1 queries of one sequence, their slots crossing into a block the table already has.
    b.block_table.append(6)
    c.block_table.append(50)
    step(a, b, verify={1: [5, 6, 7, 8]})
    step(b, verify={0: [1]})
    step(c, a, b, verify={0: [4, 4], 2: [9, 9, 9]})
    step(a, b)  # back to plain decodes: the rows shrink again


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
def test_head_equals_compute_logits_and_declines_what_it_cannot_run(tiny_checkpoint, weights):
    model = LLM(str(tiny_checkpoint("qwen2")), weight_dtype=weights).model
    # from 4 rows on, the module calls another product (torch's fp32 one, the many-row bf16 one)
    setattr(model.lm_head, "blas_from_rows" if weights == "float32" else "few_rows_max", 4 if weights == "float32" else 3)
    head = DecodeHead.for_model(model)
    if head is None:
        pytest.skip("the head is not on selfhost's AVX-512 products here")
    hidden = torch.randn(3, model.spec.hidden_size)
    with torch.inference_mode():
        for rows in (1, 3, 2):
            tensor, array = head(hidden[:rows], 2)
            assert torch.equal(tensor, model.compute_logits(hidden[:rows], 2))
            assert array.shape == (rows, model.spec.vocab_size) and (array == tensor.numpy()).all()
            (tensor, array), tokens = head.greedy(hidden[:rows], 2)
            assert torch.equal(tensor, model.compute_logits(hidden[:rows], 2))
            assert tokens == tensor.argmax(dim=-1).tolist()
    assert head(hidden, 2) is None and head.greedy(hidden, 2) is None  # gradients on: the module's own forward
    with torch.inference_mode():
        assert head(torch.randn(4, model.spec.hidden_size), 2) is None
    assert DecodeHead.for_model(LLM(str(tiny_checkpoint("gemma2"))).model) is None  # final soft-cap


def test_begin_and_end_time_the_step_and_restore_torch_threads():
    """`begin`/`end` (the decode path's `step`): torch on one thread during a small step, the kernels'
    count during a large one, all threads after; the chooser gets the step's time (per token if large)."""
    blas, times = [], []
    threads = CpuThreads(2, blas.append)
    threads.small_steps = threads.large_steps = SimpleNamespace(begin=lambda: 2, end=times.append)
    assert threads.begin(1) == 2 and blas[-1] == 2 and torch.get_num_threads() == 1
    threads.end()
    assert torch.get_num_threads() == 2
    assert threads.begin(64) == 2 and torch.get_num_threads() == 2
    time.sleep(0.064)
    threads.end()
    assert torch.get_num_threads() == 2 and 0.001 <= times[-1] < 0.01  # per token
    with threads.step(1) as num_threads:  # the context manager is the same pair
        assert num_threads == 2 and torch.get_num_threads() == 1
    assert len(times) == 3


@pytest.mark.parametrize("case", ["greedy", "greedy_logprobs", "seeded_top_p", "stop_string"])
def test_verification_steps_equal_the_general_path(tiny_checkpoint, monkeypatch, case):
    """Speculative decoding (prompt lookup, proposing whenever it can): verifications of several sequences
    beside plain decodes (penalties do not speculate) take the decode path, with the same outputs."""
    from tests.speculative.conftest import always

    path = str(tiny_checkpoint("llama"))
    rng = random.Random(3)
    prompts = [(m * 6)[:rng.randint(8, 40)] for m in ([rng.randrange(3, 512) for _ in range(rng.randint(2, 6))]
                                                        for _ in range(8))]
    params = [SamplingParams(max_tokens=rng.randint(8, 30), ignore_eos=True, seed=i, **PARAMS[case])
              for i in range(len(prompts))]
    params[1] = SamplingParams(max_tokens=20, temperature=0, repetition_penalty=1.2, ignore_eos=True)  # plain beside
    settings = dict(kv_cache_memory="4MiB", speculative="ngram", num_speculative_tokens=4)
    reference = always(general(LLM(path, **settings)))
    expected = run_staggered(reference, prompts, params)
    verified = []
    original = ModelRunner._run_decode

    def counting(self, chunks, *args):
        verified.append(sum(bool(c.proposed) for c in chunks))
        return original(self, chunks, *args)

    monkeypatch.setattr(ModelRunner, "_run_decode", counting)
    llm = always(LLM(path, **settings))
    assert run_staggered(llm, prompts, params) == expected
    assert max(verified) >= 1  # verification steps took the path
    stats, reference_stats = llm.engine.stats(), reference.engine.stats()
    assert (stats.spec_proposed_tokens, stats.spec_accepted_tokens) == (reference_stats.spec_proposed_tokens,
                                                                        reference_stats.spec_accepted_tokens)
    if PARAMS[case].get("temperature") == 0:  # greedy continuations of repeating prompts copy a lot
        assert max(verified) > 1 and stats.spec_accepted_tokens > 0  # several verifications a step; some kept
