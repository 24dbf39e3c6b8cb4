import pytest

from selfhost import LLM, SamplingParams
from selfhost.errors import InvalidParameterError, ModelNotFoundError, UnsupportedModelError


def test_chat_template_matches_transformers(tiny_llm):
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Who is Hamlet?"},
    ]
    expected = tiny_llm.tokenizer.hf.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    if hasattr(expected, "keys"):  # newer transformers return a BatchEncoding
        expected = expected["input_ids"]
    assert tiny_llm.tokenizer.encode_chat(messages) == list(expected)
    out = tiny_llm.chat(messages, SamplingParams(max_tokens=4, temperature=0))[0]
    assert out.prompt_token_ids == list(expected)


def test_prompts_as_strings_or_token_ids(tiny_llm):
    params = SamplingParams(max_tokens=5, temperature=0, ignore_eos=True)
    ids = tiny_llm.tokenizer.encode("To be")
    by_text = tiny_llm.generate(["To be", "or not"], params)
    by_ids = tiny_llm.generate([ids], params)
    assert len(by_text) == 2
    assert by_text[0].token_ids == by_ids[0].token_ids
    assert tiny_llm.generate(ids, params)[0].token_ids == by_ids[0].token_ids


def test_prompt_errors(tiny_llm):
    with pytest.raises(InvalidParameterError, match="empty"):
        tiny_llm.generate([[]])
    with pytest.raises(InvalidParameterError, match="context"):
        tiny_llm.generate([[5] * tiny_llm.max_model_len])
    with pytest.raises(InvalidParameterError, match="vocabulary"):
        tiny_llm.generate([[10**6]])


def test_output_never_exceeds_context(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint("llama")), max_model_len=16)
    out = llm.generate([[5] * 10], SamplingParams(max_tokens=100, temperature=0, ignore_eos=True))[0]
    assert len(out.token_ids) == 6 and out.finish_reason == "length"


def test_missing_folder_and_bad_reference(tmp_path):
    with pytest.raises(ModelNotFoundError, match="config.json"):
        LLM(str(tmp_path))
    with pytest.raises(ModelNotFoundError, match="neither a local folder nor"):
        LLM("not a model id!")


def test_pickled_weights_refused_without_opt_in(tiny_checkpoint, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file

    src = tiny_checkpoint("llama")
    for f in src.iterdir():
        if f.suffix != ".safetensors":
            shutil.copy(f, tmp_path / f.name)
    torch.save(load_file(src / "model.safetensors"), tmp_path / "pytorch_model.bin")
    with pytest.raises(UnsupportedModelError, match="allow-pickle"):
        LLM(str(tmp_path))
    reference = LLM(str(src)).generate("To be", SamplingParams(max_tokens=5, temperature=0))[0]
    pickled = LLM(str(tmp_path), allow_pickle=True).generate("To be", SamplingParams(max_tokens=5, temperature=0))[0]
    assert pickled.token_ids == reference.token_ids
