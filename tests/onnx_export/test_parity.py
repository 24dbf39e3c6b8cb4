"""ONNX Runtime on an export against selfhost on the same checkpoint, for every family and the demo model.

Logits within 1e-4 (fp32) on the prompt and on each of 20 decode steps fed
through the graph's past/present keys and values; the greedy continuation token
for token equal to what selfhost's own engine generates; onnx.checker passes.
The selfhost side's logits come from a full forward pass over the whole sequence
(no cache), so the ONNX cache path is checked against an independent computation.
"""

import numpy as np
import onnx
import pytest
import torch

from selfhost import LLM, SamplingParams
from selfhost.hub import EMBEDDED_MODEL_DIR
from selfhost.models.loader import load_model
from selfhost.onnx import layout
from selfhost.onnx.decoder import OnnxDecoder
from selfhost.quant.perplexity import _WindowKV
from tests.tiny_models import TINY_CONFIGS

DECODE_STEPS = 20
TOLERANCE = 1e-4
# Prompts longer than the tiny models' sliding windows (16 and 20 tokens), so windows bite during decode.
PROMPT_LEN = 24


def _selfhost_logits(model, token_ids: list[int]) -> np.ndarray:
    """(len, vocab) logits from one cache-free forward pass over the whole sequence."""
    with torch.inference_mode():
        hidden = model(torch.tensor(token_ids), torch.arange(len(token_ids)), _WindowKV())
        return model.compute_logits(hidden).numpy()


def _check_against_selfhost(model_dir, folder):
    onnx.checker.check_model(str(folder / layout.MODEL_FILE))
    model = load_model(model_dir, torch.float32, torch.device("cpu"), bf16_weights=False)
    decoder = OnnxDecoder(folder)
    prompt = np.random.RandomState(0).randint(3, model.spec.vocab_size, PROMPT_LEN).tolist()

    logits, cache = decoder.forward(prompt, decoder.empty_cache())
    np.testing.assert_allclose(logits, _selfhost_logits(model, prompt), atol=TOLERANCE, rtol=0)
    tokens = list(prompt)
    for _ in range(DECODE_STEPS):
        tokens.append(int(logits[-1].argmax()))
        logits, cache = decoder.forward(tokens[-1:], cache)
        assert next(iter(cache.values())).shape[2] == len(tokens)  # the present grew by one
        np.testing.assert_allclose(logits[-1], _selfhost_logits(model, tokens)[-1], atol=TOLERANCE, rtol=0)
    tokens.append(int(logits[-1].argmax()))

    llm = LLM(str(model_dir), device="cpu", weight_dtype=None, max_num_seqs=1)
    [out] = llm.generate([prompt], SamplingParams(max_tokens=DECODE_STEPS + 1, temperature=0.0, ignore_eos=True))
    assert tokens[len(prompt):] == out.token_ids


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_every_family_matches_selfhost(tiny_checkpoint, onnx_export, family):
    src = tiny_checkpoint(family)
    _check_against_selfhost(src, onnx_export(src))


# The standard-operator attention (what "auto" uses where GroupQueryAttention refuses the head
# size) on the families whose attention differs most: windows, soft-caps, q/k norms, longrope.
@pytest.mark.parametrize("family", ["llama", "mistral", "gemma2", "gemma3", "qwen3", "phi3"])
def test_plain_attention_matches_selfhost(tiny_checkpoint, onnx_export, family):
    src = tiny_checkpoint(family)
    _check_against_selfhost(src, onnx_export(src, attention="plain"))


def test_demo_model_matches_selfhost(onnx_export):
    folder = onnx_export(EMBEDDED_MODEL_DIR)
    assert layout.GENAI_CONFIG in {p.name for p in folder.iterdir()}
    _check_against_selfhost(EMBEDDED_MODEL_DIR, folder)


@pytest.mark.parametrize("family,attention", [("llama", "fused"), ("mistral", "plain")])
def test_batch_axis_is_dynamic(tiny_checkpoint, onnx_export, family, attention):
    """Two sequences in one call (prompt, then a cached step) give each one's single-sequence logits."""
    decoder = OnnxDecoder(onnx_export(tiny_checkpoint(family), attention=attention))
    rng = np.random.RandomState(1)
    prompts = rng.randint(3, 500, (2, PROMPT_LEN))
    cache = {name: np.concatenate([t, t]) for name, t in decoder.empty_cache().items()}
    mask = np.ones((2, PROMPT_LEN), np.int64)
    logits, *present = decoder.session.run(None, {"input_ids": prompts, "attention_mask": mask, **cache})
    nxt = logits[:, -1].argmax(-1)[:, None]
    cache = dict(zip(cache, present))
    step, *_ = decoder.session.run(None, {"input_ids": nxt, "attention_mask": np.ones((2, PROMPT_LEN + 1), np.int64),
                                          **cache})
    for row in range(2):
        alone, alone_cache = decoder.forward(prompts[row].tolist(), decoder.empty_cache())
        np.testing.assert_allclose(logits[row], alone, atol=1e-5, rtol=0)
        alone_step, _ = decoder.forward([int(nxt[row, 0])], alone_cache)
        np.testing.assert_allclose(step[row], alone_step, atol=1e-5, rtol=0)


def test_fp16_export_tracks_fp32(onnx_export):
    """--dtype fp16: half-size weights and KV cache, logits within fp16 rounding of fp32's, same greedy tokens."""
    full = OnnxDecoder(onnx_export(EMBEDDED_MODEL_DIR))
    half = OnnxDecoder(onnx_export(EMBEDDED_MODEL_DIR, dtype="fp16"))
    prompt = list(range(5, 60))
    full_logits, _ = full.forward(prompt, full.empty_cache())
    half_logits, half_cache = half.forward(prompt, half.empty_cache())
    assert next(iter(half_cache.values())).dtype == np.float16
    np.testing.assert_allclose(half_logits, full_logits, atol=0.05, rtol=0)  # measured 0.009 on logits up to ~18
    assert (half_logits.argmax(-1) == full_logits.argmax(-1)).all()


def test_partial_rotary_runs_fused(tmp_path, onnx_export):
    """Phi-3 with half the head dims rotated (rotary 16 of 32): GroupQueryAttention rotates only those."""
    from tests.tiny_models import make_tiny_checkpoint

    # A fresh rope dict: transformers writes into the one it is given, and TINY_CONFIGS' is shared.
    rope = dict(type="longrope", short_factor=[1.0 + 0.05 * i for i in range(8)],
                long_factor=[1.5 + 0.1 * i for i in range(8)])
    src = make_tiny_checkpoint("phi3", tmp_path / "phi3-partial", num_attention_heads=2, num_key_value_heads=1,
                               partial_rotary_factor=0.5, rope_scaling=rope)
    from selfhost.models.families import spec_from_config
    from selfhost.models.loader import read_config

    assert [r.rotary_dim for r in spec_from_config(read_config(src)).ropes] == [16]
    folder = onnx_export(src)
    assert OnnxDecoder(folder).info.attention == "fused"
    _check_against_selfhost(src, folder)


def test_fused_attention_is_refused_where_the_kernel_cannot_run(tiny_checkpoint, tmp_path):
    from selfhost.errors import InvalidParameterError
    from selfhost.onnx.export import export_onnx
    from selfhost.onnx.export_info import OnnxExportConfig

    with pytest.raises(InvalidParameterError, match="head_dim 24"):  # tiny Gemma: 24 is no multiple of 16
        export_onnx(tiny_checkpoint("gemma"), tmp_path / "out", OnnxExportConfig(attention="fused"))
    assert list(tmp_path.iterdir()) == []


# GroupQueryAttention reads each row's length as the mask's sum, so its prompts pad on the right;
# the standard-operator graph reads positions from the mask, so padding may sit on either side.
@pytest.mark.parametrize("attention,pad", [("plain", "left"), ("plain", "right"), ("fused", "right")])
def test_a_padded_row_scores_as_alone(tiny_checkpoint, onnx_export, attention, pad):
    decoder = OnnxDecoder(onnx_export(tiny_checkpoint("llama"), attention=attention))
    long, short = list(range(10, 10 + PROMPT_LEN)), list(range(50, 50 + PROMPT_LEN - 5))
    padded, mask = ([0] * 5 + short, [0] * 5 + [1] * len(short)) if pad == "left" else (
        short + [0] * 5, [1] * len(short) + [0] * 5)
    real = slice(5, None) if pad == "left" else slice(None, len(short))
    cache = {name: np.concatenate([t, t]) for name, t in decoder.empty_cache().items()}
    logits, *_ = decoder.session.run(None, {"input_ids": np.array([long, padded]),
                                            "attention_mask": np.array([[1] * PROMPT_LEN, mask]), **cache})
    assert np.isfinite(logits).all()
    np.testing.assert_allclose(logits[1, real], decoder.forward(short, decoder.empty_cache())[0], atol=1e-5, rtol=0)
    np.testing.assert_allclose(logits[0], decoder.forward(long, decoder.empty_cache())[0], atol=1e-5, rtol=0)
