"""Token-level KD losses for a causal LM student, on the M target positions of a batch.

Every loss takes the student's [M, V] logits at the target positions. Teacher targets:
* `topk_kd`: k kept ids + their log-probs; the student's and teacher's remaining mass form one
  tail bucket, so both are proper distributions over k + 1 outcomes (forward, reverse or mixed KL).
* `sampled_kd`: Sparse Logit Sampling, drawn ids with weights (counts / K): -sum w log q is an
  unbiased estimate of H(p, q), whose gradient is the forward KL's.
* `full_kd`: the teacher's full logits (the online upper bound, used by the bench).
All are scaled by T^2 (Hinton et al.) so the gradient size does not depend on the temperature.
"""
from __future__ import annotations

from typing import Literal

Divergence = Literal["forward", "reverse", "mixed"]


def _kl(p_log, q_log):
    """sum p (log p - q), with 0 log 0 = 0, over the last axis."""
    import torch

    p = p_log.exp()
    return torch.where(p > 0, p * (p_log - q_log), torch.zeros_like(p)).sum(-1)


def _divergence(t_log, s_log, divergence: Divergence, mix: float):
    if divergence == "forward":
        return _kl(t_log, s_log)
    if divergence == "reverse":
        return _kl(s_log, t_log)
    return mix * _kl(t_log, s_log) + (1 - mix) * _kl(s_log, t_log)


def teacher_buckets(t_logp, vocab_size: int, temperature: float):
    """log-probs [M, k+1] of the kept ids and the tail at `temperature` (tail uniform over the
    V - k other ids, as in kd.lm.codecs.topk_probs)."""
    import math

    import torch

    t_logp = t_logp.double()
    tail = (1 - t_logp.exp().sum(-1)).clamp(min=1e-12)
    if temperature == 1.0:
        return torch.cat([t_logp, tail.log()[:, None]], -1).float()
    rest = vocab_size - t_logp.shape[-1]
    w_kept = t_logp / temperature
    if rest > 0:
        w_tail = math.log(rest) + (tail.log() - math.log(rest)) / temperature
    else:  # every id kept: an (almost) empty tail bucket
        w_tail = torch.full_like(tail, -60.0)
    logits = torch.cat([w_kept, w_tail[:, None]], -1)
    return torch.log_softmax(logits, -1).float()


def student_buckets(s_logp, ids):
    """Student log-probs [M, k+1]: the kept ids, and everything else as one tail bucket."""
    import torch

    kept = s_logp.gather(-1, ids)
    # Floored: with every id kept the tail is empty (log 0), and 0 x log 0 must stay 0.
    tail = s_logp.scatter(-1, ids, float("-inf")).logsumexp(-1).clamp(min=-60.0)
    return torch.cat([kept, tail[:, None]], -1)


def topk_kd(logits, ids, t_logp, *, temperature: float = 1.0, divergence: Divergence = "forward", mix: float = 0.5):
    import torch

    s_logp = torch.log_softmax(logits.float() / temperature, -1)
    t = teacher_buckets(t_logp, logits.shape[-1], temperature)
    s = student_buckets(s_logp, ids)
    return _divergence(t, s, divergence, mix).mean() * temperature ** 2


def sampled_kd(logits, pos, ids, weights, *, temperature: float = 1.0):
    """Mean over positions of -sum_j w_j log q_T(id_j) (pos[j]: the position of draw j)."""
    import torch

    s_logp = torch.log_softmax(logits.float() / temperature, -1)
    return -(weights * s_logp[pos, ids]).sum() / logits.shape[0] * temperature ** 2


def full_kd(logits, teacher_logits, *, temperature: float = 1.0, divergence: Divergence = "forward",
            mix: float = 0.5):
    import torch

    vocab = logits.shape[-1]
    s = torch.log_softmax(logits.float() / temperature, -1)
    t = torch.log_softmax(teacher_logits[..., :vocab].float() / temperature, -1)
    return _divergence(t, s, divergence, mix).mean() * temperature ** 2
