"""Distillation losses for classification students, combinable by weight.

All functions take logits shaped (batch, classes). Gold labels use -1 for "no gold label here"
(e.g. augmented rows), and those rows are left out of the gold terms. Teacher rows holding NaN
mean "no teacher logit here" (a tagging teacher's words cut off by its max_length): they are left
out of the teacher terms, and an ensemble averages only the teachers that have the row.

* `gold_cross_entropy`: cross-entropy on gold labels.
* `logit_mse`: mean squared error between student and teacher logits (Tang et al. 2019).
* `kl_at_temperature`: KL(teacher_T || student_T) * T^2 (Hinton et al. 2015); the T^2 keeps the
  gradient scale independent of T, so the weight of this term need not change with T.
* `annealed_cross_entropy`: BAM! teacher annealing (Clark et al. 2019): the target is
  lambda * gold + (1 - lambda) * teacher_probs with lambda = training progress in [0, 1], so early
  training follows the teacher and the end of training follows the gold labels. Rows without gold
  keep the teacher target throughout.
* `combine_teachers`: one logit tensor from several teachers (mean or normalised weights).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

if TYPE_CHECKING:
    import torch


def gold_cross_entropy(student: "torch.Tensor", gold: "torch.Tensor") -> "torch.Tensor":
    import torch
    import torch.nn.functional as F

    mask = gold >= 0
    if not bool(mask.any()):
        return student.sum() * 0.0  # keeps the graph (and device) while contributing nothing
    return F.cross_entropy(student[mask], gold[mask].to(torch.long))


def has_teacher(teacher: "torch.Tensor") -> "torch.Tensor":
    """Rows (bool, shape batch) whose teacher logits are all finite."""
    import torch

    return torch.isfinite(teacher).all(dim=-1)


def logit_mse(student: "torch.Tensor", teacher: "torch.Tensor") -> "torch.Tensor":
    import torch.nn.functional as F

    mask = has_teacher(teacher)
    if not bool(mask.any()):
        return student.sum() * 0.0
    return F.mse_loss(student[mask], teacher[mask].to(student.dtype))


def kl_at_temperature(student: "torch.Tensor", teacher: "torch.Tensor", temperature: float) -> "torch.Tensor":
    import torch.nn.functional as F

    mask = has_teacher(teacher)
    if not bool(mask.any()):
        return student.sum() * 0.0
    student, teacher = student[mask], teacher[mask]
    t = float(temperature)
    log_p_student = F.log_softmax(student / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher.to(student.dtype) / t, dim=-1)
    kl = F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True)
    return kl * (t * t)


def anneal_lambda(progress: float) -> float:
    """Weight of the gold label in the BAM! target: 0 at the start of training, 1 at the end."""
    return min(1.0, max(0.0, float(progress)))


def annealed_targets(teacher: "torch.Tensor", gold: "torch.Tensor", progress: float) -> "torch.Tensor":
    import torch
    import torch.nn.functional as F

    lam = anneal_lambda(progress)
    known = has_teacher(teacher)
    teacher_probs = F.softmax(torch.nan_to_num(teacher.float()), dim=-1)
    has_gold = gold >= 0
    onehot = F.one_hot(gold.clamp(min=0).to(torch.long), teacher.shape[-1]).float()
    mixed = lam * onehot + (1.0 - lam) * teacher_probs
    # Rows without a teacher logit follow gold alone; rows with neither are all zeros (no loss).
    mixed = torch.where(known.unsqueeze(-1), mixed, onehot * has_gold.unsqueeze(-1))
    return torch.where(has_gold.unsqueeze(-1), mixed, teacher_probs * known.unsqueeze(-1))


def annealed_cross_entropy(student: "torch.Tensor", teacher: "torch.Tensor", gold: "torch.Tensor",
                           progress: float) -> "torch.Tensor":
    import torch.nn.functional as F

    target = annealed_targets(teacher, gold, progress).to(student.dtype)
    rows = target.sum(dim=-1) > 0
    if not bool(rows.any()):
        return student.sum() * 0.0
    return -(target[rows] * F.log_softmax(student[rows], dim=-1)).sum(dim=-1).mean()


def combine_teachers(logits: Sequence["torch.Tensor"], *, mode: str = "mean",
                     weights: Sequence[float] | None = None) -> "torch.Tensor":
    """Average teachers' logits. Logits rather than probabilities: the result stays a logit
    vector, so MSE and temperature-KL apply to an ensemble exactly as to one teacher."""
    import torch

    if len(logits) == 1:
        return logits[0].float()
    stacked = torch.stack([t.float() for t in logits])
    if mode == "mean":
        w = torch.ones(len(logits), dtype=torch.float32, device=stacked.device)
    elif weights is None or len(weights) != len(logits):
        raise ValueError(f"ensemble mode 'weighted' needs {len(logits)} weights, got {weights!r}")
    else:
        w = torch.tensor([float(x) for x in weights], dtype=torch.float32, device=stacked.device)
        if float(w.sum()) <= 0:
            raise ValueError("ensemble weights must sum to a positive number")
    # Per row, only the teachers that have it count; a row no teacher has stays NaN (masked later).
    present = has_teacher(stacked).float() * w.view(-1, *([1] * (stacked.dim() - 2)))
    total = present.sum(dim=0)
    combined = (torch.nan_to_num(stacked) * present.unsqueeze(-1)).sum(dim=0) / total.clamp(min=1e-12).unsqueeze(-1)
    return torch.where((total > 0).unsqueeze(-1), combined, torch.full_like(combined, float("nan")))


def distillation_loss(student: "torch.Tensor", *, gold: "torch.Tensor", teacher: "torch.Tensor | None",
                      ce: float = 0.0, mse: float = 0.0, kl: float = 0.0, temperature: float = 1.0,
                      anneal: bool = False, progress: float = 0.0) -> tuple["torch.Tensor", dict[str, float]]:
    """Weighted sum of the configured terms, and each term's value for the training curves.

    With `anneal`, the `ce` weight applies to the annealed soft-target cross-entropy instead of
    plain gold cross-entropy (at progress 1 the two are identical on gold rows)."""
    parts: dict[str, "torch.Tensor"] = {}
    if ce:
        if anneal and teacher is not None:
            parts["ce"] = annealed_cross_entropy(student, teacher, gold, progress)
        else:
            parts["ce"] = gold_cross_entropy(student, gold)
    if teacher is not None:
        if mse:
            parts["mse"] = logit_mse(student, teacher)
        if kl:
            parts["kl"] = kl_at_temperature(student, teacher, temperature)
    weights = {"ce": ce, "mse": mse, "kl": kl}
    if not parts:
        raise ValueError("no loss term is active: give a positive weight to ce (gold) or to mse/kl "
                         "together with a labels input")
    total = sum(weights[name] * value for name, value in parts.items())
    return total, {name: float(value.detach()) for name, value in parts.items()}
