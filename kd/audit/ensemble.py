"""Ensemble members: how often they agree, and the rows where their distributions differ most
(Jensen-Shannon divergence of the members' probabilities: entropy of the mean minus mean entropy)."""
from __future__ import annotations

from itertools import combinations
from typing import Any

import numpy as np


def _entropy(p: np.ndarray) -> np.ndarray:
    return -(p * np.log(np.clip(p, 1e-12, 1.0))).sum(axis=-1)


def member_agreement(probs: dict[str, np.ndarray]) -> dict[str, Any]:
    names = list(probs)
    preds = {n: p.argmax(axis=1) for n, p in probs.items()}
    stacked = np.stack([probs[n] for n in names])  # members x rows x classes
    js = _entropy(stacked.mean(axis=0)) - _entropy(stacked).mean(axis=0)
    all_agree = np.all([preds[n] == preds[names[0]] for n in names], axis=0)
    return {"members": names,
            "pairwise": {f"{a} vs {b}": round(float((preds[a] == preds[b]).mean()), 4) for a, b in combinations(names, 2)},
            "all_agree": round(float(all_agree.mean()), 4),
            "js_divergence_mean": round(float(js.mean()), 5),
            "_js": js, "_preds": preds}
