"""Teacher vs gold: accuracy per class, confusion matrix, and likely gold-label errors found by
confident learning (cleanlab's `find_label_issues` on the teacher's probabilities)."""
from __future__ import annotations

from typing import Any

import numpy as np


def accuracy_by_class(pred: np.ndarray, gold: np.ndarray, names: list[str]) -> dict[str, Any]:
    k = len(names)
    confusion = np.zeros((k, k), dtype=np.int64)  # rows: gold, columns: teacher
    np.add.at(confusion, (gold, pred), 1)
    per_class = {}
    for c, name in enumerate(names):
        n = int(confusion[c].sum())
        per_class[name] = {"rows": n, "accuracy": round(float(confusion[c, c] / n), 4) if n else None}
    return {"accuracy": round(float((pred == gold).mean()), 4) if len(gold) else None,
            "rows": int(len(gold)), "per_class": per_class, "confusion": confusion.tolist()}


def label_issues(probs: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Row indices whose gold label is likely wrong, most suspicious first (lowest teacher
    probability of the gold label). Confident learning needs out-of-sample probabilities: on the
    teacher's own training rows it finds fewer issues than there are."""
    from cleanlab.filter import find_label_issues

    if len(gold) == 0 or len(np.unique(gold)) < 2:
        return np.zeros(0, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    return np.asarray(find_label_issues(labels=gold, pred_probs=probs, return_indices_ranked_by="self_confidence"),
                      dtype=np.int64)
