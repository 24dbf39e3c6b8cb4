"""The distillation objective against the formula computed by hand, element by element."""

import math

import pytest
import torch

from selfhost.errors import InvalidParameterError
from selfhost.shrink.kd_loss import (
    DistillConfig,
    TeacherTargets,
    distillation_loss,
    soft_loss,
    teacher_logprobs,
    top_k_targets,
)


def kl_by_hand(teacher_logits, student_logits, temperature):
    """mean over rows of sum_i p_i (log p_i - log q_i), softmaxes written out in float64 Python."""
    total = 0.0
    for t_row, s_row in zip(teacher_logits.tolist(), student_logits.tolist()):
        t_row = [x / temperature for x in t_row]
        s_row = [x / temperature for x in s_row]
        t_norm = math.log(sum(math.exp(x) for x in t_row))
        s_norm = math.log(sum(math.exp(x) for x in s_row))
        total += sum(math.exp(t - t_norm) * ((t - t_norm) - (s - s_norm)) for t, s in zip(t_row, s_row))
    return total / len(teacher_logits)


def cross_entropy_by_hand(student_logits, targets):
    total = 0.0
    for row, target in zip(student_logits.tolist(), targets.tolist()):
        total += math.log(sum(math.exp(x) for x in row)) - row[target]
    return total / len(targets)


@pytest.fixture
def batch():
    gen = torch.Generator().manual_seed(0)
    teacher = torch.randn(6, 11, generator=gen) * 3
    student = torch.randn(6, 11, generator=gen) * 2
    targets = torch.randint(11, (6,), generator=gen)
    return teacher, student, targets


def test_temperature_1_alpha_1_is_the_kl_by_hand(batch):
    teacher, student, targets = batch
    cfg = DistillConfig(temperature=1.0, alpha=1.0)
    loss = distillation_loss(student, targets, TeacherTargets(teacher_logprobs(teacher, 1.0)), cfg)
    assert loss.item() == pytest.approx(kl_by_hand(teacher, student, 1.0), rel=1e-5)


def test_temperature_and_alpha_mix_soft_and_hard_losses(batch):
    teacher, student, targets = batch
    cfg = DistillConfig(temperature=2.0, alpha=0.3)
    loss = distillation_loss(student, targets, TeacherTargets(teacher_logprobs(teacher, 2.0)), cfg)
    expected = 0.3 * 4.0 * kl_by_hand(teacher, student, 2.0) + 0.7 * cross_entropy_by_hand(student, targets)
    assert loss.item() == pytest.approx(expected, rel=1e-5)


def test_alpha_0_is_plain_next_token_loss_without_a_teacher(batch):
    _, student, targets = batch
    loss = distillation_loss(student, targets, None, DistillConfig(alpha=0.0))
    assert loss.item() == pytest.approx(cross_entropy_by_hand(student, targets), rel=1e-5)


def test_top_k_over_the_whole_vocabulary_equals_the_full_kl_and_has_finite_gradients(batch):
    teacher, student, _ = batch
    student = student.clone().requires_grad_()
    full = soft_loss(student, TeacherTargets(teacher_logprobs(teacher, 2.0)), 2.0)
    top = top_k_targets(teacher, 2.0, k=11)
    assert torch.isneginf(top.tail_logprob).all()
    cached = soft_loss(student, top, 2.0)
    assert cached.item() == pytest.approx(full.item(), rel=1e-6)
    cached.backward()
    assert torch.isfinite(student.grad).all()


def test_top_k_keeps_the_tail_mass_and_is_the_kl_over_k_plus_one_outcomes(batch):
    teacher, student, _ = batch
    k = 4
    top = top_k_targets(teacher, 1.0, k)
    p = torch.softmax(teacher.double(), -1)
    q = torch.softmax(student.double(), -1)
    top_p, ids = p.topk(k, -1)
    assert torch.equal(ids, top.ids)
    assert torch.allclose(top.tail_logprob.double().exp(), 1 - top_p.sum(-1), atol=1e-6)
    q_top = q.gather(-1, ids)
    p_tail, q_tail = 1 - top_p.sum(-1), 1 - q_top.sum(-1)
    by_hand = ((top_p * (top_p / q_top).log()).sum(-1) + p_tail * (p_tail / q_tail).log()).mean()
    assert soft_loss(student, top, 1.0).item() == pytest.approx(by_hand.item(), rel=1e-5)
    # Bucketing the tail can only lose information: never above the full KL.
    assert soft_loss(student, top, 1.0).item() <= kl_by_hand(teacher, student, 1.0) + 1e-6


@pytest.mark.parametrize("fields, message", [
    (dict(temperature=0.0), "--temperature 0.0 must be positive"),
    (dict(alpha=1.5), "--alpha 1.5 must be in [0, 1]"),
    (dict(cache_top_k=0), "top-k=0 must be at least 1"),
])
def test_bad_settings_name_the_value(fields, message):
    with pytest.raises(InvalidParameterError, match=message.replace("[", r"\[").replace("]", r"\]")):
        DistillConfig(**fields)
