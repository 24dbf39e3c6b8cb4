import asyncio
import time

import pytest

from selfhost import LLM, AsyncEngine, SamplingParams
from selfhost.errors import InvalidParameterError


@pytest.fixture(scope="module")
def engine(tiny_checkpoint):
    eng = AsyncEngine(LLM(str(tiny_checkpoint("llama")), kv_cache_memory="4MiB"))
    yield eng
    eng.shutdown()


@pytest.fixture(scope="module")
def offline(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), kv_cache_memory="4MiB")


async def collect(engine, prompt, params, request_id):
    text, ids, last = [], [], None
    async for delta in engine.generate(prompt, params, request_id):
        text.append(delta.text)
        ids.extend(delta.token_ids)
        last = delta
    return "".join(text), ids, last


def wait_idle(engine, timeout=10.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        stats = engine.stats()
        if stats.num_running == 0 and stats.num_waiting == 0:
            return stats
        time.sleep(0.02)
    raise AssertionError("engine did not go idle")


def test_concurrent_streams_match_offline_generation(engine, offline):
    prompts = [[5 + i, 6, 7, 8 + i] * (i + 1) for i in range(8)]
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=1)

    async def main():
        return await asyncio.gather(*(collect(engine, p, params, f"req-{i}") for i, p in enumerate(prompts)))

    results = asyncio.run(main())
    wait_idle(engine)
    expected = offline.generate(prompts, params)
    for (text, ids, last), out in zip(results, expected):
        assert ids == out.token_ids
        assert text == out.text
        assert last.finish_reason == "length" and last.num_output_tokens == 16
        assert last.num_prompt_tokens == len(out.prompt_token_ids)


def test_cancelled_consumer_aborts_and_frees_blocks(engine):
    params = SamplingParams(max_tokens=400, temperature=0, ignore_eos=True)

    async def main():
        stream = engine.generate([5, 6, 7], params, "to-cancel")
        got = 0
        async for _ in stream:
            got += 1
            if got == 3:
                break  # the client went away mid-stream
        await stream.aclose()
        return got

    assert asyncio.run(main()) == 3
    stats = wait_idle(engine)
    assert stats.kv_blocks_used == 0


def test_validation_errors_reach_the_caller(engine):
    async def main():
        async for _ in engine.generate([], SamplingParams(), "empty"):
            pass

    with pytest.raises(InvalidParameterError, match="empty"):
        asyncio.run(main())
    # and the engine still serves
    text, ids, last = asyncio.run(collect(engine, [5, 6], SamplingParams(max_tokens=3, temperature=0), "after"))
    assert len(ids) >= 1 and last.is_finished


def test_llm_driven_by_an_async_engine_refuses_direct_use(engine):
    with pytest.raises(InvalidParameterError, match="AsyncEngine"):
        engine.llm.generate([5, 6], SamplingParams(max_tokens=2))


def test_a_closed_event_loop_does_not_stop_the_engine(engine):
    # The consumer's loop ends while its request still runs: deliveries must not kill the worker.
    async def start_and_leave():
        stream = engine.generate([5, 6, 7], SamplingParams(max_tokens=200, temperature=0, ignore_eos=True), "orphan")
        await stream.__anext__()  # accepted and running; the generator is never closed

    asyncio.run(start_and_leave())
    stats = wait_idle(engine)
    assert stats.kv_blocks_used == 0
    text, ids, last = asyncio.run(collect(engine, [5, 6], SamplingParams(max_tokens=3, temperature=0), "alive"))
    assert last.is_finished
