"""Scores of predictions against gold labels, shared by the stages that train and evaluate models.
Gold values None and -1 mean "no label" and are skipped."""
from __future__ import annotations

from typing import Any, Sequence


def accuracy(pred: Sequence[Any], gold: Sequence[Any]) -> float:
    pairs = [(p, g) for p, g in zip(pred, gold) if g is not None and g != -1]
    return sum(p == g for p, g in pairs) / len(pairs) if pairs else 0.0


def macro_f1(pred: Sequence[Any], gold: Sequence[Any]) -> float:
    """Unweighted mean of per-class F1 over the classes present in gold or predictions."""
    pairs = [(p, g) for p, g in zip(pred, gold) if g is not None and g != -1]
    classes = sorted({g for _, g in pairs} | {p for p, _ in pairs}, key=str)
    scores = []
    for c in classes:
        tp = sum(p == c and g == c for p, g in pairs)
        fp = sum(p == c and g != c for p, g in pairs)
        fn = sum(p != c and g == c for p, g in pairs)
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def token_f1(pred: Sequence[Sequence[str]], gold: Sequence[Sequence[str]], *, outside: str = "O") -> float:
    """Micro-F1 over tokens whose gold or predicted tag is not `outside`."""
    tp = fp = fn = 0
    for p_tags, g_tags in zip(pred, gold):
        for p, g in zip(p_tags, g_tags):
            if p != outside and p == g:
                tp += 1
            else:
                fp += p != outside
                fn += g != outside
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)
