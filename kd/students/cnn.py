"""CNN student (Kim 2014, "Convolutional Neural Networks for Sentence Classification"):
embeddings, parallel 1-D convolutions of several widths with ReLU, max-over-time pooling,
dropout, and a linear layer. Pairs use the siamese [h1, h2, h1*h2, |h1-h2|] combination."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from kd.students.common import SiameseTokenization, load_classifier, pair_features

DEFAULTS = {"embedding_dim": 128, "num_filters": 100, "filter_sizes": [3, 4, 5], "dropout": 0.5}


class CNNClassifier(SiameseTokenization, nn.Module):
    def __init__(self, *, tokenizer, num_labels: int, pair: bool, max_length: int, embedding_dim: int,
                 num_filters: int, filter_sizes: list[int], dropout: float):
        super().__init__()
        self.tokenizer, self.pair, self.max_length = tokenizer, pair, max_length
        # Texts shorter than the widest filter are padded up to it, so every filter has an output.
        self.min_length = max(filter_sizes)
        self.embedding = nn.Embedding(len(tokenizer), embedding_dim, padding_idx=tokenizer.pad_id)
        self.convs = nn.ModuleList(nn.Conv1d(embedding_dim, num_filters, k) for k in filter_sizes)
        features = num_filters * len(filter_sizes) * (4 if pair else 1)
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear(features, num_labels)

    @classmethod
    def create(cls, *, meta: dict[str, Any], tokenizer, directory: Path | None = None) -> "CNNClassifier":
        hp = {**DEFAULTS, **{k: v for k, v in meta.get("hyperparameters", {}).items() if k in DEFAULTS}}
        return cls(tokenizer=tokenizer, num_labels=meta["num_labels"], pair=bool(meta.get("pair")),
                   max_length=meta.get("max_length", 64), **hp)

    def encode(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x = self.embedding(ids).transpose(1, 2)  # (batch, emb, time)
        return torch.cat([self._pool(torch.relu(conv(x)), lengths, conv.kernel_size[0]) for conv in self.convs], dim=-1)

    @staticmethod
    def _pool(h: torch.Tensor, lengths: torch.Tensor, width: int) -> torch.Tensor:
        """Max over the windows that start inside the text and end inside it (a text shorter
        than the filter keeps its first window), so padding added for longer rows of the
        batch never changes a row's features."""
        valid = (lengths.to(h.device) - width + 1).clamp(min=1)
        mask = torch.arange(h.shape[-1], device=h.device).unsqueeze(0) < valid.unsqueeze(1)
        return h.masked_fill(~mask.unsqueeze(1), float("-inf")).amax(dim=-1)

    def forward(self, ids, lengths, ids2=None, lengths2=None) -> torch.Tensor:
        h = self.encode(ids, lengths)
        if self.pair:
            h = pair_features(h, self.encode(ids2, lengths2))
        return self.out(self.dropout(h))

    def feature_layer(self) -> nn.Module:
        """Its input is the sentence features (domain_adversarial reads them there)."""
        return self.dropout

    def feature_dim(self) -> int:
        return self.out.in_features


def load(path: str | Path):
    return load_classifier(path, CNNClassifier)
