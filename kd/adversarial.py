"""Adversarial knowledge distillation: a discriminator tells teacher features from student
features, and the student learns to make them indistinguishable.

* Imitation (Liu et al., AAAI 2019): the teacher sees privileged input, the student raw input;
  `AdversarialKD.step` alternates one discriminator update (teacher = 1, student = 0, student
  features detached) with one student update on the usual KD loss plus `weight` times the
  non-saturating "fool the discriminator" loss (student features labelled as teacher).
* Feature adaptation in one backward pass (Ganin & Lempitsky 2015; Xu & Yang 2017 across
  languages): `reverse_gradient` is the identity forwards and multiplies the gradient by -lambda
  backwards, so one loss trains the discriminator to separate and the features to confuse.

Imported only by the stages that use it, so torch loads at module import.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn


class GradientReversal(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, lambd: float):
        ctx.lambd = float(lambd)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad_output):
        return -ctx.lambd * grad_output, None


def reverse_gradient(x: torch.Tensor, lambd: float = 1.0) -> torch.Tensor:
    return GradientReversal.apply(x, lambd)


class FeatureDiscriminator(nn.Module):
    """An MLP from a feature vector to one logit: > 0 means "a teacher's feature"."""

    def __init__(self, *, feature_dim: int, hidden_dim: int = 64, num_layers: int = 2, dropout: float = 0.0):
        super().__init__()
        if feature_dim <= 0 or hidden_dim <= 0 or num_layers < 1:
            raise ValueError("a discriminator needs feature_dim > 0, hidden_dim > 0 and num_layers >= 1")
        layers: list[nn.Module] = []
        width = feature_dim
        for _ in range(num_layers - 1):
            layers += [nn.Linear(width, hidden_dim), nn.LeakyReLU(0.2), nn.Dropout(dropout)]
            width = hidden_dim
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.net(features).squeeze(-1)


def discriminator_loss(disc: nn.Module, teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy: teacher features are 1, student features 0. Pass detached student
    features for the alternating scheme, `reverse_gradient(student)` for the one-pass scheme."""
    t_logit, s_logit = disc(teacher), disc(student)
    return 0.5 * (F.binary_cross_entropy_with_logits(t_logit, torch.ones_like(t_logit))
                  + F.binary_cross_entropy_with_logits(s_logit, torch.zeros_like(s_logit)))


def imitation_loss(disc: nn.Module, student: torch.Tensor) -> torch.Tensor:
    """The student's adversarial term: -log D(student), i.e. student features labelled teacher
    (the non-saturating form: strong gradients while the discriminator still wins)."""
    logit = disc(student)
    return F.binary_cross_entropy_with_logits(logit, torch.ones_like(logit))


@torch.no_grad()
def discriminator_accuracy(disc: nn.Module, teacher: torch.Tensor, student: torch.Tensor) -> float:
    """Share of features classified right (0.5 is chance on balanced inputs)."""
    correct = (disc(teacher) > 0).sum() + (disc(student) <= 0).sum()
    return float(correct) / (len(teacher) + len(student))


class AdversarialKD:
    """Alternating updates: the discriminator first (on detached student features), then the
    student on `kd_loss + weight * imitation_loss`. The student's update leaves the
    discriminator's weights and gradients untouched."""

    def __init__(self, *, discriminator: nn.Module, disc_optimizer: torch.optim.Optimizer,
                 student_optimizer: torch.optim.Optimizer, weight: float = 1.0, disc_steps: int = 1):
        if weight < 0 or disc_steps < 1:
            raise ValueError(f"need weight >= 0 and disc_steps >= 1, got {weight}, {disc_steps}")
        self.disc, self.disc_opt, self.student_opt = discriminator, disc_optimizer, student_optimizer
        self.weight, self.disc_steps = float(weight), int(disc_steps)

    def step(self, *, teacher_features: torch.Tensor,
             student_forward: Callable[[], tuple[torch.Tensor, torch.Tensor | None]]) -> dict[str, float]:
        """`student_forward()` runs the student on the step's batch and returns its features and
        its usual KD loss (or None). It runs without a graph for each discriminator update, then
        once more for the student update, which so sees the discriminator just updated."""
        teacher = teacher_features.detach()
        for _ in range(self.disc_steps):
            with torch.no_grad():
                features, _ = student_forward()
            d_loss = discriminator_loss(self.disc, teacher, features)
            self.disc_opt.zero_grad(set_to_none=True)
            d_loss.backward()
            self.disc_opt.step()

        features, kd = student_forward()
        for p in self.disc.parameters():
            p.requires_grad_(False)
        try:
            adv = imitation_loss(self.disc, features)
        finally:
            for p in self.disc.parameters():
                p.requires_grad_(True)
        total = self.weight * adv if kd is None else kd + self.weight * adv
        self.student_opt.zero_grad(set_to_none=True)
        total.backward()
        self.student_opt.step()
        out = {"disc_loss": float(d_loss.detach()), "imitation": float(adv.detach())}
        if kd is not None:
            out["kd"] = float(kd.detach())
        return out
