import pytest
import torch

from selfhost import SamplingParams
from selfhost.errors import InvalidParameterError
from selfhost.engine.sequence import sampler_row
from selfhost.layers.sampler import SamplerRow, filter_logits, sample


def test_seed_reproducible_and_seeds_differ(tiny_llm):
    params = dict(max_tokens=24, temperature=1.0, ignore_eos=True)
    a = tiny_llm.generate("To be", SamplingParams(seed=7, **params))[0].token_ids
    b = tiny_llm.generate("To be", SamplingParams(seed=7, **params))[0].token_ids
    c = tiny_llm.generate("To be", SamplingParams(seed=8, **params))[0].token_ids
    assert a == b
    assert a != c


def test_stream_deltas_equal_final_text(tiny_llm):
    params = SamplingParams(max_tokens=30, seed=3, ignore_eos=True)
    streamed = "".join(tiny_llm.stream("To be, or not", params))
    assert streamed == tiny_llm.generate("To be, or not", params)[0].text


def test_stop_string_in_generation(tiny_llm):
    base = tiny_llm.generate("To be", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True))[0]
    stop = base.text[10:13]
    assert len(stop) == 3
    out = tiny_llm.generate("To be", SamplingParams(max_tokens=40, temperature=0, ignore_eos=True, stop=[stop]))[0]
    assert out.text == base.text[: base.text.find(stop)]
    assert out.finish_reason == "stop"


def test_stop_token_ids_and_max_tokens(tiny_llm):
    base = tiny_llm.generate("To be", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True))[0]
    assert len(base.token_ids) == 12 and base.finish_reason == "length"
    stop_id = base.token_ids[5]
    out = tiny_llm.generate(
        "To be", SamplingParams(max_tokens=12, temperature=0, ignore_eos=True, stop_token_ids=[stop_id])
    )[0]
    first = base.token_ids.index(stop_id)
    assert out.token_ids == base.token_ids[: first + 1]
    assert out.finish_reason == "stop"


def rows(*params):
    return [sampler_row(p, [1, 2], []) for p in params]


def test_top_k_top_p_min_p_keep_the_right_tokens():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = lambda p: torch.isfinite(filter_logits(logits.clone(), rows(p))).squeeze(0).tolist()  # noqa: E731
    assert kept(SamplingParams(top_k=2)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.8)) == [True, True, False, False]
    assert kept(SamplingParams(top_p=0.81)) == [True, True, True, False]
    assert kept(SamplingParams(min_p=0.25)) == [True, True, True, False]
    assert kept(SamplingParams(min_p=0.5)) == [True, True, False, False]


def test_penalties_change_the_choice():
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    row = SamplerRow([2], [0], temperature=0, frequency_penalty=0.5)
    assert sample(logits.clone(), [row]).token_ids == [1]
    row = SamplerRow([0], [], temperature=0, repetition_penalty=1.2)
    assert sample(logits.clone(), [row]).token_ids == [1]
    row = SamplerRow([0], [0], temperature=0)
    assert sample(logits.clone(), [row]).token_ids == [0]


def test_sampled_frequencies_follow_the_distribution():
    probs = torch.tensor([0.6, 0.3, 0.1])
    logits = probs.log().unsqueeze(0)
    row = SamplerRow([1], [], seed=0)
    counts = torch.zeros(3)
    for _ in range(3000):
        counts[sample(logits.clone(), [row]).token_ids[0]] += 1
    assert torch.allclose(counts / counts.sum(), probs, atol=0.03)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(temperature=-1), "temperature"),
        (dict(top_p=0), "top_p"),
        (dict(top_k=0), "top_k"),
        (dict(max_tokens=0), "max_tokens"),
        (dict(logprobs=50), "logprobs"),
        (dict(presence_penalty=3), "presence_penalty"),
        (dict(stop=[""]), "stop"),
    ],
)
def test_invalid_params_name_the_field(kwargs, name):
    with pytest.raises(InvalidParameterError, match=name):
        SamplingParams(**kwargs)


def test_sampling_params_map_onto_plain_row_values():
    params = SamplingParams(temperature=0.7, top_p=0.9, top_k=5, min_p=0.1, repetition_penalty=1.1,
                            presence_penalty=0.5, frequency_penalty=-0.5, logprobs=3, seed=11)
    row = sampler_row(params, [1], [])
    assert (row.temperature, row.top_p, row.top_k, row.min_p) == (0.7, 0.9, 5, 0.1)
    assert (row.repetition_penalty, row.presence_penalty, row.frequency_penalty) == (1.1, 0.5, -0.5)
    assert (row.num_logprobs, row.seed) == (3, 11)


def test_seeded_generator_is_made_lazily_on_the_logits_device():
    row = SamplerRow([1], [], seed=5)
    assert row._generators == {}  # nothing made before the first draw
    logits = torch.tensor([[0.1, 0.2, 0.3, 0.4]]).log()
    first = sample(logits.clone(), [row]).token_ids
    cpu = torch.device("cpu")
    assert list(row._generators) == [cpu] and row.generator(cpu).device == cpu
    # Same seed, fresh row: the same draws (reproducible), and rows do not share a generator.
    again, other = SamplerRow([1], [], seed=5), SamplerRow([1], [], seed=5)
    assert sample(logits.expand(2, -1).clone(), [again, other]).token_ids == first * 2
    assert SamplerRow([1], []).generator(cpu) is None


def test_generator_for_an_accelerator_is_created_on_that_device(monkeypatch):
    made = []

    class RecordingGenerator:
        def __init__(self, device):
            made.append(device)

        def manual_seed(self, seed):
            made.append(seed)
            return self

    monkeypatch.setattr(torch, "Generator", RecordingGenerator)
    row = SamplerRow([1], [], seed=9)
    cuda = torch.device("cuda", 0)
    assert row.generator(cuda) is row.generator(cuda)  # one per device, kept across steps
    assert made == [cuda, 9]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_sampling_on_cuda_is_reproducible():
    logits = torch.randn(1, 50, device="cuda").expand(3, -1)  # three requests, one distribution
    first = sample(logits.clone(), [SamplerRow([1], [], seed=123) for _ in range(3)]).token_ids
    again = sample(logits.clone(), [SamplerRow([1], [], seed=123) for _ in range(3)]).token_ids
    assert first == again
    assert len(set(first)) == 1  # each row draws from its own generator: same seed, same token


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_seeded_generation_on_cuda(tiny_checkpoint):
    from selfhost import LLM

    llm = LLM(str(tiny_checkpoint("llama")), device="cuda", kv_cache_memory="64MiB")
    params = SamplingParams(seed=7, max_tokens=12, temperature=1.0, ignore_eos=True)
    a, b = llm.generate(["To be", "To be"], params)  # one batch, one generator per request
    assert a.token_ids == b.token_ids and len(a.token_ids) == 12
    assert llm.generate("To be", params)[0].token_ids == a.token_ids


def test_argmax_rows_picks_as_torch_does_ties_masks_and_nan_included():
    from selfhost.layers.sampler import argmax_rows

    logits = torch.randn(6, 1000, generator=torch.Generator().manual_seed(0))
    logits[1, [10, 500]] = 50.0  # a tie: the first index, as torch.argmax
    logits[2] = float("-inf")
    logits[2, 777] = -1e30  # everything masked but one
    logits[3, 321] = float("nan")  # NaN wins, as in torch
    view = logits[:, ::2]  # not contiguous
    for x in (logits, view):
        got = argmax_rows(x)
        assert got.dtype == torch.int64
        assert torch.equal(got, x.argmax(dim=-1))
