"""Transformer student: any small `transformers` architecture with a sequence-classification
head, built from a config dict (`hf_config: {model_type: bert, hidden_size: 64, ...}`) or from the
architecture of an HF checkpoint directory (`architecture_from: <teacher dir>`, weights freshly
initialised: born-again training). Pairs are cross-encoded in one sequence."""
from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from kd.students.common import load_classifier, pad_ids


def build_hf_config(hp: dict[str, Any], *, vocab_size: int, num_labels: int, pad_id: int):
    from transformers import AutoConfig

    if hp.get("architecture_from"):
        config = AutoConfig.from_pretrained(hp["architecture_from"])
    else:
        spec = dict(hp.get("hf_config") or {})
        model_type = spec.pop("model_type", "bert")
        config = AutoConfig.for_model(model_type, **spec)
    config.vocab_size = vocab_size
    config.num_labels = num_labels
    config.pad_token_id = pad_id
    config.id2label = {i: str(i) for i in range(num_labels)}
    config.label2id = {str(i): i for i in range(num_labels)}
    return config


class TransformerClassifier(nn.Module):
    def __init__(self, *, tokenizer, config, pair: bool, max_length: int):
        super().__init__()
        from transformers import AutoModelForSequenceClassification

        self.tokenizer, self.pair, self.max_length = tokenizer, pair, max_length
        self.config = config
        self.model = AutoModelForSequenceClassification.from_config(config)
        self._uses_token_types = "token_type_ids" in inspect.signature(self.model.forward).parameters

    @classmethod
    def create(cls, *, meta: dict[str, Any], tokenizer, directory: Path | None = None) -> "TransformerClassifier":
        from transformers import AutoConfig

        if directory is not None and (Path(directory) / "config.json").is_file():
            config = AutoConfig.from_pretrained(str(directory))
        else:
            config = build_hf_config(meta.get("hyperparameters", {}), vocab_size=len(tokenizer),
                                     num_labels=meta["num_labels"], pad_id=tokenizer.pad_id)
        return cls(tokenizer=tokenizer, config=config, pair=bool(meta.get("pair")),
                   max_length=meta.get("max_length", 64))

    def feature_layer(self) -> nn.Module:
        """The HF classification head (`classifier`); its input is the pooled sentence features."""
        head = getattr(self.model, "classifier", None)
        if head is None:
            raise ValueError(f"{type(self.model).__name__} has no `classifier` head to read features from")
        return head

    def feature_dim(self) -> int:
        head = self.feature_layer()
        first = head if isinstance(head, nn.Linear) else next(m for m in head.modules() if isinstance(m, nn.Linear))
        return first.in_features

    def save_extra(self, directory: Path) -> None:
        self.config.save_pretrained(str(directory))  # config.json, so loading needs no manifest

    def tokenize_rows(self, texts: Sequence[str], pairs: Sequence[str] | None) -> list[tuple]:
        n = self.max_length
        tok = self.tokenizer
        if hasattr(tok, "encode_pair"):  # an HF tokenizer adds its own [CLS]/[SEP]
            return [tok.encode_pair(t, None if pairs is None else pairs[i], n) for i, t in enumerate(texts)]
        rows = []
        for i, t in enumerate(texts):
            # word/spm vocabularies: a separator id stands in for [CLS] and between the pair
            a = [tok.sep_id] + tok.encode(t)
            b = [] if pairs is None else [tok.sep_id] + tok.encode(pairs[i])
            a = a[: n - min(len(b), n // 2)]
            ids = (a + b)[:n]
            rows.append((ids, [0] * len(a) + [1] * (len(ids) - len(a))))
        return rows

    def collate(self, rows: Sequence[tuple]) -> dict[str, Any]:
        ids, lengths = pad_ids([r[0] for r in rows], self.tokenizer.pad_id)
        mask = (torch.arange(ids.shape[1]).unsqueeze(0) < lengths.unsqueeze(1)).long()
        batch = {"input_ids": ids, "attention_mask": mask}
        if self._uses_token_types:
            batch["token_type_ids"], _ = pad_ids([r[1] for r in rows], 0)
        return batch

    def forward(self, **batch) -> torch.Tensor:
        return self.model(**batch).logits


def load(path: str | Path):
    return load_classifier(path, TransformerClassifier)
