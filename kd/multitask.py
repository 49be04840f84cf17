"""Building blocks of a multi-task student (one shared encoder, one head per task).

* `TaskSampler`: BAM! (Clark et al. 2019) single-task batches; the task of each step is drawn with
  probability proportional to its size ** alpha (alpha = 0.75 in the paper), so small tasks are
  seen more often than under size-proportional sampling without being repeated as often as under
  uniform sampling. The draw is a pure function of (seed, step): a resumed run sees the same tasks.
* `interleave`: the batches of those steps, each from its task's own stream of epochs; resuming
  at a step skips in each stream as many batches as that task was drawn before it.
* `gold_weight`: BAM! teacher annealing. The target is lambda * gold + (1 - lambda) * teacher with
  lambda rising linearly from 0 to 1 over training, so a student starts by imitating its teacher
  and ends on the gold labels (the paper's direction). Each task may anneal over its own window.
* `ensemble_soft_targets`, `soft_cross_entropy`, `mtdnn_kd_loss`: MT-DNN KD (Liu et al. 2019):
  a task's soft target is the mean of its teachers' class probabilities (at a temperature), and
  rows with a gold label mix the soft-target loss with gold cross-entropy by a weight.

Gold labels use -1 for "no gold label here", as in `kd/losses.py`.
"""
from __future__ import annotations

import hashlib
import struct
from bisect import bisect_right
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping, Sequence

if TYPE_CHECKING:
    import torch


def task_probabilities(sizes: Mapping[str, int], alpha: float = 0.75) -> dict[str, float]:
    """P(task) proportional to size ** alpha; alpha 1 is size-proportional, 0 uniform."""
    if not sizes:
        raise ValueError("task sampling needs at least one task with its number of examples")
    bad = {name: n for name, n in sizes.items() if not isinstance(n, int) or n <= 0}
    if bad:
        raise ValueError(f"every task needs a positive number of examples; got {bad}")
    if alpha < 0:
        raise ValueError(f"alpha must be >= 0 (0 samples tasks uniformly), got {alpha}")
    mass = {name: float(n) ** alpha for name, n in sizes.items()}
    total = sum(mass.values())
    return {name: m / total for name, m in mass.items()}


def _uniform(seed: int, step: int) -> float:
    """A number in [0, 1) that depends only on (seed, step), stable across Python and numpy versions."""
    digest = hashlib.blake2b(struct.pack("<qq", int(seed), int(step)), digest_size=8).digest()
    return int.from_bytes(digest, "little") / 2.0**64


class TaskSampler:
    """Which task the batch of training step `step` comes from (BAM! single-task batches)."""

    def __init__(self, sizes: Mapping[str, int], *, alpha: float = 0.75, seed: int = 0):
        self.probabilities = task_probabilities(sizes, alpha)
        self.tasks = sorted(self.probabilities)  # a fixed order, whatever the mapping's order
        self.seed = int(seed)
        self._cumulative: list[float] = []
        running = 0.0
        for name in self.tasks:
            running += self.probabilities[name]
            self._cumulative.append(running)

    def task_at(self, step: int) -> str:
        index = bisect_right(self._cumulative, _uniform(self.seed, step) * self._cumulative[-1])
        return self.tasks[min(index, len(self.tasks) - 1)]

    def schedule(self, start: int, stop: int) -> list[str]:
        return [self.task_at(step) for step in range(start, stop)]


def interleave(sampler: TaskSampler, epochs: Mapping[str, Callable[[int], Iterator[Any]]], *,
               start: int, stop: int) -> Iterator[tuple[int, str, Any]]:
    """(step, task, batch) for steps start..stop-1. `epochs[task](epoch)` iterates one epoch of
    the task's batches (seeded by epoch, so replaying it gives the same batches); a task's epoch
    ends when its iterator does and the next one begins at once."""
    missing = set(sampler.tasks) - set(epochs)
    if missing:
        raise ValueError(f"no batches for tasks {sorted(missing)}; give each sampled task its batch stream")

    def stream(task: str) -> Iterator[Any]:
        epoch = 0
        while True:
            empty = True
            for batch in epochs[task](epoch):
                empty = False
                yield batch
            if empty:
                raise ValueError(f"task {task!r} has no batches in epoch {epoch}")
            epoch += 1

    streams = {task: stream(task) for task in sampler.tasks}
    for step in range(start):  # replay only the positions, never the training
        next(streams[sampler.task_at(step)])
    for step in range(start, stop):
        task = sampler.task_at(step)
        yield step, task, next(streams[task])


@dataclass(frozen=True)
class AnnealWindow:
    """The part of training (as fractions of it) over which a task's gold weight rises 0 -> 1.
    `enabled=False` keeps lambda at 1: plain gold training for that task, no teacher target."""

    start: float = 0.0
    end: float = 1.0
    enabled: bool = True

    def __post_init__(self):
        if not 0.0 <= self.start < self.end <= 1.0:
            raise ValueError(f"an annealing window needs 0 <= start < end <= 1, got {self.start}..{self.end}")


def gold_weight(progress: float, window: AnnealWindow = AnnealWindow()) -> float:
    """BAM! lambda: the weight of the gold label in the target at `progress` in [0, 1]."""
    if not window.enabled:
        return 1.0
    return min(1.0, max(0.0, (float(progress) - window.start) / (window.end - window.start)))


def gold_weights(progress: float, windows: Mapping[str, AnnealWindow]) -> dict[str, float]:
    return {task: gold_weight(progress, window) for task, window in windows.items()}


def ensemble_soft_targets(teacher_logits: Sequence["torch.Tensor"], temperature: float = 1.0) -> "torch.Tensor":
    """MT-DNN KD soft targets: the mean over teachers of softmax(logits / T). Probabilities, not
    logits, are averaged, as in the paper (`kd.losses.combine_teachers` averages logits)."""
    import torch

    if not teacher_logits:
        raise ValueError("an ensemble needs at least one teacher's logits")
    if temperature <= 0:
        raise ValueError(f"temperature must be positive, got {temperature}")
    shapes = {tuple(t.shape) for t in teacher_logits}
    if len(shapes) != 1:
        raise ValueError(f"teachers' logits differ in shape: {sorted(shapes)}")
    probs = [torch.softmax(t.float() / float(temperature), dim=-1) for t in teacher_logits]
    return torch.stack(probs).mean(dim=0)


def mix_with_gold(soft: "torch.Tensor", gold: "torch.Tensor", weight: float) -> "torch.Tensor":
    """weight * onehot(gold) + (1 - weight) * soft on rows with gold; `soft` alone elsewhere."""
    import torch
    import torch.nn.functional as F

    has_gold = (gold >= 0).unsqueeze(-1)
    onehot = F.one_hot(gold.clamp(min=0).to(torch.long), soft.shape[-1]).to(soft.dtype)
    return torch.where(has_gold, float(weight) * onehot + (1.0 - float(weight)) * soft, soft)


def _soft_ce_rows(student: "torch.Tensor", target: "torch.Tensor", temperature: float) -> "torch.Tensor":
    import torch.nn.functional as F

    t = float(temperature)
    log_p = F.log_softmax(student / t, dim=-1)
    return -(target.to(log_p.dtype) * log_p).sum(dim=-1) * (t * t)


def soft_cross_entropy(student: "torch.Tensor", target: "torch.Tensor", temperature: float = 1.0) -> "torch.Tensor":
    """Mean over rows of -sum_c target_c log softmax(student / T)_c, times T^2 (as Hinton et al.,
    so the gradient scale does not change with T)."""
    return _soft_ce_rows(student, target, temperature).mean()


def mtdnn_kd_loss(student: "torch.Tensor", soft: "torch.Tensor", gold: "torch.Tensor", *,
                  gold_weight: float, temperature: float = 1.0) -> "torch.Tensor":
    """MT-DNN KD, per row: (1 - w) * soft-target cross-entropy at T + w * gold cross-entropy (at
    T = 1) on rows with gold; the soft term alone on rows without; the mean over rows."""
    import torch
    import torch.nn.functional as F

    if not 0.0 <= gold_weight <= 1.0:
        raise ValueError(f"gold_weight must be in [0, 1], got {gold_weight}")
    soft_rows = _soft_ce_rows(student, soft, temperature)
    has_gold = gold >= 0
    gold_rows = F.cross_entropy(student, gold.clamp(min=0).long(), reduction="none")
    mixed = (1.0 - gold_weight) * soft_rows + gold_weight * gold_rows
    return torch.where(has_gold, mixed, soft_rows).mean()
