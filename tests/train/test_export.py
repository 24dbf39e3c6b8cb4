"""The exported folder is a plain Hugging Face model: transformers and selfhost agree on it."""

import json

import pytest
import torch
import transformers

from selfhost import LLM, SamplingParams
from selfhost.models.loader import load_model
from selfhost.train.data import Document, split_tokens, train_tokenizer
from selfhost.train.export import export_model, hf_state_dict
from selfhost.train.model import llama_config
from selfhost.train.trainer import Trainer
from tests.train.conftest import TINY_SHAPE, assert_matches_transformers, make_corpus_text, tiny_config

PROMPT = "HAMLET:\nThe king doth love"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    torch.set_num_threads(1)
    docs = [Document("a", make_corpus_text(0))]
    tok = train_tokenizer(docs, TINY_SHAPE.vocab_size)
    cfg = tiny_config(max_steps=10, eval_every=10)
    split = split_tokens(docs, tok, cfg.val_fraction, TINY_SHAPE.context_len)
    config = llama_config(TINY_SHAPE, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    trainer = Trainer(config, TINY_SHAPE, cfg, split, torch.device("cpu"))
    trainer.run(show_progress=False)
    # Random-looking norms, so a norm exported under the wrong name cannot pass unnoticed.
    with torch.no_grad():
        for name, param in trainer.model.named_parameters():
            if "norm" in name:
                param.add_(torch.randn_like(param) * 0.1)
    out = export_model(trainer.model, config, tok, tmp_path_factory.mktemp("export") / "model", overwrite=False)
    return trainer, tok, out


def test_logits_match_transformers(trained):
    _, _, out = trained
    assert_matches_transformers(out, PROMPT)


def test_config_and_weight_names_are_transformers_own(trained):
    trainer, _, out = trained
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"] is True
    names = set(hf_state_dict(trainer.model, torch.float32))
    assert "model.layers.0.self_attn.q_proj.weight" in names and "model.layers.1.mlp.up_proj.weight" in names
    assert not any("qkv_proj" in n or "gate_up_proj" in n for n in names)
    assert "lm_head.weight" not in names  # tied: transformers rebuilds it from the embeddings


def test_tokenizer_round_trip_and_chat_template(trained):
    _, tok, out = trained
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    text = "OPHELIA:\nSweet lady shall see — naïve 🙂\n"
    assert hf_tok(text)["input_ids"] == tok(text)["input_ids"]
    assert hf_tok.decode(hf_tok(text)["input_ids"]) == text
    rendered = hf_tok.apply_chat_template([{"role": "user", "content": "Who's there?"}], tokenize=False,
                                          add_generation_prompt=True)
    assert rendered == "USER:\nWho's there?\n\nASSISTANT:\n"


def test_selfhost_generates_from_the_export(trained):
    _, _, out = trained
    llm = LLM(str(out), device="cpu")
    result = llm.generate(PROMPT, SamplingParams(max_tokens=8, temperature=0.0))[0]
    assert len(result.token_ids) >= 1


@pytest.mark.parametrize("save_dtype", ["float16", "bfloat16"])
def test_half_precision_export_loads_upcast(trained, tmp_path, save_dtype):
    trainer, tok, _ = trained
    out = export_model(trainer.model, trainer.model_config, tok, tmp_path / "m", False, save_dtype)
    model = load_model(out, torch.float32, torch.device("cpu"))
    weight = model.model.layers[0].self_attn.qkv_proj.weight
    assert weight.dtype == torch.float32
    expected = trainer.model.model.layers[0].self_attn.qkv_proj.weight.detach()
    dtype = getattr(torch, save_dtype)
    assert torch.equal(weight, expected.to(dtype).float())
