"""Training batches streamed from `lm_label` shards: one shard in memory at a time.

The batch order is a pure function of (seed, epoch) and the shards' row counts (from the
artifact manifest, no data read), so a resumed run finds step s's batch without replaying the
steps before it. Batches never cross shards: shards are shuffled, then rows within a shard.
"""
from __future__ import annotations

import random
from typing import Any

import numpy as np

from kd.training import derive_seed


def epoch_plan(shard_rows: list[int], batch_size: int, *, seed: int, epoch: int) -> list[tuple[int, list[int]]]:
    """[(shard index, row indices)] for one epoch."""
    rng = random.Random(derive_seed(seed, "lm-batches", epoch))
    shards = [i for i, n in enumerate(shard_rows) if n]
    rng.shuffle(shards)
    plan = []
    for s in shards:
        rows = list(range(shard_rows[s]))
        rng.shuffle(rows)
        plan += [(s, rows[i:i + batch_size]) for i in range(0, len(rows), batch_size)]
    return plan


def steps_per_epoch(shard_rows: list[int], batch_size: int) -> int:
    return sum(-(-n // batch_size) for n in shard_rows)


class ShardBatches:
    """Tensors for (shard, rows) pairs, keeping only the current shard's columns in memory."""

    def __init__(self, shard_paths: list, *, mode: str, k: int, temperature: float = 1.0):
        self.paths, self.mode, self.k, self.temperature = shard_paths, mode, k, temperature
        # mode "text" (lm_generate's completions): tokens only, learnt with cross-entropy.
        self.columns = ["input_ids", "target_start"] + {
            "topk": ["topk_ids", "topk_logprobs"], "sampled": ["sample_ids", "sample_counts"], "text": []}[mode]
        if mode == "sampled" and temperature != 1.0:
            self.columns.append("sample_logprobs")
        self._loaded: tuple[int, Any] = (-1, None)

    def _table(self, shard: int):
        from pipeline import storage

        if self._loaded[0] != shard:  # local path or s3:// URI
            self._loaded = (shard, storage.read_parquet(self.paths[shard], columns=self.columns))
        return self._loaded[1]

    def batch(self, shard: int, rows: list[int]) -> dict[str, Any]:
        import pyarrow as pa

        t = self._table(shard).take(pa.array(rows, pa.int64()))
        out = token_batch([np.asarray(x, dtype=np.int64) for x in _lists(t["input_ids"])],
                          t["target_start"].to_numpy())
        if self.mode == "topk":
            out.update(topk_targets(t["topk_ids"], t["topk_logprobs"], self.k))
        elif self.mode == "sampled":
            logprobs = t["sample_logprobs"] if "sample_logprobs" in self.columns else None
            out.update(sampled_targets(t["sample_ids"], t["sample_counts"], logprobs, self.temperature))
        return out


def _lists(col) -> list[np.ndarray]:
    arr = col.combine_chunks()
    lengths = arr.value_lengths().to_numpy(zero_copy_only=False)
    values = arr.flatten().to_numpy(zero_copy_only=False)
    return np.split(values, np.cumsum(lengths)[:-1]) if len(lengths) else []


def token_batch(seqs: list[np.ndarray], target_start: np.ndarray) -> dict[str, Any]:
    """input_ids / attention_mask [B, L] (right-padded with 0), target_mask [B, L]: the positions
    whose next token is a target of this row, and targets [M] (their next tokens, row-major)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.zeros((len(seqs), width), dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    target_mask = torch.zeros((len(seqs), width), dtype=torch.bool)
    for i, (s, start) in enumerate(zip(seqs, target_start)):
        ids[i, : len(s)] = torch.from_numpy(s)
        mask[i, : len(s)] = 1
        target_mask[i, int(start): len(s) - 1] = True
    targets = torch.roll(ids, -1, dims=1)[target_mask]
    return {"input_ids": ids, "attention_mask": mask, "target_mask": target_mask, "targets": targets}


def topk_targets(ids_col, logp_col, k: int) -> dict[str, Any]:
    import torch

    ids = ids_col.combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    logp = logp_col.combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
    return {"topk_ids": torch.from_numpy(ids.astype(np.int64)),
            "topk_logprobs": torch.from_numpy(logp.astype(np.float32))}


def sampled_targets(ids_col, counts_col, logp_col, temperature: float) -> dict[str, Any]:
    """Flat draws: position index, id and weight of each unique drawn id (weights of a position
    sum to 1: counts / K at T = 1, re-weighted by p^(1/T - 1) otherwise)."""
    import torch

    per_pos = ids_col.combine_chunks().flatten()  # list<uint> per position
    lengths = per_pos.value_lengths().to_numpy(zero_copy_only=False)
    ids = per_pos.flatten().to_numpy(zero_copy_only=False).astype(np.int64)
    counts = counts_col.combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float64)
    pos = np.repeat(np.arange(len(lengths)), lengths)
    w = counts
    if temperature != 1.0:
        logp = logp_col.combine_chunks().flatten().flatten().to_numpy(zero_copy_only=False).astype(np.float64)
        w = counts * np.exp(logp * (1.0 / temperature - 1.0))
    totals = np.bincount(pos, weights=w, minlength=len(lengths))
    w = w / totals[pos]
    return {"sample_pos": torch.from_numpy(pos), "sample_ids": torch.from_numpy(ids),
            "sample_weights": torch.from_numpy(w.astype(np.float32))}
