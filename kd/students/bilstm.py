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

from kd.students.common import ClassifierStudent, SiameseTokenization, load_classifier, pair_features

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

    def feature_layer(self) -> nn.Module:
        """Its input is the sentence features (domain_adversarial reads them there)."""
        return self.head

    def feature_dim(self) -> int:
        return self.head[1].in_features


class BiLSTMTagger(nn.Module):
    """Token-level student: embeddings, one BiLSTM layer, a linear layer per word. Trained by
    token-level KD from a token-classification teacher's per-word logits. `forward` returns the
    logits of the real (unpadded) words only, flattened in row order, so the classification
    losses apply unchanged to (words, classes) tensors."""

    def __init__(self, *, tokenizer, num_labels: int, embedding_dim: int, hidden_dim: int, dropout: float, **_):
        super().__init__()
        self.tokenizer = tokenizer
        self.embedding = nn.Embedding(len(tokenizer), embedding_dim, padding_idx=tokenizer.pad_id)
        self.lstm = nn.LSTM(embedding_dim, hidden_dim, num_layers=1, batch_first=True, bidirectional=True)
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * hidden_dim, num_labels))

    @classmethod
    def create(cls, *, meta: dict[str, Any], tokenizer, directory: Path | None = None) -> "BiLSTMTagger":
        hp = {**DEFAULTS, **{k: v for k, v in meta.get("hyperparameters", {}).items() if k in DEFAULTS}}
        return cls(tokenizer=tokenizer, num_labels=meta["num_labels"], **hp)

    def tokenize_rows(self, texts, pairs=None) -> list[tuple]:
        """Word lists (or whitespace-split strings) -> word ids; never truncated, one tag per word."""
        return [([self.tokenizer.word_id(w) for w in (t if isinstance(t, (list, tuple)) else t.split())], None)
                for t in texts]

    def collate(self, rows) -> dict[str, Any]:
        from kd.students.common import pad_ids

        ids, lengths = pad_ids([r[0] for r in rows], self.tokenizer.pad_id)
        return {"ids": ids, "lengths": lengths, "n_words": torch.tensor([len(r[0]) for r in rows])}

    def forward(self, ids, lengths, n_words) -> torch.Tensor:
        packed = nn.utils.rnn.pack_padded_sequence(self.embedding(ids), lengths.cpu(), batch_first=True,
                                                   enforce_sorted=False)
        hidden, _ = nn.utils.rnn.pad_packed_sequence(self.lstm(packed)[0], batch_first=True,
                                                     total_length=ids.shape[1])
        mask = torch.arange(ids.shape[1], device=ids.device).unsqueeze(0) < n_words.unsqueeze(1)
        return self.out(hidden)[mask]


class TaggerStudent(ClassifierStudent):
    task = "token_classification"

    def logits(self, texts, pairs=None, *, batch_size: int = 64) -> list:
        """Per-row (words, classes) arrays."""
        from pipeline.devices import move

        self.module.eval()
        device = next(self.module.parameters()).device
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                batch = move(self.module.collate(self.module.tokenize_rows(texts[start:start + batch_size])), device)
                flat = self.module(**batch).float().cpu().numpy()
                bounds = batch["n_words"].cumsum(0).tolist()
                out.extend(flat[b - n:b] for b, n in zip(bounds, batch["n_words"].tolist()))
        return out

    def predict(self, texts, pairs=None, *, batch_size: int = 64, return_names: bool = True) -> list:
        names = self.label_names or [str(i) for i in range(self.meta["num_labels"])]
        rows = self.logits(list(texts), batch_size=batch_size)
        return [[names[i] for i in r.argmax(-1)] if return_names else r.argmax(-1).tolist() for r in rows]


def load(path: str | Path):
    import json

    task = json.loads((Path(path) / "student.json").read_text()).get("task")
    if task == "token_classification":
        return load_classifier(path, BiLSTMTagger, TaggerStudent)
    return load_classifier(path, BiLSTMClassifier)
