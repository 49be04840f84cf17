"""Loader for `train_seq2seq` students (and any HF encoder-decoder checkpoint directory):
`load(path).predict(texts, num_beams=1)` translates, greedy by default."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


class Seq2SeqModel:
    task = "seq2seq"

    def __init__(self, model, tokenizer, meta: dict[str, Any]):
        self.model, self.tokenizer, self.meta = model, tokenizer, meta

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def predict(self, texts: Sequence[str], *, num_beams: int = 1, batch_size: int = 64,
                max_new_tokens: int | None = None) -> list[str]:
        """Translations in input order. Inputs are batched by length (less padding)."""
        import torch

        texts = list(texts)
        limit = max_new_tokens or self.model.generation_config.max_new_tokens or 64
        max_length = getattr(self.model.config, "max_position_embeddings", None) or 512
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        out: list[str] = [""] * len(texts)
        with torch.inference_mode():
            for start in range(0, len(order), batch_size):
                idx = order[start:start + batch_size]
                enc = self.tokenizer([texts[i] for i in idx], return_tensors="pt", padding=True,
                                     truncation=True, max_length=max_length, return_token_type_ids=False)
                gen = self.model.generate(**enc, num_beams=num_beams, num_return_sequences=1,
                                          max_new_tokens=limit, do_sample=False)
                for i, text in zip(idx, self.tokenizer.batch_decode(gen, skip_special_tokens=True)):
                    out[i] = text
        return out


def load(path: str | Path) -> Seq2SeqModel:
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    path = Path(path)
    meta_file = path / "student.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {"type": "hf", "task": "seq2seq"}
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if len(tokenizer) < 5:
        raise ValueError(f"tokenizer at {path} has only {len(tokenizer)} tokens: a broken vocabulary")
    model = AutoModelForSeq2SeqLM.from_pretrained(str(path)).eval()
    return Seq2SeqModel(model, tokenizer, meta)
