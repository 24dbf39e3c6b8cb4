"""The measured switch from selfhost's fp32 GEMM to torch's (MKL) product, its cache, and where it applies."""

import json

import pytest
import torch
import torch.nn.functional as F

from selfhost.layers import linear
from selfhost.layers.linear import Linear
from selfhost.models import fp32_products
from selfhost.models.fp32_products import NEVER, PROBE_ROWS, blas_from_rows, choose_blas_from_rows

needs_gemm = pytest.mark.skipif(not linear.USE_GEMM, reason="selfhost's fp32 GEMM needs AVX-512")


def seconds(ours: dict[int, float], torch_s: dict[int, float]) -> dict[str, float]:
    return {**{f"selfhost@{r}": ours[r] for r in PROBE_ROWS}, **{f"torch@{r}": torch_s[r] for r in PROBE_ROWS}}


def flat(value: float) -> dict[int, float]:
    return dict.fromkeys(PROBE_ROWS, value)


@pytest.mark.parametrize("torch_s,expected", [
    (flat(2.0), NEVER),                                    # slower everywhere
    (flat(0.99), NEVER),                                   # within the margin: a tie keeps selfhost's
    ({64: 1.5, 128: 1.2, 256: 0.8, 512: 0.7, 1024: 0.6}, 256),  # overtakes from 256 rows
    ({64: 0.5, 128: 1.2, 256: 1.2, 512: 1.2, 1024: 1.2}, NEVER),  # one fast small probe is not enough
    ({64: 1.5, 128: 0.5, 256: 1.1, 512: 0.8, 1024: 0.8}, 128),  # one slow probe above is outweighed
    ({64: 1.5, 128: 1.5, 256: 1.5, 512: 1.5, 1024: 0.5}, NEVER),  # a win at the last probe alone: not enough
    ({64: 1.5, 128: 1.5, 256: 1.5, 512: 0.5, 1024: 0.5}, 512),  # two probes: taken
])
def test_the_switch_is_where_torch_wins_at_and_above(torch_s, expected):
    assert blas_from_rows(seconds(flat(1.0), torch_s)) == expected


def test_the_measurement_is_cached_per_cpu_shape_and_threads(monkeypatch, tmp_path):
    monkeypatch.setenv("SELFHOST_CACHE_DIR", str(tmp_path))
    calls = []
    measured = seconds(flat(1.0), {64: 2.0, 128: 2.0, 256: 0.5, 512: 0.5, 1024: 0.5})
    monkeypatch.setattr(fp32_products, "measure", lambda *args: calls.append(args) or measured)
    first, again = choose_blas_from_rows(64, 128, 2), choose_blas_from_rows(64, 128, 2)
    other = choose_blas_from_rows(64, 128, 1)
    assert first == (256, False) and again == (256, True) and other == (256, False)
    assert calls == [(64, 128, 2), (64, 128, 1)]
    # big shapes are probed on a capped one (a 7B model's full shape would make loading slow)
    choose_blas_from_rows(8192, 28672, 2)
    assert calls[-1] == (fp32_products.PROBE_MAX_IN, fp32_products.PROBE_MAX_OUT, 2)
    (tmp_path / "fp32_products.json").write_text("{not json")
    assert choose_blas_from_rows(64, 128, 2) == (256, False)  # a damaged cache is measured again
    assert len(json.loads((tmp_path / "fp32_products.json").read_text())) == 1


@needs_gemm
def test_the_real_measurement_times_both_products():
    measured = fp32_products.measure(64, 96, threads=1)
    assert set(measured) == set(seconds(flat(1), flat(1))) and all(v > 0 for v in measured.values())


@needs_gemm
@torch.inference_mode()
def test_a_linear_hands_rows_from_the_switch_to_torch():
    layer = Linear(96, 80, bias=True)
    layer.weight.normal_(), layer.bias.normal_()
    mine = Linear(96, 80, bias=True)
    mine.load_state_dict(layer.state_dict())
    layer.blas_from_rows = 8
    for rows in (1, 7, 8, 30):
        x = torch.randn(rows, 96)
        got = layer(x, 2)
        if rows >= 8:
            assert torch.equal(got, F.linear(x, layer.weight, layer.bias))
        else:
            assert torch.equal(got, mine(x, 2))  # selfhost's product, as with no switch
        assert torch.allclose(got, F.linear(x, layer.weight, layer.bias), atol=1e-5)


@needs_gemm
def test_the_loader_gives_the_switch_to_every_linear_but_experts(tmp_path, monkeypatch):
    import transformers

    from selfhost import LLM
    from selfhost.layers.moe import SparseMoE
    from tests.tiny_models import COMMON, MOE_CONFIGS, save_tiny_tokenizer

    config_cls, overrides = MOE_CONFIGS["mixtral"]
    config = getattr(transformers, config_cls)(**{**COMMON, **overrides})
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path, safe_serialization=True)
    save_tiny_tokenizer(tmp_path)
    monkeypatch.setattr(fp32_products, "choose_blas_from_rows", lambda *args: (128, True))
    model = LLM(str(tmp_path), kv_cache_memory="64MiB").engine.runner.model
    moes = [m for m in model.modules() if type(m) is SparseMoE]
    experts = {id(m) for moe in moes for m in moe.experts.modules()}
    linears = [m for m in model.modules() if type(m) is Linear]
    assert [m.blas_from_rows for m in linears] == [NEVER if id(m) in experts else 128 for m in linears]
    assert len(moes) == 3 and all(moe.gate.blas_from_rows == 128 for moe in moes)
    assert model.lm_head.blas_from_rows == 128
    from selfhost.models.bf16_weights import linear_kernels

    assert linear_kernels(model) == "fp32: selfhost AVX-512 GEMM up to 127 rows, torch (MKL) beyond (measured)"


@needs_gemm
@torch.inference_mode()
def test_the_decode_head_leaves_rows_from_the_switch_to_linear():
    from selfhost.engine.decode_head import DecodeHead

    head = Linear(32, 50, bias=False)
    head.weight.normal_()
    head.blas_from_rows = 4
    decode_head = DecodeHead(head)
    few = torch.randn(3, 32)
    logits, _ = decode_head(few, 1)
    assert torch.equal(logits, head(few, 1))  # selfhost's product, as Linear.forward calls it below the switch
    assert decode_head(torch.randn(4, 32), 1) is None  # torch's from there: the caller runs compute_logits
