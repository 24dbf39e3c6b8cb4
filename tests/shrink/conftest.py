"""A tiny trained teacher (so its soft targets carry information) and its corpus, built once per session."""

from __future__ import annotations

import pytest
import torch

from selfhost.train.config import ModelShape
from selfhost.train.data import Document, split_tokens, train_tokenizer
from selfhost.train.export import export_model
from selfhost.train.model import llama_config
from selfhost.train.trainer import Trainer
from tests.train.conftest import make_corpus_text, tiny_config

TEACHER_SHAPE = ModelShape(vocab_size=300, hidden_size=48, intermediate_size=96, num_layers=3, num_heads=4,
                           num_kv_heads=2, context_len=32)


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny models spend their time in thread hand-offs; one thread is faster and immune to busy cores."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def corpus_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(make_corpus_text(0) + "\n" + make_corpus_text(1))
    return path


@pytest.fixture(scope="session")
def teacher_dir(tmp_path_factory, corpus_file):
    """A 3-layer GQA Llama trained for 60 steps on the grammar corpus, exported as a Hugging Face folder."""
    torch.set_num_threads(1)
    docs = [Document("corpus", corpus_file.read_text())]
    tok = train_tokenizer(docs, TEACHER_SHAPE.vocab_size)
    cfg = tiny_config(max_steps=60, eval_every=60)
    split = split_tokens(docs, tok, cfg.val_fraction, TEACHER_SHAPE.context_len)
    config = llama_config(TEACHER_SHAPE, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    trainer = Trainer(config, TEACHER_SHAPE, cfg, split, torch.device("cpu"))
    trainer.run(show_progress=False)
    return export_model(trainer.model, config, tok, tmp_path_factory.mktemp("teacher") / "teacher", False)
