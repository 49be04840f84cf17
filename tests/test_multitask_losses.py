"""Multi-task sampling, teacher annealing, MT-DNN KD soft targets, and the adversarial-KD pieces
(gradient reversal, discriminator vs student), each against values computed by hand."""
from __future__ import annotations

import math

import pytest
import torch

from kd import multitask
from kd.multitask import AnnealWindow, TaskSampler


def test_task_probabilities_follow_size_to_the_power_alpha():
    sizes = {"sst2": 6000, "cola": 800, "rte": 200}
    probs = multitask.task_probabilities(sizes, alpha=0.75)
    mass = {k: v**0.75 for k, v in sizes.items()}
    assert probs == pytest.approx({k: m / sum(mass.values()) for k, m in mass.items()})
    assert multitask.task_probabilities(sizes, alpha=0.0) == pytest.approx({k: 1 / 3 for k in sizes})
    assert multitask.task_probabilities(sizes, alpha=1.0)["rte"] == pytest.approx(200 / 7000)


def test_sampled_task_proportions_match_the_probabilities():
    sizes = {"sst2": 6000, "cola": 800, "rte": 200}
    sampler = TaskSampler(sizes, seed=3)
    n = 20_000
    drawn = sampler.schedule(0, n)
    for task, p in sampler.probabilities.items():
        # 4 binomial standard deviations: fails by chance about once in 15,000 seeds
        assert abs(drawn.count(task) / n - p) < 4 * math.sqrt(p * (1 - p) / n), task
    # not size-proportional: the smallest task is drawn well above its 200/7000 share
    assert drawn.count("rte") / n > 1.5 * 200 / 7000


def test_task_schedule_is_a_pure_function_of_seed_and_step():
    sizes = {"a": 100, "b": 100}
    first = TaskSampler(sizes, seed=7).schedule(0, 500)
    # a resumed run (a fresh sampler, starting mid-way) and a reordered mapping see the same tasks
    assert TaskSampler({"b": 100, "a": 100}, seed=7).schedule(250, 500) == first[250:]
    other = TaskSampler(sizes, seed=8).schedule(0, 500)
    assert other != first and set(first) == {"a", "b"}


@pytest.mark.parametrize("sizes, alpha", [({}, 0.75), ({"a": 0}, 0.75), ({"a": 5}, -1.0)])
def test_task_sampler_rejects_bad_sizes(sizes, alpha):
    with pytest.raises(ValueError, match="task|alpha"):
        TaskSampler(sizes, alpha=alpha)


def test_teacher_annealing_goes_from_teacher_to_gold():
    full = AnnealWindow()
    assert [multitask.gold_weight(p, full) for p in (0.0, 0.25, 0.5, 1.0, 1.5)] == [0.0, 0.25, 0.5, 1.0, 1.0]
    late = AnnealWindow(start=0.5, end=1.0)
    assert [multitask.gold_weight(p, late) for p in (0.0, 0.5, 0.75, 1.0)] == [0.0, 0.0, 0.5, 1.0]
    per_task = multitask.gold_weights(0.5, {"sst2": full, "cola": late, "rte": AnnealWindow(enabled=False)})
    assert per_task == {"sst2": 0.5, "cola": 0.0, "rte": 1.0}
    with pytest.raises(ValueError, match="start < end"):
        AnnealWindow(start=0.6, end=0.4)


def test_ensemble_soft_targets_are_the_mean_of_tempered_probabilities():
    a = torch.tensor([[2.0, 0.0]])
    b = torch.tensor([[0.0, 4.0]])
    t = 2.0
    # a/T = [1, 0] -> [e/(e+1), 1/(e+1)]; b/T = [0, 2] -> [1/(1+e^2), e^2/(1+e^2)]
    pa = [math.e / (math.e + 1), 1 / (math.e + 1)]
    pb = [1 / (1 + math.e**2), math.e**2 / (1 + math.e**2)]
    expected = [[(pa[0] + pb[0]) / 2, (pa[1] + pb[1]) / 2]]
    assert multitask.ensemble_soft_targets([a, b], temperature=t).tolist() == [pytest.approx(expected[0])]
    with pytest.raises(ValueError, match="shape"):
        multitask.ensemble_soft_targets([a, torch.zeros(1, 3)])


def test_mix_with_gold_keeps_rows_without_gold_on_the_soft_target():
    soft = torch.tensor([[0.6, 0.4], [0.2, 0.8]])
    mixed = multitask.mix_with_gold(soft, torch.tensor([1, -1]), weight=0.25)
    assert mixed.tolist() == [pytest.approx([0.45, 0.55]), pytest.approx([0.2, 0.8])]


def test_mtdnn_kd_loss_mixes_soft_and_gold_cross_entropy_per_row():
    student = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    soft = torch.tensor([[0.5, 0.5], [0.9, 0.1]])
    gold = torch.tensor([1, -1])
    w, t = 0.3, 2.0
    log_p0 = [math.log(math.exp(0.5) / (math.exp(0.5) + 1)), math.log(1 / (math.exp(0.5) + 1))]
    soft0 = -(0.5 * log_p0[0] + 0.5 * log_p0[1]) * t * t
    soft1 = -math.log(0.5) * t * t  # uniform student: -sum target * log 1/2
    gold0 = math.log(1 + math.e)  # -log softmax([1, 0])[1]
    expected = ((1 - w) * soft0 + w * gold0 + soft1) / 2
    got = multitask.mtdnn_kd_loss(student, soft, gold, gold_weight=w, temperature=t)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    # gold weight 0 is pure soft-target KD
    pure = multitask.mtdnn_kd_loss(student, soft, gold, gold_weight=0.0, temperature=t)
    assert pure.item() == pytest.approx((soft0 + soft1) / 2, rel=1e-6)
