"""The loop learns, and a resumed run is bit-identical to an uninterrupted one."""

import torch

from selfhost.train.data import Document, split_tokens, train_tokenizer
from selfhost.train.model import llama_config
from selfhost.train.trainer import Trainer, lr_factor
from tests.train.conftest import TINY_SHAPE, make_corpus_text, tiny_config

CPU = torch.device("cpu")


def make_trainer(cfg, checkpoint_dir=None):
    docs = [Document("a", make_corpus_text(0)), Document("b", make_corpus_text(1))]
    tok = train_tokenizer(docs, TINY_SHAPE.vocab_size)
    split = split_tokens(docs, tok, cfg.val_fraction, TINY_SHAPE.context_len)
    config = llama_config(TINY_SHAPE, len(tok), tok.bos_token_id, tok.eos_token_id, tok.pad_token_id)
    return Trainer(config, TINY_SHAPE, cfg, split, CPU, checkpoint_dir)


def test_training_lowers_validation_loss():
    trainer = make_trainer(tiny_config(max_steps=40, eval_every=40))
    before = trainer.evaluate()
    history = trainer.run(show_progress=False)
    assert history[-1].step == 40
    assert history[-1].val_loss < before - 1.0, (before, history[-1].val_loss)


def test_resume_from_checkpoint_is_bit_identical(tmp_path):
    cfg = tiny_config(max_steps=30, checkpoint_every=10, grad_accum=2)
    full = make_trainer(cfg, tmp_path / "full")
    full.run(show_progress=False)

    # A fresh process-like start: new trainer, state from the step-20 checkpoint only.
    resumed = make_trainer(cfg, tmp_path / "resumed")
    resumed.load_state_dict(torch.load(tmp_path / "full" / "step-000020.pt", weights_only=True))
    assert resumed.step == 20
    resumed.run(show_progress=False)

    for (name, a), (_, b) in zip(full.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    for a, b in zip(full.optimizer.state_dict()["state"].values(), resumed.optimizer.state_dict()["state"].values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert full.sampler.state_dict() == resumed.sampler.state_dict()
    assert [p.val_loss for p in full.history] == [p.val_loss for p in resumed.history]


def test_same_seed_same_weights_and_old_checkpoints_pruned(tmp_path):
    cfg = tiny_config(max_steps=10, eval_every=10, checkpoint_every=2)
    a, b = make_trainer(cfg, tmp_path / "a"), make_trainer(cfg)
    a.run(show_progress=False)
    b.run(show_progress=False)
    assert all(torch.equal(x, y) for x, y in zip(a.model.parameters(), b.model.parameters()))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["step-000008.pt", "step-000010.pt"]


def test_lr_schedule_warms_up_then_decays_to_floor():
    cfg = tiny_config(max_steps=100, warmup_steps=10, min_lr_ratio=0.1)
    factors = [lr_factor(s, cfg) for s in range(101)]
    assert factors[0] == 0.1 and factors[9] == 1.0
    assert all(x >= y for x, y in zip(factors[10:], factors[11:]))
    assert abs(factors[100] - 0.1) < 1e-12
