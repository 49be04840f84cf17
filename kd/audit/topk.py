"""Seq2seq top-k token caches: how much of the teacher's next-token probability the stored k
entries keep. With stored mass M at a position, the renormalised top-k distribution q diverges
from the teacher's full distribution p by exactly KL(q || p) = -log M (q_i = p_i / M on its
support), so the fidelity of the cache follows from the stored log-probs without the teacher.
(KL(p || q) is infinite whenever M < 1: q gives the other tokens no mass.)"""
from __future__ import annotations

from typing import Any

import numpy as np


def topk_mass(topk_logprobs) -> np.ndarray:
    """Per target position: sum of exp(stored log-probs) (a pyarrow list<fixed_size_list> column)."""
    import pyarrow as pa

    col = topk_logprobs.combine_chunks() if isinstance(topk_logprobs, pa.ChunkedArray) else topk_logprobs
    positions = col.flatten()  # fixed_size_list<float16, k> per position
    k = positions.type.list_size
    values = positions.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, k)
    return np.exp(values).sum(axis=1)  # -inf (vocab < k) contributes 0


def mass_report(mass: np.ndarray, *, k: int) -> dict[str, Any]:
    if len(mass) == 0:
        return {"positions": 0, "k": k}
    kl = -np.log(np.clip(mass, 1e-12, None))
    return {"positions": int(len(mass)), "k": k,
            "mass_mean": round(float(mass.mean()), 4),
            "mass_p10": round(float(np.percentile(mass, 10)), 4),
            "mass_median": round(float(np.median(mass)), 4),
            "share_mass_below_0.9": round(float((mass < 0.9).mean()), 4),
            "kl_topk_to_full_mean": round(float(kl.mean()), 5),
            "kl_topk_to_full_p90": round(float(np.percentile(kl, 90)), 5)}
