"""Sparse codecs for a causal LM teacher's next-token distributions, one row of positions at a time.

* `topk`: the k most likely ids (the narrowest unsigned integer the vocabulary allows), their
  log-probabilities (float16 by default) and the float32 log-normaliser logsumexp(z) of the
  logits. Kept probabilities and the tail mass 1 - sum(kept) are exact at the stored temperature
  (1); at another temperature T the kept ids scale exactly (p_i^(1/T)) and the tail, whose
  shape is not stored, is modelled as uniform over the V - k other ids (exact for a flat tail).
* `sampled`: Sparse Logit Sampling (Anshumann et al., ACL 2025): K ids drawn with replacement
  from the teacher distribution, stored as unique ids + counts (uint8). counts / K is an unbiased
  estimate of p, so -sum (counts/K) log q is an unbiased estimate of the cross-entropy H(p, q),
  and its gradient of the forward KL's. Draws are seeded per row, so a rerun stores the same
  ids. Optional float16 teacher log-probs of the drawn ids allow self-normalised importance
  re-weighting to another temperature (consistent, no longer unbiased) and entropy estimates.

Everything here is numpy/torch on one row's [positions, vocab] logits; stages put rows into
Parquet columns (`arrow_*` helpers) and the trainer reads them back (`batch_targets`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

import numpy as np

Mode = Literal["topk", "sampled"]


def id_dtype(vocab_size: int) -> np.dtype:
    """The narrowest unsigned integer that holds every id below `vocab_size`."""
    for dtype in (np.uint8, np.uint16, np.uint32):
        if vocab_size - 1 <= np.iinfo(dtype).max:
            return np.dtype(dtype)
    return np.dtype(np.uint64)


@dataclasses.dataclass(frozen=True)
class CodecSpec:
    mode: Mode
    vocab_size: int  # the tokenizer's length: padded embedding rows are never stored
    k: int = 8  # topk: kept ids; sampled: draws per position
    value_dtype: Literal["float16", "float32"] = "float16"
    store_logprobs: bool = False  # sampled only: teacher log-probs of the drawn ids

    def payload_bytes(self, unique_per_position: float | None = None) -> float:
        """Nominal bytes per position before Parquet encoding and compression."""
        idb = id_dtype(self.vocab_size).itemsize
        vb = np.dtype(self.value_dtype).itemsize
        if self.mode == "topk":
            return self.k * (idb + vb) + 4
        unique = self.k if unique_per_position is None else unique_per_position
        return unique * (idb + 1 + (vb if self.store_logprobs else 0))


def log_softmax(logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(log-probs float64, log-normaliser float64) of [P, V] logits."""
    z = logits.astype(np.float64)
    m = z.max(-1, keepdims=True)
    lse = m + np.log(np.exp(z - m).sum(-1, keepdims=True))
    return z - lse, lse[..., 0]


# --- topk -------------------------------------------------------------------------------------

def encode_topk(logits: np.ndarray, spec: CodecSpec) -> dict[str, np.ndarray]:
    """[P, V] float logits -> ids [P, k], logprobs [P, k] (best first), log_normalizer [P]."""
    logits = logits[:, : spec.vocab_size]
    logp, lse = log_softmax(logits)
    k = min(spec.k, logits.shape[-1])
    part = np.argpartition(-logp, k - 1, axis=-1)[:, :k]
    vals = np.take_along_axis(logp, part, -1)
    order = np.argsort(-vals, axis=-1, kind="stable")
    ids = np.take_along_axis(part, order, -1)
    return {"ids": ids.astype(id_dtype(spec.vocab_size)),
            "logprobs": np.take_along_axis(vals, order, -1).astype(spec.value_dtype),
            "log_normalizer": lse.astype(np.float32)}


def topk_probs(logprobs: np.ndarray, vocab_size: int, temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """(kept probabilities [P, k], tail mass [P]) at `temperature`, from stored log-probs."""
    lp = logprobs.astype(np.float64)
    kept = np.exp(lp)
    tail = np.clip(1.0 - kept.sum(-1), 0.0, 1.0)
    if temperature == 1.0:
        return kept, tail
    rest = vocab_size - lp.shape[-1]
    # Unnormalised weights at T: kept p_i^(1/T); tail as `rest` ids of equal probability tail/rest.
    w_kept = np.exp(lp / temperature)
    with np.errstate(divide="ignore"):
        w_tail = np.where(tail > 0, rest * np.exp(np.log(np.maximum(tail, 1e-300) / max(rest, 1)) / temperature), 0.0)
    norm = w_kept.sum(-1) + w_tail
    return w_kept / norm[:, None], w_tail / norm


def rebuild_topk(enc: dict[str, np.ndarray], vocab_size: int, temperature: float = 1.0) -> np.ndarray:
    """A full [P, V] distribution: kept ids exact, the tail mass spread evenly over the rest."""
    kept, tail = topk_probs(enc["logprobs"], vocab_size, temperature)
    ids = enc["ids"].astype(np.int64)
    rest = vocab_size - ids.shape[-1]
    full = np.repeat((tail / max(rest, 1))[:, None], vocab_size, axis=1)
    np.put_along_axis(full, ids, kept, -1)
    return full


# --- sampled ----------------------------------------------------------------------------------

def row_rng(seed: int, row_id: str) -> np.random.Generator:
    """A generator that depends only on (seed, row id): same draws on any worker or rerun."""
    import hashlib

    digest = hashlib.sha256(f"{seed}\x00{row_id}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def encode_sampled(logits: np.ndarray, spec: CodecSpec, rng: np.random.Generator) -> dict[str, list[np.ndarray]]:
    """[P, V] logits -> per position: unique drawn ids (ascending), counts (sum K), and with
    `store_logprobs` the teacher log-probs of those ids."""
    logp, _ = log_softmax(logits[:, : spec.vocab_size])
    cdf = np.cumsum(np.exp(logp), axis=-1)
    cdf /= cdf[:, -1:]
    u = rng.random((logp.shape[0], spec.k))
    draws = np.stack([np.searchsorted(cdf[p], u[p], side="right") for p in range(logp.shape[0])])
    draws = np.minimum(draws, spec.vocab_size - 1)
    out: dict[str, list[np.ndarray]] = {"ids": [], "counts": []}
    if spec.store_logprobs:
        out["logprobs"] = []
    idt = id_dtype(spec.vocab_size)
    for p in range(draws.shape[0]):
        ids, counts = np.unique(draws[p], return_counts=True)
        out["ids"].append(ids.astype(idt))
        out["counts"].append(counts.astype(np.uint8))
        if spec.store_logprobs:
            out["logprobs"].append(logp[p, ids].astype(spec.value_dtype))
    return out


def sampled_weights(counts: np.ndarray, logprobs: np.ndarray | None = None, temperature: float = 1.0) -> np.ndarray:
    """Target weights of one position's drawn ids: counts / K at T = 1 (unbiased for p); at
    another T the draws are re-weighted by p^(1/T - 1) and normalised (needs the log-probs)."""
    w = counts.astype(np.float64) / counts.sum()
    if temperature == 1.0:
        return w
    if logprobs is None:
        raise ValueError("a sampled target at temperature != 1 needs the stored teacher log-probs "
                         "(label with store_logprobs: true), or train at temperature 1")
    w = w * np.exp(logprobs.astype(np.float64) * (1.0 / temperature - 1.0))
    return w / w.sum()


def rebuild_sampled(ids: list[np.ndarray], counts: list[np.ndarray], vocab_size: int) -> np.ndarray:
    """A full [P, V] distribution from one draw: seen ids share 1 - m by count, where m is the
    Good-Turing estimate of the unseen mass (singletons / K), spread evenly over unseen ids.
    For the fidelity figure only: training uses the unbiased counts/K directly."""
    full = np.zeros((len(ids), vocab_size))
    for p, (i, c) in enumerate(zip(ids, counts)):
        c = c.astype(np.float64)
        missing = max((c == 1).sum() / c.sum(), 1e-6)
        unseen = vocab_size - len(i)
        full[p, :] = missing / max(unseen, 1)
        full[p, i.astype(np.int64)] = (1 - missing) * c / c.sum()
    return full


# --- fidelity ---------------------------------------------------------------------------------

def kl_full_to_rebuilt(logits: np.ndarray, rebuilt: np.ndarray, vocab_size: int) -> np.ndarray:
    """KL(full teacher || rebuilt) in nats for each position."""
    logp, _ = log_softmax(logits[:, :vocab_size])
    p = np.exp(logp)
    q = np.maximum(rebuilt, 1e-300)
    return (p * (logp - np.log(q))).sum(-1)


def fidelity(logits: np.ndarray, spec: CodecSpec, *, seed: int = 0) -> dict[str, float]:
    """Mean KL(full || rebuilt) and nominal bytes per position of `spec` on [P, V] logits."""
    if spec.mode == "topk":
        enc = encode_topk(logits, spec)
        kl = kl_full_to_rebuilt(logits, rebuild_topk(enc, spec.vocab_size), spec.vocab_size)
        unique = None
    else:
        enc = encode_sampled(logits, spec, np.random.default_rng(seed))
        kl = kl_full_to_rebuilt(logits, rebuild_sampled(enc["ids"], enc["counts"], spec.vocab_size), spec.vocab_size)
        unique = float(np.mean([len(i) for i in enc["ids"]]))
    return {"kl": float(kl.mean()), "payload_bytes_per_token": spec.payload_bytes(unique)}


def cross_entropy_estimate(ids: np.ndarray, counts: np.ndarray, student_logp: np.ndarray) -> float:
    """The Sparse Logit Sampling estimate of H(p, q) at one position (unbiased at T = 1)."""
    w = sampled_weights(counts)
    return float(-(w * student_logp[ids.astype(np.int64)]).sum())


def describe(spec: CodecSpec) -> dict[str, Any]:
    return {"mode": spec.mode, "k": spec.k, "vocab_size": spec.vocab_size,
            "id_dtype": id_dtype(spec.vocab_size).name, "value_dtype": spec.value_dtype,
            "store_logprobs": spec.store_logprobs, "nominal_bytes_per_token": spec.payload_bytes()}

