"""One check shared by the tests that write int8 checkpoints (selfhost quantize of a plain, an FP8 or
an MXFP4 source): the stored int8 model decodes exactly as the source quantized on the fly."""

from __future__ import annotations

from pathlib import Path

from selfhost import LLM, SamplingParams

PROMPT = [[5, 17, 99, 230, 41, 7, 300, 12]]


def assert_stored_int8_matches_on_the_fly(stored: Path, source: Path, max_tokens: int = 12) -> None:
    greedy = SamplingParams(max_tokens=max_tokens, temperature=0, ignore_eos=True, logprobs=1)
    loaded = LLM(str(stored), kv_cache_memory="16MiB").generate(PROMPT, greedy)[0]
    on_the_fly = LLM(str(source), quantization="int8", kv_cache_memory="16MiB").generate(PROMPT, greedy)[0]
    assert loaded.token_ids == on_the_fly.token_ids
    assert max(abs(a.logprob - b.logprob) for a, b in zip(loaded.logprobs, on_the_fly.logprobs)) < 1e-4
