"""Several adapters and the base model in one batch: each request gets what it gets alone."""

import pytest
import torch

from selfhost import LLM, SamplingParams
from selfhost.errors import InvalidParameterError
from selfhost.lora.adapter_format import read_adapter
from selfhost.lora.apply import apply_adapter
from selfhost.models.loader import load_model
from tests.lora.conftest import make_peft_adapter, selfhost_logits

GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
PROMPTS = [[1, 17, 250, 3, 99], [1, 401, 42, 8, 300, 5, 77, 123, 9, 11, 12], [1, 5], [1, 17, 250, 3, 99, 8, 8]]


@pytest.fixture(scope="module")
def adapters(tiny_checkpoint, tmp_path_factory):
    model_dir = tiny_checkpoint("qwen2")
    root = tmp_path_factory.mktemp("adapters")
    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
               ["up_proj", "down_proj"]]
    return model_dir, {f"a{i}": make_peft_adapter(model_dir, root / f"a{i}", t, seed=i, r=2 + 2 * i, lora_alpha=8)
                       for i, t in enumerate(targets)}


def test_gathered_product_equals_the_single_adapter_model(adapters):
    model_dir, folders = adapters
    llm = LLM(str(model_dir), lora={k: str(v) for k, v in folders.items()}, max_loras=3, max_lora_rank=8)
    slot = llm.adapters.acquire("a1")
    ids = PROMPTS[1]
    llm.adapters.begin_step([(slot, len(ids))], torch.device("cpu"))
    ours = selfhost_logits(llm.model, ids)
    llm.adapters.end_step()
    single = load_model(model_dir, torch.float32, torch.device("cpu"))
    apply_adapter(single, read_adapter(folders["a1"]))
    torch.testing.assert_close(ours, selfhost_logits(single, ids), atol=1e-4, rtol=1e-4)


def test_gathered_product_on_a_checkpoint_that_fuses_qkv_itself(tiny_checkpoint, tmp_path):
    model_dir = tiny_checkpoint("phi3")
    folder = make_peft_adapter(model_dir, tmp_path / "a", ["qkv_proj", "gate_up_proj", "down_proj"], r=4, lora_alpha=8)
    llm = LLM(str(model_dir), lora={"a": str(folder)})
    ids = PROMPTS[1]
    llm.adapters.begin_step([(llm.adapters.acquire("a"), len(ids))], torch.device("cpu"))
    ours = selfhost_logits(llm.model, ids)
    llm.adapters.end_step()
    single = load_model(model_dir, torch.float32, torch.device("cpu"))
    apply_adapter(single, read_adapter(folder))
    torch.testing.assert_close(ours, selfhost_logits(single, ids), atol=1e-4, rtol=1e-4)


def test_mixed_batch_gives_each_request_its_own_tokens(adapters):
    model_dir, folders = adapters
    llm = LLM(str(model_dir), lora={k: str(v) for k, v in folders.items()}, max_loras=3, max_lora_rank=8)
    names = [None, "a0", "a1", "a2"]
    alone = [llm.generate([p], GREEDY, lora=n)[0].token_ids for p, n in zip(PROMPTS, names)]
    mixed = [o.token_ids for o in llm.generate(PROMPTS, GREEDY, lora=names)]
    assert mixed == alone
    assert len({tuple(o.token_ids) for o in llm.generate([PROMPTS[0]] * 4, GREEDY, lora=names)}) > 1
    base = LLM(str(model_dir))
    assert base.generate([PROMPTS[0]], GREEDY)[0].token_ids == alone[0]


def test_prefix_cache_is_keyed_by_adapter(adapters):
    model_dir, folders = adapters
    long_prompt = [1] + list(range(20, 60))  # several full KV blocks
    fresh = LLM(str(model_dir), lora={"a1": str(folders["a1"])})
    expected = fresh.generate([long_prompt], GREEDY, lora="a1")[0].token_ids
    llm = LLM(str(model_dir), lora={"a1": str(folders["a1"])})
    llm.generate([long_prompt], GREEDY)  # the base model's blocks for this prompt are now cached
    assert llm.generate([long_prompt], GREEDY, lora="a1")[0].token_ids == expected
    assert llm.engine.block_manager.prefix_hit_rate == 0.0  # nothing of the base's was reused


def test_eviction_and_reload_keep_outputs(adapters):
    model_dir, folders = adapters
    llm = LLM(str(model_dir), lora={k: str(v) for k, v in folders.items()}, max_loras=1, max_lora_rank=8)
    first = [llm.generate([PROMPTS[1]], GREEDY, lora=n)[0].token_ids for n in ("a0", "a1", "a2")]
    again = [llm.generate([PROMPTS[1]], GREEDY, lora=n)[0].token_ids for n in ("a2", "a0", "a1")]
    assert again == [first[2], first[0], first[1]]
    # One slot, two adapters in one batch: the second waits for the slot, then runs.
    both = llm.generate([PROMPTS[1]] * 2, GREEDY, lora=["a0", "a1"])
    assert [o.token_ids for o in both] == first[:2]
    assert llm.adapters.users == [0]


def test_unknown_adapter_and_rank_too_big(adapters):
    from selfhost.lora.adapter_format import AdapterError

    model_dir, folders = adapters
    llm = LLM(str(model_dir), lora={"a2": str(folders["a2"])}, max_lora_rank=4)
    with pytest.raises(InvalidParameterError, match="unknown adapter 'nope'"):
        llm.generate([PROMPTS[0]], GREEDY, lora="nope")
    with pytest.raises(AdapterError, match="rank 6, more than max_lora_rank=4"):
        llm.generate([PROMPTS[0]], GREEDY, lora="a2")
    assert llm.adapters.users == [0] * llm.adapters.max_loras  # the failed load gave its slot back
    llm.adapters.add("a0", folders["a0"])
    alone = LLM(str(model_dir), lora={"a0": str(folders["a0"])}).generate([PROMPTS[0]], GREEDY, lora="a0")
    assert llm.generate([PROMPTS[0]], GREEDY, lora="a0")[0].token_ids == alone[0].token_ids
    with pytest.raises(InvalidParameterError, match="serves no adapters"):
        LLM(str(model_dir)).generate([PROMPTS[0]], GREEDY, lora="a2")


@pytest.mark.parametrize("quantization", ["int8", "int4"])
def test_adapters_on_a_quantized_base(adapters, quantization):
    model_dir, folders = adapters
    llm = LLM(str(model_dir), quantization=quantization, lora={k: str(v) for k, v in folders.items()},
              max_lora_rank=8)
    names = [None, "a0", "a1", "a2"]
    alone = [llm.generate([p], GREEDY, lora=n)[0].token_ids for p, n in zip(PROMPTS, names)]
    assert [o.token_ids for o in llm.generate(PROMPTS, GREEDY, lora=names)] == alone
    assert len({tuple(o.token_ids) for o in llm.generate([PROMPTS[0]] * 4, GREEDY, lora=names)}) > 1


def test_async_engine_serves_adapters_concurrently(adapters):
    import asyncio

    from selfhost import AsyncEngine

    model_dir, folders = adapters
    llm = LLM(str(model_dir), lora={k: str(v) for k, v in folders.items()}, max_loras=3, max_lora_rank=8)
    names = [None, "a0", "a1", "a2"]
    alone = [llm.generate([p], GREEDY, lora=n)[0].token_ids for p, n in zip(PROMPTS, names)]
    engine = AsyncEngine(llm)

    async def one(i):
        tokens = []
        async for delta in engine.generate(PROMPTS[i], GREEDY, f"r{i}", lora=names[i]):
            tokens.extend(delta.token_ids)
        return tokens

    async def all_at_once():
        return await asyncio.gather(*(one(i) for i in range(len(PROMPTS))))

    try:
        assert asyncio.run(all_at_once()) == alone
    finally:
        engine.shutdown()


def test_stream_and_chat_take_an_adapter(adapters):
    model_dir, folders = adapters
    llm = LLM(str(model_dir), lora={"a1": str(folders["a1"])})
    expected = llm.generate([PROMPTS[1]], GREEDY, lora="a1")[0]
    assert "".join(llm.stream(PROMPTS[1], GREEDY, lora="a1")) == expected.text
    messages = [{"role": "user", "content": "To be?"}]
    assert llm.chat(messages, GREEDY, lora="a1")[0].token_ids == llm.generate(
        [llm.tokenizer.encode_chat(messages)], GREEDY, lora="a1")[0].token_ids


def test_removed_adapter_finishes_its_running_request_then_frees_its_slot(adapters):
    model_dir, folders = adapters
    alone = {name: LLM(str(model_dir), lora={name: str(folders[name])}, max_lora_rank=8).generate(
        [PROMPTS[1]], GREEDY, lora=name)[0].token_ids for name in ("a0", "a1")}
    llm = LLM(str(model_dir), lora={"a0": str(folders["a0"])}, max_loras=1, max_lora_rank=8)
    running = llm.engine.add_request("r0", PROMPTS[1], GREEDY, lora="a0")
    llm.engine.step()
    key, info = llm.adapters.add("a1", folders["a1"])
    assert (key, info.rank) == ("a1", 4)
    llm.adapters.remove("a0")
    with pytest.raises(InvalidParameterError, match="unknown adapter 'a0'"):
        llm.engine.add_request("r1", PROMPTS[1], GREEDY, lora="a0")
    assert not llm.adapters.can_acquire("a1")  # the one slot still runs the removed adapter's request
    waiting = llm.engine.add_request("r2", PROMPTS[1], GREEDY, lora="a1")  # queued until the slot frees
    while not running.is_finished:
        llm.engine.step()
        assert waiting.num_computed_tokens == 0 or running.is_finished
    assert running.output_ids == alone["a0"]
    while not waiting.is_finished:
        llm.engine.step()
    assert waiting.output_ids == alone["a1"]
    assert llm.adapters.can_acquire("a1")
    assert llm.generate([PROMPTS[1]], GREEDY, lora="a1")[0].token_ids == alone["a1"]
    # Re-adding a removed name gets a fresh key: its cached prefixes (keyed by adapter) start empty.
    assert llm.adapters.add("a0", folders["a0"])[0] == "a0#2"
    assert llm.generate([PROMPTS[1]], GREEDY, lora="a0#2")[0].token_ids == alone["a0"]


def test_added_adapter_is_checked_before_it_is_registered(adapters, tiny_checkpoint, tmp_path):
    from selfhost.lora.errors import AdapterError

    model_dir, folders = adapters
    llm = LLM(str(model_dir), lora={"a0": str(folders["a0"])}, max_lora_rank=4)
    with pytest.raises(AdapterError, match="rank 6, more than max_lora_rank=4"):
        llm.adapters.add("big", folders["a2"])
    other = make_peft_adapter(tiny_checkpoint("gemma"), tmp_path / "gemma", ["o_proj"], r=2, lora_alpha=4)
    with pytest.raises(AdapterError, match="another base model"):
        llm.adapters.add("other", other)
    with pytest.raises(AdapterError, match="already loaded"):
        llm.adapters.add("a0", folders["a1"])
    assert llm.adapters.names == ["a0"]


def test_an_added_adapter_is_read_before_its_first_request(adapters, tmp_path):
    import shutil

    model_dir, folders = adapters
    expected = LLM(str(model_dir), lora={"a1": str(folders["a1"])}, max_lora_rank=8).generate(
        [PROMPTS[1]], GREEDY, lora="a1")[0].token_ids
    llm = LLM(str(model_dir), lora={"a0": str(folders["a0"])}, max_lora_rank=8)
    copy = shutil.copytree(folders["a1"], tmp_path / "a1")
    llm.adapters.add("a1", copy)
    shutil.rmtree(copy)  # the engine's first use of it must not need the disk
    assert llm.generate([PROMPTS[1]], GREEDY, lora="a1")[0].token_ids == expected


def test_slots_without_adapters_take_one_added_later(adapters):
    model_dir, folders = adapters
    llm = LLM(str(model_dir), lora={}, max_loras=2, max_lora_rank=8)
    assert llm.adapters.names == []
    key, _ = llm.adapters.add("late", folders["a1"])
    named = LLM(str(model_dir), lora={"a1": str(folders["a1"])}, max_loras=2, max_lora_rank=8)
    assert llm.generate(PROMPTS, GREEDY, lora=key)[0].token_ids == named.generate(PROMPTS, GREEDY, lora="a1")[0].token_ids
