"""The one-call decode runner (engine/decode_layers.py) against the Python layer path: the same
kernels in the same order, so the same tokens and the same logprobs, bit for bit."""

import pytest
import torch

from selfhost import LLM, SamplingParams
from selfhost.engine import decode_layers
from selfhost.engine.decode_layers import DecodeLayers, runner_available
from selfhost.engine.paged_cache import StepMetadata
from selfhost.layers.bf16_linear import Bf16Linear, tiles_available
from selfhost.models import bf16_weights
from selfhost.quant import apply as quant_apply
from selfhost.quant import int8_products
from selfhost.quant.int8 import Int8Linear
from selfhost.speculative.speculator import Speculator

needs_runner = pytest.mark.skipif(
    not (runner_available() and tiles_available()),
    reason="the runner takes bf16 'tiles' weights: a CPU with AMX and selfhost's compiled kernels",
)

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], list(range(20, 61))]
# How each case is loaded: the weights' dtype, the bf16 layout (AMX tiles, or W's rows), and the
# few-row switch, pinned (it is measured at load): 8 sends the decode steps' 3 rows to the few-row
# kernel on both paths, 1 sends them to the AMX product.
# "int8": int8 weights (and embedding) on quant/_int8_cpu.c's products, at the switches measured here;
# "int8_amx": the AMX-INT8 kernel's switch pinned at 2 rows (where the CPU has it).
WEIGHTS = {"bf16_tiles": ("bfloat16", "tiles", 8), "bf16_tiles_amx": ("bfloat16", "tiles", 1),
           "bf16_rows": ("bfloat16", "rows", 8), "fp32": ("float32", None, 8), "int8": (None, None, 8),
           "int8_amx": (None, None, 8)}


def _load(path, kv_cache_dtype, weights="bf16_tiles", monkeypatch=None, **kwargs):
    weight_dtype, layout, switch = WEIGHTS[weights]
    if layout is not None and monkeypatch is not None:
        monkeypatch.setattr(bf16_weights, "best_layout", lambda: layout)
    if weights.startswith("int8"):
        kwargs["quantization"] = "int8"
    if weights == "int8_amx":
        if not int8_products.amx_available():
            pytest.skip("the AMX-INT8 kernel needs a CPU with AMX")
        monkeypatch.setattr(quant_apply, "amx_from_rows", lambda *args: 2)
    llm = LLM(path, weight_dtype=weight_dtype, kv_cache_dtype=kv_cache_dtype, **kwargs)
    for module in llm.engine.runner.model.modules():
        if isinstance(module, Bf16Linear):
            module.few_rows_max = switch
    return llm


def _outputs(llm, params):
    return [(list(o.token_ids), [(lp.token_id, lp.logprob, sorted(lp.top.items())) for lp in o.logprobs])
            for o in llm.generate(PROMPTS, params)]


def _count_runner_steps(monkeypatch):
    taken = []
    original = DecodeLayers.__call__

    def counting(self, *args):
        result = original(self, *args)
        taken.append(result is not None)
        return result

    monkeypatch.setattr(DecodeLayers, "__call__", counting)
    return taken


@needs_runner
# untied head; q|k|v bias; sliding window; q/k norm; widths no multiple of 32
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "qwen3", "llama-odd-widths"])
@pytest.mark.parametrize("kv_cache_dtype", ["bfloat16", "float32", "int8"])
@pytest.mark.parametrize("weights", list(WEIGHTS))
def test_runner_steps_equal_the_python_path(tiny_checkpoint, monkeypatch, family, kv_cache_dtype, weights):
    params = SamplingParams(max_tokens=24, temperature=0, ignore_eos=True, logprobs=3)
    taken = _count_runner_steps(monkeypatch)
    llm = _load(str(tiny_checkpoint(family)), kv_cache_dtype, weights, monkeypatch)
    with_runner = _outputs(llm, params)
    assert llm.engine.runner._layers_runner.kind == weights.removesuffix("_amx")
    if weights == "int8_amx":  # every layer's products past 2 rows on AMX (odd widths: never, VNNI neither)
        switches = {m.amx_from_rows for m in llm.model.modules() if isinstance(m, Int8Linear)}
        assert switches == ({decode_layers.NEVER} if family == "llama-odd-widths" else {2})
        # ... reading their tiles as packed at load (the runner is handed them; none where AMX never runs)
        assert all((m.amx_packed is not None) == (m.amx_from_rows == 2)
                   for m in llm.model.modules() if isinstance(m, Int8Linear))
    assert taken.count(True) >= 20  # the decode steps went through it; prompt steps were declined
    assert taken.count(False) >= 1
    monkeypatch.setattr(decode_layers, "_PYTHON_ONLY", True)
    taken.clear()
    python_path = _outputs(_load(str(tiny_checkpoint(family)), kv_cache_dtype, weights, monkeypatch), params)
    assert not taken
    assert with_runner == python_path


@needs_runner
@pytest.mark.parametrize("kv_cache_dtype", ["bfloat16", "int8"])
def test_speculative_verifications_through_the_runner_keep_greedy_output(tiny_checkpoint, monkeypatch,
                                                                         kv_cache_dtype):
    """A verification is k + 1 single-token queries of one sequence: the keys are all written first
    (store_first), in the runner as in the fused kernel."""
    path = str(tiny_checkpoint("llama"))
    repetitive = [[7, 8, 9, 10, 11, 7, 8, 9, 10, 11, 7, 8, 9]]
    params = SamplingParams(max_tokens=32, temperature=0, ignore_eos=True)
    plain = _load(path, kv_cache_dtype).generate(repetitive, params)[0].token_ids
    llm = _load(path, kv_cache_dtype, speculative="ngram", num_speculative_tokens=4)
    current = llm.engine.speculator
    llm.engine.speculator = Speculator(type(current.config)(**{**current.config.__dict__, "when": "always"}),
                                       current.draft)
    taken = _count_runner_steps(monkeypatch)
    assert llm.generate(repetitive, params)[0].token_ids == plain
    assert llm.engine.stats().spec_proposed_tokens > 0 and taken.count(True) > 0


@needs_runner
def test_models_the_runner_does_not_know_keep_the_python_path(tiny_checkpoint):
    def runner(llm):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))
        return llm.engine.runner._layers_runner

    assert isinstance(runner(_load(str(tiny_checkpoint("llama")), "bfloat16")), DecodeLayers)
    assert runner(LLM(str(tiny_checkpoint("llama")), quantization="int4")) is None  # int4 products
    assert runner(_load(str(tiny_checkpoint("gemma2")), "bfloat16")) is None  # sandwich norms, soft-capping


@needs_runner
def test_the_runner_declines_or_refuses_a_step_without_touching_the_cache(tiny_checkpoint):
    llm = _load(str(tiny_checkpoint("llama")), "bfloat16")
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))
    runner, cache = llm.engine.runner._layers_runner, llm.engine.runner.cache
    with torch.inference_mode():  # as the engine's steps run (grad on: the runner declines)
        assert runner(torch.tensor([5]), torch.tensor([3]), cache, 1) is None  # no step metadata: not a step it takes
        # one decoding sequence whose key goes to block 0's first slot
        cache.meta = StepMetadata(slot_mapping=torch.tensor([0]), num_single=1,
                                  single_block_tables=torch.zeros(1, 1, dtype=torch.long),
                                  single_context_lens=torch.tensor([1]), chunks=[])
        keys, values = cache.k.clone(), cache.v.clone()
        vocab, positions = llm.engine.runner.model.spec.vocab_size, runner.rotary_rows
        for ids, at in (([vocab], [3]), ([-1], [3]), ([5], [positions])):  # past the embedding or the rotary table
            with pytest.raises(ValueError, match="outside its table"):
                runner(torch.tensor(ids), torch.tensor(at), cache, 1)
        assert torch.equal(cache.k, keys) and torch.equal(cache.v, values)
        assert runner(torch.tensor([5]), torch.tensor([0]), cache, 1).shape == (1, 64)  # the same step, in range
        cache.meta = None


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    import transformers

    from tests.tiny_models import COMMON, MOE_CONFIGS, save_tiny_tokenizer

    def build(name):
        config_cls, overrides = MOE_CONFIGS[name]
        torch.manual_seed(0)
        model = transformers.AutoModelForCausalLM.from_config(getattr(transformers, config_cls)(**{**COMMON, **overrides}))
        out = tmp_path_factory.mktemp(name)
        model.save_pretrained(out, safe_serialization=True)
        save_tiny_tokenizer(out)
        return str(out)

    return build


@needs_runner
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
@pytest.mark.parametrize("weights", ["bf16_tiles", "bf16_tiles_amx", "fp32", "int8"])
def test_runner_takes_mixture_of_experts_layers_bit_for_bit(moe_checkpoint, monkeypatch, family, weights):
    """The router's product and the experts' one C call (layers/_moe_cpu.c) inside the runner:
    the same kernels as SparseMoE.forward, so the same tokens and logprobs."""
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True, logprobs=3)
    taken = _count_runner_steps(monkeypatch)
    with_runner = _outputs(_load(moe_checkpoint(family), "bfloat16", weights, monkeypatch), params)
    assert taken.count(True) >= 12
    monkeypatch.setattr(decode_layers, "_PYTHON_ONLY", True)
    taken.clear()
    assert _outputs(_load(moe_checkpoint(family), "bfloat16", weights, monkeypatch), params) == with_runner
    assert not taken


@needs_runner
def test_a_shared_expert_keeps_the_python_path(moe_checkpoint):
    llm = _load(moe_checkpoint("qwen2_moe"), "bfloat16")
    llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, temperature=0))
    assert llm.engine.runner._layers_runner is None
