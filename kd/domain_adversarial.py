"""Adversarial feature adaptation for a distilled student (Xu & Yang 2017, "Cross-lingual
distillation for text classification", after Ganin & Lempitsky 2015).

The student learns from teacher labels on one text distribution (the *source*: e.g. the
target-language side of a parallel corpus) but is used on another (the *target* domain, seen
only as unlabeled text). A discriminator reads the student's sentence features (the input of its
output layer) and learns to tell source rows from target rows; through a gradient-reversal layer
the same loss pushes the student's features to make the two indistinguishable, so what the
student learned on the source carries over to the target.

One backward pass per update: `loss = KD loss + (BCE(D(GRL(f_source)), 1) + BCE(D(GRL(f_target)),
0)) / 2`, where GRL is the identity forwards and multiplies the gradient by -weight x lambda
backwards. So the discriminator always learns at full strength, and the student's features get
the reversed gradient scaled by `weight` (0: the discriminator only measures how separable the
domains are, a control) and by lambda, which follows Ganin's schedule
lambda(p) = 2 / (1 + exp(-10 p)) - 1 over training progress p in [0, 1] (`schedule: ganin`) or
stays 1 (`constant`).

Imported only by the stages that use it, so torch loads at module import.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from kd.adversarial import FeatureDiscriminator, discriminator_accuracy, discriminator_loss, reverse_gradient


def ganin_lambda(progress: float) -> float:
    """2 / (1 + exp(-10 p)) - 1: 0 at the start, 0.987 at p = 0.5, -> 1."""
    p = min(1.0, max(0.0, float(progress)))
    return 2.0 / (1.0 + math.exp(-10.0 * p)) - 1.0


def feature_layer(module: nn.Module) -> nn.Module:
    """The layer whose input is the student's sentence features: the student's own
    `feature_layer()` (bilstm, cnn, transformer students define it)."""
    get = getattr(module, "feature_layer", None)
    if get is None:
        raise ValueError(f"{type(module).__name__} does not say where its sentence features are "
                         "(no feature_layer()); domain_adversarial cannot read them")
    return get()


class FeatureTap:
    """Keeps the input of `layer` from the latest forward pass (a forward pre-hook)."""

    def __init__(self, layer: nn.Module):
        self.features: torch.Tensor | None = None
        self.handle = layer.register_forward_pre_hook(self._keep)

    def _keep(self, _layer, inputs) -> None:
        self.features = inputs[0]

    def take(self) -> torch.Tensor:
        features, self.features = self.features, None
        if features is None:
            raise RuntimeError("the student's output layer did not run in this forward pass")
        return features

    def close(self) -> None:
        self.handle.remove()


class DomainAdversary(nn.Module):
    """The discriminator and the reversed-gradient domain loss of one update."""

    def __init__(self, *, feature_dim: int, hidden_dim: int = 64, weight: float = 0.1, schedule: str = "ganin"):
        super().__init__()
        if weight < 0 or schedule not in ("ganin", "constant"):
            raise ValueError(f"need weight >= 0 and schedule ganin|constant, got {weight}, {schedule!r}")
        self.discriminator = FeatureDiscriminator(feature_dim=feature_dim, hidden_dim=hidden_dim)
        self.weight, self.schedule = float(weight), schedule

    def strength(self, progress: float) -> float:
        """weight x lambda(progress): what multiplies the reversed gradient."""
        return self.weight * (ganin_lambda(progress) if self.schedule == "ganin" else 1.0)

    def forward(self, source: torch.Tensor, target: torch.Tensor, *, progress: float) -> tuple[torch.Tensor, dict]:
        """The domain loss (the features' gradient reversed and scaled by `strength`) and the
        discriminator's accuracy on this update's rows (0.5 = chance)."""
        lam = self.strength(progress)
        loss = discriminator_loss(self.discriminator, reverse_gradient(source.float(), lam),
                                  reverse_gradient(target.float(), lam))
        accuracy = discriminator_accuracy(self.discriminator, source.detach().float(), target.detach().float())
        return loss, {"domain_loss": float(loss.detach()), "discriminator_accuracy": accuracy,
                      "reversal": round(lam, 4)}
