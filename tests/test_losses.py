"""Each distillation loss against values computed by hand on 2-class examples."""
from __future__ import annotations

import math

import pytest
import torch

from kd import losses


def test_gold_cross_entropy_skips_rows_without_gold():
    student = torch.tensor([[2.0, 0.0], [0.0, 1.0], [5.0, -5.0]])
    gold = torch.tensor([0, 1, -1])
    # -log softmax: row 0 -> log(1 + e^-2), row 1 -> log(1 + e^-1); row 2 has no gold label
    expected = (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(-1))) / 2
    assert losses.gold_cross_entropy(student, gold).item() == pytest.approx(expected, rel=1e-6)


def test_gold_cross_entropy_is_zero_without_any_gold():
    student = torch.tensor([[2.0, 0.0]], requires_grad=True)
    value = losses.gold_cross_entropy(student, torch.tensor([-1]))
    assert value.item() == 0.0
    value.backward()  # still differentiable: a batch of augmented rows must not crash training


def test_logit_mse():
    student = torch.tensor([[1.0, 2.0]])
    teacher = torch.tensor([[0.0, 4.0]])
    assert losses.logit_mse(student, teacher).item() == pytest.approx((1 + 4) / 2)


def test_kl_at_temperature_is_scaled_by_t_squared():
    student = torch.tensor([[0.0, 0.0]])
    teacher = torch.tensor([[2.0, 0.0]])
    t = 2.0
    # teacher at T=2: softmax([1, 0]); student: uniform
    p1 = math.e / (math.e + 1)
    p = [p1, 1 - p1]
    kl = sum(pi * math.log(pi / 0.5) for pi in p)
    assert kl == pytest.approx(0.110943, abs=1e-5)
    got = losses.kl_at_temperature(student, teacher, t).item()
    assert got == pytest.approx(kl * t * t, rel=1e-5)
    # identical distributions give zero at any temperature
    assert losses.kl_at_temperature(teacher, teacher, 3.0).item() == pytest.approx(0.0, abs=1e-7)


def test_annealing_endpoints():
    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    gold = torch.tensor([1, -1])
    probs = torch.softmax(teacher, dim=-1)
    start = losses.annealed_targets(teacher, gold, 0.0)
    end = losses.annealed_targets(teacher, gold, 1.0)
    middle = losses.annealed_targets(teacher, gold, 0.5)
    assert torch.allclose(start, probs)  # progress 0: the teacher alone
    assert torch.allclose(end[0], torch.tensor([0.0, 1.0]))  # progress 1: the gold label
    assert torch.allclose(end[1], probs[1])  # no gold: the teacher throughout
    assert torch.allclose(middle[0], 0.5 * probs[0] + 0.5 * torch.tensor([0.0, 1.0]))
    assert losses.anneal_lambda(-0.2) == 0.0 and losses.anneal_lambda(1.7) == 1.0


def test_annealed_cross_entropy_at_end_equals_gold_cross_entropy():
    student = torch.tensor([[0.3, -0.2], [1.0, 0.5]])
    teacher = torch.tensor([[2.0, 0.0], [0.0, 1.0]])
    gold = torch.tensor([1, 0])
    a = losses.annealed_cross_entropy(student, teacher, gold, 1.0)
    assert a.item() == pytest.approx(losses.gold_cross_entropy(student, gold).item(), rel=1e-6)


def test_combine_teachers_mean_and_weighted():
    a, b = torch.tensor([[1.0, 3.0]]), torch.tensor([[3.0, 5.0]])
    assert torch.allclose(losses.combine_teachers([a, b]), torch.tensor([[2.0, 4.0]]))
    weighted = losses.combine_teachers([a, b], mode="weighted", weights=[1, 3])
    assert torch.allclose(weighted, torch.tensor([[2.5, 4.5]]))
    with pytest.raises(ValueError, match="needs 2 weights"):
        losses.combine_teachers([a, b], mode="weighted", weights=[1])


def test_distillation_loss_weights_terms():
    student = torch.tensor([[1.0, 2.0]])
    teacher = torch.tensor([[0.0, 4.0]])
    gold = torch.tensor([1])
    total, parts = losses.distillation_loss(student, gold=gold, teacher=teacher, ce=0.5, mse=2.0,
                                            kl=0.0, temperature=1.0)
    assert parts["mse"] == pytest.approx(2.5)
    assert total.item() == pytest.approx(0.5 * parts["ce"] + 2.0 * 2.5, rel=1e-6)
    with pytest.raises(ValueError, match="no loss term"):
        losses.distillation_loss(student, gold=gold, teacher=None, ce=0.0, mse=1.0)
