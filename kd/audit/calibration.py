"""Calibration of a teacher's class probabilities against gold labels.

ECE comes from torchmetrics (top-label, L1, equal-width bins); the reliability diagram's bins
are recomputed here with the same edges only to draw them. The temperature is the T minimising
the negative log-likelihood of softmax(logits / T): fitted on one half of the rows and scored on
the other (both ways round) to report the held-out NLL it buys, then refitted on all rows as
the suggested value (also a sound starting KD temperature: it makes the teacher's soft targets
as sharp as its accuracy warrants)."""
from __future__ import annotations

from typing import Any

import numpy as np

N_BINS = 15
T_RANGE = (0.05, 20.0)


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def ece(probs: np.ndarray, labels: np.ndarray, *, n_bins: int = N_BINS) -> float:
    """Expected calibration error of the top-label confidence (torchmetrics, L1 norm)."""
    import torch
    from torchmetrics.functional.classification import multiclass_calibration_error

    probs = np.asarray(probs, dtype=np.float64)  # float32 sums drift by ~1e-5 on thousands of rows
    return float(multiclass_calibration_error(torch.from_numpy(probs), torch.from_numpy(np.asarray(labels, np.int64)),
                                              num_classes=probs.shape[1], n_bins=n_bins, norm="l1"))


def reliability_bins(probs: np.ndarray, labels: np.ndarray, *, n_bins: int = N_BINS) -> list[dict[str, float]]:
    """Per non-empty bin: confidence range, mean confidence, accuracy, count (for the diagram)."""
    conf = probs.max(axis=1)
    correct = probs.argmax(axis=1) == labels
    edges = np.linspace(0, 1, n_bins + 1)
    index = np.clip(np.searchsorted(edges, conf, side="right") - 1, 0, n_bins - 1)  # [lo, hi) like torchmetrics
    out = []
    for b in range(n_bins):
        hit = index == b
        if hit.any():
            out.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "confidence": float(conf[hit].mean()),
                        "accuracy": float(correct[hit].mean()), "count": int(hit.sum())})
    return out


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    z = np.asarray(logits, dtype=np.float64) / temperature
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    return float(-log_probs[np.arange(len(labels)), labels].mean())


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """argmin_T NLL(softmax(logits / T)); NLL is convex in 1/T, so a bounded scalar search is exact."""
    from scipy.optimize import minimize_scalar

    lo, hi = T_RANGE
    res = minimize_scalar(lambda log_t: nll(logits, labels, float(np.exp(log_t))),
                          bounds=(np.log(lo), np.log(hi)), method="bounded", options={"xatol": 1e-4})
    return float(np.exp(res.x))


def temperature_report(logits: np.ndarray, labels: np.ndarray, *, seed: int = 0) -> dict[str, Any]:
    """Suggested T (fitted on all rows) and the held-out NLL at T=1 vs a T fitted on the other half."""
    n = len(labels)
    order = np.random.default_rng(seed).permutation(n)
    halves = (order[: n // 2], order[n // 2:])
    held_t1, held_fit, fold_t = [], [], []
    for fit_rows, score_rows in (halves, halves[::-1]):
        if len(fit_rows) == 0 or len(score_rows) == 0:
            continue
        t = fit_temperature(logits[fit_rows], labels[fit_rows])
        fold_t.append(t)
        held_t1.append(nll(logits[score_rows], labels[score_rows]) * len(score_rows))
        held_fit.append(nll(logits[score_rows], labels[score_rows], t) * len(score_rows))
    best = fit_temperature(logits, labels)
    out: dict[str, Any] = {"temperature": round(best, 4), "nll_t1": round(nll(logits, labels), 5),
                           "nll_best_t": round(nll(logits, labels, best), 5)}
    if fold_t:
        scored = sum(len(h) for h in halves)
        out.update(heldout_nll_t1=round(sum(held_t1) / scored, 5), heldout_nll_fitted_t=round(sum(held_fit) / scored, 5),
                   fold_temperatures=[round(t, 4) for t in fold_t])
    probs_best = softmax(logits, best)
    out["ece_at_temperature"] = round(ece(probs_best, labels), 5)
    return out
