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


# --- adversarial KD -------------------------------------------------------------------------

from kd import adversarial  # noqa: E402
from kd.adversarial import AdversarialKD, FeatureDiscriminator  # noqa: E402


@pytest.fixture
def one_thread():
    # hundreds of tiny steps: intra-op threads only contend on a shared machine
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("lambd", [1.0, 0.3])
def test_gradient_reversal_is_identity_forwards_and_minus_lambda_backwards(lambd):
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(5, 3, dtype=torch.float64)

    def f(features):
        return (torch.tanh(features) * weights).sum()

    (plain,) = torch.autograd.grad(f(x), x)
    reversed_out = adversarial.reverse_gradient(x, lambd)
    assert torch.equal(reversed_out, x)
    (flipped,) = torch.autograd.grad(f(reversed_out), x)
    assert torch.allclose(flipped, -lambd * plain, rtol=0, atol=1e-15)


def test_one_pass_scheme_trains_the_discriminator_and_reverses_the_features_gradient():
    torch.manual_seed(0)
    disc = FeatureDiscriminator(feature_dim=3, hidden_dim=8)
    teacher, student = torch.randn(4, 3), torch.randn(4, 3, requires_grad=True)
    loss = adversarial.discriminator_loss(disc, teacher, student)
    disc_grads = torch.autograd.grad(loss, [student, *disc.parameters()])
    rev_loss = adversarial.discriminator_loss(disc, teacher, adversarial.reverse_gradient(student, 0.5))
    rev_grads = torch.autograd.grad(rev_loss, [student, *disc.parameters()])
    assert torch.allclose(rev_grads[0], -0.5 * disc_grads[0])  # the features learn to confuse
    for same, reference in zip(rev_grads[1:], disc_grads[1:]):  # the discriminator learns to separate
        assert torch.equal(same, reference)


def test_student_update_leaves_the_discriminator_untouched(one_thread):
    torch.manual_seed(0)
    disc = FeatureDiscriminator(feature_dim=2, hidden_dim=8)
    student = torch.nn.Linear(2, 2)
    kd = AdversarialKD(discriminator=disc, disc_optimizer=torch.optim.SGD(disc.parameters(), lr=0.1),
                       student_optimizer=torch.optim.SGD(student.parameters(), lr=0.1))
    x, teacher = torch.randn(16, 2), torch.randn(16, 2) + 3

    def forward():
        features = student(x)
        return features, features.pow(2).mean()

    before_student = [p.detach().clone() for p in student.parameters()]
    out = kd.step(teacher_features=teacher, student_forward=forward)
    disc_after = [p.detach().clone() for p in disc.parameters()]
    # recompute the discriminator update alone from the same start: the student step changed nothing
    torch.manual_seed(0)
    ref = FeatureDiscriminator(feature_dim=2, hidden_dim=8)
    ref_opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    with torch.no_grad():
        s = torch.nn.Linear(2, 2)
        s.load_state_dict(dict(zip(("weight", "bias"), before_student)))
        feats = s(x)
    adversarial.discriminator_loss(ref, teacher, feats).backward()
    ref_opt.step()
    assert all(torch.equal(a, b) for a, b in zip(disc_after, ref.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(before_student, student.parameters()))
    assert set(out) == {"disc_loss", "imitation", "kd"}


def test_discriminator_accuracy_falls_towards_chance_as_the_student_learns_to_fool_it(one_thread):
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    shift = torch.tensor([2.0, -1.5])

    def teacher_features(n):  # the teacher's features: the raw input's, shifted
        return torch.randn(n, 2, generator=gen) + shift

    def raw(n):
        return torch.randn(n, 2, generator=gen)

    student = torch.nn.Linear(2, 2)
    with torch.no_grad():
        student.weight.copy_(torch.eye(2))
        student.bias.zero_()
    disc = FeatureDiscriminator(feature_dim=2, hidden_dim=16)
    disc_opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    for _ in range(50):  # the discriminator first learns to tell the two apart
        with torch.no_grad():
            feats = student(raw(128))
        loss = adversarial.discriminator_loss(disc, teacher_features(128), feats)
        disc_opt.zero_grad()
        loss.backward()
        disc_opt.step()

    def accuracy():
        with torch.no_grad():
            return adversarial.discriminator_accuracy(disc, teacher_features(1000), student(raw(1000)))

    start = accuracy()
    kd = AdversarialKD(discriminator=disc, disc_optimizer=disc_opt,
                       student_optimizer=torch.optim.Adam(student.parameters(), lr=2e-2))
    late = []
    for step in range(300):
        x = raw(128)
        kd.step(teacher_features=teacher_features(128), student_forward=lambda: (student(x), None))
        if step >= 200 and step % 20 == 0:
            late.append(accuracy())
    assert start > 0.85
    assert sum(late) / len(late) < 0.7, late
    # the student really moved its features onto the teacher's (the shift is what told them apart)
    assert torch.linalg.norm(student.bias.detach() - shift) < 0.5 * torch.linalg.norm(shift)


def test_interleaved_batches_resume_mid_run_and_run_through_epochs():
    sampler = TaskSampler({"big": 40, "small": 5}, seed=2)

    def batches(task, n_batches):
        return lambda epoch: iter([f"{task}:e{epoch}:b{i}" for i in range(n_batches)])

    epochs = {"big": batches("big", 4), "small": batches("small", 2)}
    full = list(multitask.interleave(sampler, epochs, start=0, stop=60))
    assert [task for _, task, _ in full] == sampler.schedule(0, 60)
    small = [batch for _, task, batch in full if task == "small"]
    assert small[:5] == ["small:e0:b0", "small:e0:b1", "small:e1:b0", "small:e1:b1", "small:e2:b0"]
    assert list(multitask.interleave(sampler, epochs, start=37, stop=60)) == full[37:]
    with pytest.raises(ValueError, match="small"):
        next(multitask.interleave(sampler, {"big": epochs["big"]}, start=0, stop=1))
