"""ONNX Runtime GenAI loads the demo model's export (genai_config.json and all) and generates selfhost's greedy text."""

import onnxruntime_genai as og  # a dev dependency
import pytest

from selfhost import LLM, SamplingParams
from selfhost.hub import EMBEDDED_MODEL_DIR
from tests.tiny_models import TINY_CONFIGS

NEW_TOKENS = 40


@pytest.mark.parametrize("prompt", ["ROMEO:", "First Citizen:\nBefore we proceed any further, hear me speak."])
def test_onnxruntime_genai_generates_selfhosts_greedy_text(onnx_export, prompt):
    folder = onnx_export(EMBEDDED_MODEL_DIR)
    model = og.Model(str(folder))
    tokenizer = og.Tokenizer(model)
    prompt_ids = [int(t) for t in tokenizer.encode(prompt)]
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + NEW_TOKENS, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        generator.generate_next_token()
    genai_ids = [int(t) for t in generator.get_sequence(0)][len(prompt_ids):]

    llm = LLM(device="cpu", weight_dtype=None, max_num_seqs=1)
    assert llm.tokenizer.encode(prompt) == prompt_ids  # both runtimes read the same tokenizer files
    [out] = llm.generate([prompt_ids], SamplingParams(max_tokens=NEW_TOKENS, temperature=0.0))
    # GenAI keeps the end-of-text token in its sequence; selfhost ends the output there.
    eos = set(llm.tokenizer.eos_token_ids)
    genai_text_ids = genai_ids[: next((i for i, t in enumerate(genai_ids) if t in eos), len(genai_ids))]
    assert genai_text_ids == out.token_ids
    assert tokenizer.decode(genai_text_ids) == out.text
    assert len(out.token_ids) > 10  # a real continuation, not an immediate stop


def _genai_greedy(folder, prompt_ids: list[int], new_tokens: int) -> list[int]:
    model = og.Model(str(folder))
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt_ids) + new_tokens, do_sample=False)
    generator = og.Generator(model, params)
    generator.append_tokens(prompt_ids)
    while not generator.is_done():
        generator.generate_next_token()
    return [int(t) for t in generator.get_sequence(0)][len(prompt_ids):]


@pytest.mark.parametrize("family", sorted(TINY_CONFIGS))
def test_onnxruntime_genai_runs_every_family(tiny_checkpoint, onnx_export, family):
    """genai_config.json's model type and names work for each family (token ids in, so tokenizers do not matter)."""
    src = tiny_checkpoint(family)
    prompt_ids = list(range(10, 34))
    genai_ids = _genai_greedy(onnx_export(src), prompt_ids, 20)
    [out] = LLM(str(src), device="cpu", weight_dtype=None, max_num_seqs=1).generate(
        [prompt_ids], SamplingParams(max_tokens=20, temperature=0.0))
    # Both stop at the eos token; GenAI keeps it in the sequence, selfhost does not.
    assert genai_ids[: len(out.token_ids)] == out.token_ids
    assert len(genai_ids) == len(out.token_ids) + (out.finish_reason == "stop")
