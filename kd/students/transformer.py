"""Transformer student: any small `transformers` architecture with a sequence-classification
head, built from a config dict (`hf_config: {model_type: bert, hidden_size: 64, ...}`) or from the
architecture of an HF checkpoint directory (`architecture_from: <teacher dir>`, weights freshly
initialised: born-again training), or initialised from a fine-tuned teacher (`from_teacher`: its
embeddings, a subset of its layers and its head, as DistilBERT and patient KD start their students).
Pairs are cross-encoded in one sequence."""
from __future__ import annotations

import inspect
import re
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

    @classmethod
    def from_teacher(cls, teacher_dir: str | Path, *, layers: Sequence[int] | None, meta: dict[str, Any],
                     tokenizer) -> tuple["TransformerClassifier", dict[str, Any]]:
        """A student with the teacher's architecture but only `layers` of its encoder layers (in
        that order; default all), initialised from the teacher's weights: embeddings, those layers,
        pooler, and the classification head when the teacher's label names are the student's in
        the same order (else the head starts fresh). Sanh et al. 2019 (DistilBERT: every other
        layer), Sun et al. 2019 (patient KD: the lower layers). Returns the module and what was copied."""
        from transformers import AutoModelForSequenceClassification

        config = build_hf_config({"architecture_from": str(teacher_dir)}, vocab_size=len(tokenizer),
                                 num_labels=meta["num_labels"], pad_id=tokenizer.pad_id)
        available = config.num_hidden_layers
        layers = list(range(available)) if layers is None else list(layers)
        outside = [i for i in layers if not 0 <= i < available]
        if outside or not layers:
            raise ValueError(f"student.init_layers {layers}: the init model {teacher_dir} has layers "
                             f"0..{available - 1}; pick some of them")
        teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir), use_safetensors=True)
        teacher_names = [teacher.config.id2label[i] for i in range(teacher.config.num_labels)]
        head = teacher_names == [str(n) for n in (meta.get("label_names") or [])]
        config.num_hidden_layers = len(layers)
        student = cls(tokenizer=tokenizer, config=config, pair=bool(meta.get("pair")),
                      max_length=meta.get("max_length", 64))
        state = _pick_layers(teacher.state_dict(), layers)
        own = student.model.state_dict()
        head_keys = {k for k in own if k.startswith("classifier.")}
        state = {k: v for k, v in state.items() if k in own and (head or k not in head_keys)}
        unmapped = sorted(set(own) - set(state) - head_keys)
        if unmapped:
            raise ValueError(f"cannot initialise from {teacher_dir}: its {type(teacher).__name__} weights do not "
                             f"name {unmapped[:3]} as expected (encoder layers as '.layer.N.'/'.layers.N.')")
        student.model.load_state_dict(state, strict=False)
        return student, {"layers": layers, "of": available, "head": "teacher's" if head else "fresh"}

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


_LAYER = re.compile(r"(^|\.)(layers?)\.(\d+)\.")


def _pick_layers(state: dict[str, Any], layers: Sequence[int]) -> dict[str, Any]:
    """The state dict with encoder layer `layers[i]` renamed to layer i and the others dropped."""
    new_index = {old: new for new, old in enumerate(layers)}
    out = {}
    for key, value in state.items():
        match = _LAYER.search(key)
        if match is None:
            out[key] = value
        elif int(match.group(3)) in new_index:
            start, end = match.span()
            out[f"{key[:start]}{match.group(1)}{match.group(2)}.{new_index[int(match.group(3))]}.{key[end:]}"] = value
    return out


def load(path: str | Path):
    return load_classifier(path, TransformerClassifier)
