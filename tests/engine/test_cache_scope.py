"""Prefix-cache scopes: requests share cached blocks only under the same cache salt."""

from __future__ import annotations

from selfhost import SamplingParams

PARAMS = SamplingParams(max_tokens=2, temperature=0)


def _hit_tokens(llm, prompt: list[int], salt: bytes | None) -> int:
    manager = llm.engine.block_manager
    before = manager.prefix_hit_tokens
    seq = llm.engine.add_request(f"r{id(prompt)}-{salt}-{before}", prompt, PARAMS, cache_salt=salt)
    while not seq.is_finished:
        llm.engine.step()
    return manager.prefix_hit_tokens - before


def test_a_salt_keeps_cached_prefixes_to_its_own_requests(tiny_llm):
    block = tiny_llm.engine.config.block_size
    prompt = [5 + (i % 200) for i in range(3 * block + 1)]
    assert _hit_tokens(tiny_llm, prompt, b"tenant-a") == 0  # first time: nothing cached
    assert _hit_tokens(tiny_llm, prompt, b"tenant-b") == 0  # another tenant: cannot see tenant a's blocks
    assert _hit_tokens(tiny_llm, prompt, None) == 0  # nor can unsalted requests
    assert _hit_tokens(tiny_llm, prompt, b"tenant-a") == 3 * block  # the same tenant reuses all full blocks
    assert _hit_tokens(tiny_llm, prompt, None) == 3 * block  # and unsalted requests share among themselves
