"""Augmentation agreement: how often the teacher's label on an augmented row matches its label on
the row's original, per augmentation operation, joined through the lineage columns that
`augment` records (`parent_id`, `aug_index` = -1 for originals, `ops`)."""
from __future__ import annotations

from typing import Any

import numpy as np

LINEAGE_COLUMNS = ("parent_id", "aug_index", "ops")


def has_lineage(columns: list[str]) -> bool:
    return all(c in columns for c in LINEAGE_COLUMNS)


def augmentation_agreement(ids: list[str], pred: np.ndarray, parent_ids: list[str], aug_index: list[int],
                           ops: list[list[str]]) -> dict[str, Any]:
    """Counts per op (a sample counts under every op that fired in it), per exact op combination,
    and over all samples; samples whose original was not labelled are counted as unmatched."""
    original_pred = {i: int(p) for i, p, a in zip(ids, pred, aug_index) if a == -1}
    per_op: dict[str, list[int]] = {}
    per_combo: dict[str, list[int]] = {}
    total = [0, 0]
    unmatched = 0
    for p, parent, a, fired in zip(pred, parent_ids, aug_index, ops):
        if a == -1:
            continue
        if parent not in original_pred:
            unmatched += 1
            continue
        agree = int(int(p) == original_pred[parent])
        total[0] += 1
        total[1] += agree
        for op in sorted(set(fired or [])) or ["none"]:
            per_op.setdefault(op, [0, 0])
            per_op[op][0] += 1
            per_op[op][1] += agree
        combo = "+".join(sorted(set(fired or []))) or "none"
        per_combo.setdefault(combo, [0, 0])
        per_combo[combo][0] += 1
        per_combo[combo][1] += agree

    def rows(counts: dict[str, list[int]]) -> dict[str, dict[str, Any]]:
        return {k: {"samples": n, "agree": a, "agreement": round(a / n, 4)} for k, (n, a) in sorted(counts.items())}

    return {"samples": total[0], "agree": total[1],
            "agreement": round(total[1] / total[0], 4) if total[0] else None,
            "originals": len(original_pred), "unmatched_samples": unmatched,
            "per_op": rows(per_op), "per_combination": rows(per_combo)}
