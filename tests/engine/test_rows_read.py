"""A step's last layer runs past attention only for the hidden rows the step reads (CausalLM.forward's
output_rows): a prompt's last token, every row of a chunk that scores prompt tokens or verifies
proposals; every row still writes its keys and values."""

import pytest
import torch

import selfhost.engine.model_runner as model_runner
from selfhost import LLM, SamplingParams
from selfhost.train.attention import BatchCausalAttention
from tests.lora.conftest import make_peft_adapter


def prompt(seed: int, length: int) -> list[int]:
    return torch.randint(3, 512, (length,), generator=torch.Generator().manual_seed(seed)).tolist()


def record_mlp_rows(monkeypatch, llm: LLM) -> dict[str, list[int]]:
    """Rows each Python step's first and last MLP multiply (decode steps in one C call never come here)."""
    layers = llm.engine.runner.model.model.layers
    seen = {"first": [], "last": []}
    for name, layer in (("first", layers[0]), ("last", layers[-1])):
        forward = layer.mlp.forward

        def counted(h, *args, name=name, forward=forward):
            seen[name].append(h.shape[0])
            return forward(h, *args)

        monkeypatch.setattr(layer.mlp, "forward", counted)
    return seen


@pytest.fixture
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint("llama")), device="cpu", max_num_batched_tokens=64)


def test_the_last_layer_of_a_prompt_step_multiplies_only_the_rows_read(llm, monkeypatch):
    seen = record_mlp_rows(monkeypatch, llm)
    greedy = SamplingParams(max_tokens=1, temperature=0, ignore_eos=True)
    llm.generate([prompt(0, 30), prompt(1, 20)], greedy)  # one step, two prompts: two rows read
    assert seen == {"first": [50], "last": [2]}
    seen["first"].clear(), seen["last"].clear()
    llm.generate(prompt(2, 100), greedy)  # chunks of 64 and 36: the first reads no row (one is computed)
    assert seen == {"first": [64, 36], "last": [1, 1]}
    seen["first"].clear(), seen["last"].clear()
    llm.generate(prompt(3, 40), SamplingParams(max_tokens=1, temperature=0, prompt_logprobs=2))
    assert seen == {"first": [40], "last": [40]}  # every prompt row is scored


def test_outputs_and_logprobs_are_those_of_every_row_computed(tiny_checkpoint, monkeypatch):
    scored = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3, prompt_logprobs=2)
    plain = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, logprobs=3)
    prompts = [prompt(4, 70), prompt(5, 9)]
    runs = []
    for rows_read in (model_runner._rows_run_reads, lambda chunks: None):
        monkeypatch.setattr(model_runner, "_rows_run_reads", rows_read)
        llm = LLM(str(tiny_checkpoint("llama")), device="cpu", max_num_batched_tokens=64, enable_prefix_caching=False)
        runs.append(llm.generate(prompts, scored) + llm.generate(prompts, plain))
    for fewer, every in zip(*runs):
        assert fewer.token_ids == every.token_ids
        assert len(fewer.logprobs) == len(every.logprobs) == 12
        for a, b in zip(fewer.logprobs + (fewer.prompt_logprobs or [])[1:],
                        every.logprobs + (every.prompt_logprobs or [])[1:]):
            assert a.token_id == b.token_id and a.top.keys() == b.top.keys()
            assert abs(a.logprob - b.logprob) < 1e-5 and all(abs(a.top[t] - b.top[t]) < 1e-5 for t in a.top)


def test_causal_lm_output_rows_are_the_full_forwards_rows(llm):
    model = llm.engine.runner.model
    ids = prompt(6, 24)
    tokens, positions = torch.tensor(ids), torch.arange(len(ids))
    rows = torch.tensor([23, 0, 11])  # any order: the result follows it
    with torch.inference_mode():
        every = model(tokens, positions, BatchCausalAttention(1, len(ids)))
        read = model(tokens, positions, BatchCausalAttention(1, len(ids)), output_rows=rows)
    assert read.shape == (3, every.shape[1])
    torch.testing.assert_close(read, every[rows], rtol=1e-5, atol=1e-5)


def test_adapters_keep_every_row(tiny_checkpoint, tmp_path, monkeypatch):
    model_dir = tiny_checkpoint("llama")
    adapter = make_peft_adapter(model_dir, tmp_path / "adapter", ["gate_proj", "down_proj"])
    llm = LLM(str(model_dir), device="cpu", lora={"a": str(adapter)})
    seen = record_mlp_rows(monkeypatch, llm)
    llm.generate(prompt(7, 30), SamplingParams(max_tokens=1, temperature=0), lora="a")
    assert seen["last"] == [30]  # the adapters' per-row slots are laid out for the whole step
