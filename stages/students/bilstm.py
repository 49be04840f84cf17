"""BiLSTM student (Tang et al. 2019, "Distilling Task-Specific Knowledge from BERT into Simple
Neural Networks"): word embeddings, one bidirectional LSTM layer whose final forward and backward
states form the sentence vector, a ReLU hidden layer and a linear layer to class logits (softmax
is applied by the loss). Pairs are encoded by the same (siamese) encoder and combined as
[h1, h2, h1*h2, |h1-h2|]."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from stages.students.common import SiameseTokenization, load_classifier, pair_features

DEFAULTS = {"embedding_dim": 128, "hidden_dim": 128, "mlp_dim": 128, "dropout": 0.1}


class BiLSTMClassifier(SiameseTokenization, nn.Module):
    def __init__(self, *, tokenizer, num_labels: int, pair: bool, max_length: int, embedding_dim: int,
                 hidden_dim: int, mlp_dim: int, dropout: float):
        super().__init__()
        self.tokenizer, self.pair, self.max_length = tokenizer, pair, max_length
        self.embedding = nn.Embedding(len(tokenizer), embedding_dim, padding_idx=tokenizer.pad_id)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers=1, batch_first=True, bidirectional=True)
        features = 2 * hidden_dim * (4 if pair else 1)
        self.head = nn.Sequential(nn.Dropout(dropout), nn.Linear(features, mlp_dim), nn.ReLU(),
                                  nn.Dropout(dropout), nn.Linear(mlp_dim, num_labels))

    @classmethod
    def create(cls, *, meta: dict[str, Any], tokenizer, directory: Path | None = None) -> "BiLSTMClassifier":
        hp = {**DEFAULTS, **{k: v for k, v in meta.get("hyperparameters", {}).items() if k in DEFAULTS}}
        return cls(tokenizer=tokenizer, num_labels=meta["num_labels"], pair=bool(meta.get("pair")),
                   max_length=meta.get("max_length", 64), **hp)

    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return torch.cat([h[0], h[1]], dim=-1)  # final forward and backward states

    def forward(self, ids, lengths, ids2=None, lengths2=None) -> torch.Tensor:
        h = self.encode(ids, lengths)
        if self.pair:
            h = pair_features(h, self.encode(ids2, lengths2))
        return self.head(h)


def load(path: str | Path):
    return load_classifier(path, BiLSTMClassifier)
