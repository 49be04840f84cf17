"""The multi-task student of `train_multitask`: one shared encoder (word embeddings + a BiLSTM,
the sentence vector is the final forward and backward states), one MLP head per task. A
sentence-pair task encodes both sides with the same encoder and classifies
[u, v, u*v, |u-v|] (as the bilstm student does)."""
from __future__ import annotations

from typing import Any, Sequence

import torch
from torch import nn

from kd.students.common import pad_ids, pair_features


class MultiTaskStudent(nn.Module):
    def __init__(self, *, vocab_size: int, pad_id: int, heads: dict[str, tuple[int, bool]],
                 embedding_dim: int, hidden_dim: int, mlp_dim: int, dropout: float):
        """`heads`: task -> (number of classes, whether it classifies sentence pairs)."""
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_dim, padding_idx=pad_id)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.pairs = {task: pair for task, (_, pair) in heads.items()}
        self.heads = nn.ModuleDict({
            task: nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden_dim * (4 if pair else 1), mlp_dim),
                                nn.ReLU(), nn.Dropout(dropout), nn.Linear(mlp_dim, n))
            for task, (n, pair) in heads.items()})
        self.pad_id = pad_id

    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return torch.cat([h[0], h[1]], dim=-1)

    def forward(self, task: str, batch: dict[str, Any]) -> torch.Tensor:
        h = self.encode(batch["ids"], batch["lengths"])
        if self.pairs[task]:
            h = pair_features(h, self.encode(batch["ids2"], batch["lengths2"]))
        return self.heads[task](h)

    def collate(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        ids, lengths = pad_ids([r["ids"] for r in rows], self.pad_id)
        batch: dict[str, Any] = {"ids": ids, "lengths": lengths}
        if rows and rows[0].get("ids2") is not None:
            batch["ids2"], batch["lengths2"] = pad_ids([r["ids2"] for r in rows], self.pad_id)
        return batch
