"""An HF checkpoint directory (a fine-tuned teacher, or any local model) behind the student
protocol, so evaluate and predict treat teachers and students alike.

The task comes from the config: encoder-decoder models are seq2seq (predict = beam search and
decode), `*ForTokenClassification` architectures tag words, everything else classifies."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Sequence


class HFModel:
    def __init__(self, path: str | Path, *, trust_remote_code: bool = False):
        import torch  # noqa: F401  (fail early with a clear ImportError)
        from transformers import AutoConfig, AutoTokenizer

        self.path = Path(path)
        self.config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=trust_remote_code)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=trust_remote_code)
        if len(self.tokenizer) < 5:
            raise ValueError(f"tokenizer in {self.path} has only {len(self.tokenizer)} tokens; save the "
                             "full tokenizer next to the model")
        archs = self.config.architectures or []
        if self.config.is_encoder_decoder:
            from transformers import AutoModelForSeq2SeqLM as Auto
            self.task = "seq2seq"
        elif any(a.endswith("ForTokenClassification") for a in archs):
            from transformers import AutoModelForTokenClassification as Auto
            self.task = "token_classification"
        else:
            from transformers import AutoModelForSequenceClassification as Auto
            self.task = "classification"
        self.model = Auto.from_pretrained(str(self.path), trust_remote_code=trust_remote_code).eval()
        from kd.teachers import label_names, placeholder_names

        names = label_names(self.config.to_dict())
        # transformers' placeholder names (LABEL_0...) carry no meaning: keep indices then.
        self.label_names = None if placeholder_names(names) else names
        self.type = "hf"
        self.max_length = min(512, getattr(self.config, "max_position_embeddings", 512) or 512)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())

    def _encode(self, texts, pairs=None, **kw):
        return self.tokenizer(list(texts), None if pairs is None else list(pairs), padding=True,
                              truncation=True, max_length=self.max_length, return_tensors="pt", **kw)

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, batch_size: int = 64):
        import numpy as np
        import torch

        out = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                enc = self._encode(texts[s:s + batch_size], None if pairs is None else pairs[s:s + batch_size])
                out.append(self.model(**enc).logits.float().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.num_labels), dtype=np.float32)

    def predict(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, batch_size: int = 64,
                return_names: bool = True, num_beams: int | None = None, max_new_tokens: int = 64) -> list[Any]:
        texts = list(texts)
        if self.task == "seq2seq":
            return self._generate(texts, batch_size=batch_size, num_beams=num_beams, max_new_tokens=max_new_tokens)
        if self.task == "token_classification":
            return self._tag(texts, batch_size=batch_size)
        idx = self.logits(texts, pairs, batch_size=batch_size).argmax(-1)
        if return_names and self.label_names:
            return [self.label_names[i] for i in idx]
        return [int(i) for i in idx]

    @property
    def num_beams(self) -> int:
        """The beam width `predict` uses when not told otherwise: the checkpoint's generation config."""
        return int(getattr(self.model.generation_config, "num_beams", None) or 1)

    def _generate(self, texts: list[str], *, batch_size: int, num_beams: int | None, max_new_tokens: int) -> list[str]:
        import torch

        out: list[str] = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                enc = self._encode(texts[s:s + batch_size], return_token_type_ids=False)
                ids = self.model.generate(**enc, num_beams=num_beams or self.num_beams, max_new_tokens=max_new_tokens)
                out.extend(self.tokenizer.batch_decode(ids, skip_special_tokens=True))
        return out

    def _tag(self, texts: list[str], *, batch_size: int) -> list[list[str]]:
        """One tag per whitespace word: the prediction at each word's first sub-token."""
        import torch

        names = self.label_names or [str(i) for i in range(self.config.num_labels)]
        out: list[list[str]] = []
        with torch.inference_mode():
            for s in range(0, len(texts), batch_size):
                words = [t if isinstance(t, list) else t.split() for t in texts[s:s + batch_size]]
                enc = self.tokenizer(words, is_split_into_words=True, padding=True, truncation=True,
                                     max_length=self.max_length, return_tensors="pt")
                pred = self.model(**enc).logits.argmax(-1)
                for i, ws in enumerate(words):
                    tags, seen = ["O"] * len(ws), set()
                    for pos, w in enumerate(enc.word_ids(i)):
                        if w is not None and w not in seen:
                            seen.add(w)
                            tags[w] = names[int(pred[i, pos])]
                    out.append(tags)
        return out


def load(path: str | Path) -> HFModel:
    return HFModel(path)
