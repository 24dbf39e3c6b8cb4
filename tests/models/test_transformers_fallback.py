"""The labelled transformers fallback: an architecture without native code still runs, and matches transformers."""

import subprocess
import sys

import pytest
import torch
import transformers

from selfhost import LLM, SamplingParams
from selfhost.errors import InvalidParameterError, UnsupportedModelError
from tests.tiny_models import save_tiny_tokenizer


@pytest.fixture(scope="module")
def gpt2_dir(tmp_path_factory):
    """GPT-2: learned positions, fused c_attn, no native selfhost code."""
    out = tmp_path_factory.mktemp("gpt2")
    config = transformers.GPT2Config(vocab_size=400, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                     bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    transformers.GPT2LMHeadModel(config).save_pretrained(out, safe_serialization=True)
    save_tiny_tokenizer(out)
    return out


def reference_greedy(model_dir, prompt_ids, new_tokens):
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor([prompt_ids])
    with torch.inference_mode():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    return out[0, len(prompt_ids):].tolist()


def test_unsupported_architecture_without_the_flag_names_it(gpt2_dir):
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel.*--transformers-fallback"):
        LLM(str(gpt2_dir))


def test_fallback_matches_transformers_greedy_for_a_batch(gpt2_dir):
    llm = LLM(str(gpt2_dir), transformers_fallback=True)
    prompts = [[5, 17, 42, 99, 3], [7] * 23, list(range(10, 60))]
    params = SamplingParams(max_tokens=12, temperature=0, ignore_eos=True)
    outs = llm.generate(prompts, params)
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference_greedy(gpt2_dir, prompt, 12)


def test_fallback_survives_preemption_with_identical_outputs(gpt2_dir):
    # 64 tokens of KV metering for three requests needing ~40 each: the scheduler must preempt.
    bytes_per_token = 2 * 2 * 4 * 16 * 4
    small = LLM(str(gpt2_dir), transformers_fallback=True, kv_cache_memory=bytes_per_token * 64)
    prompts = [list(range(5, 30)), list(range(40, 65)), list(range(70, 95))]
    params = SamplingParams(max_tokens=14, temperature=0, ignore_eos=True)
    outs = small.generate(prompts, params)
    assert small.engine.stats().num_preemptions > 0
    for prompt, out in zip(prompts, outs):
        assert out.token_ids == reference_greedy(gpt2_dir, prompt, 14)


def test_fallback_refuses_what_it_cannot_do(gpt2_dir):
    llm = LLM(str(gpt2_dir), transformers_fallback=True)
    with pytest.raises(InvalidParameterError, match="prompt logprobs"):
        llm.generate([[5, 6, 7]], SamplingParams(max_tokens=2, prompt_logprobs=1))
    with pytest.raises(InvalidParameterError, match="natively supported"):
        LLM(str(gpt2_dir), transformers_fallback=True, quantization="int8")


def selfhost_cli(*args):
    return subprocess.run([sys.executable, "-m", "selfhost.cli", *args], capture_output=True, text=True, timeout=300)


def test_cli_runs_the_fallback_and_explains_without_it(gpt2_dir):
    plain = selfhost_cli("run", str(gpt2_dir), "To be", "--max-tokens", "4")
    assert plain.returncode == 1
    assert "--transformers-fallback" in plain.stderr and "Traceback" not in plain.stderr
    with_flag = selfhost_cli("run", str(gpt2_dir), "To be", "--max-tokens", "4", "--transformers-fallback")
    assert with_flag.returncode == 0, with_flag.stderr
    assert with_flag.stdout.startswith("To be")
    assert "slower fallback" in with_flag.stderr
