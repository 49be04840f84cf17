"""Shared parts of the classification students: tokenizers, batching, checkpoints, the loaded
model object behind `load_student(path).predict(texts)`.

A student directory holds:
    model.safetensors   weights (safetensors.torch.save_model: shared tensors stored once)
    student.json        {"type", "task", "hyperparameters", "num_labels", "label_names", "pair",
                         "max_length", "tokenizer": {"kind": word|spm|hf, ...}}
    vocab.txt | spm.model | tokenizer/    the tokenizer, so the directory is self-contained
"""
from __future__ import annotations

import collections
import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Sequence

STUDENT_JSON = "student.json"
WEIGHTS = "model.safetensors"
_WORD_RE = re.compile(r"\w+|[^\w\s]", re.UNICODE)


# --- tokenizers ------------------------------------------------------------------------------
class WordVocab:
    """Whitespace/punctuation word vocabulary built from the transfer set (Tang et al. style)."""

    kind = "word"
    specials = ("<pad>", "<unk>", "<sep>")

    def __init__(self, tokens: Sequence[str], *, lowercase: bool = True):
        self.itos = list(tokens)
        self.stoi = {t: i for i, t in enumerate(self.itos)}
        self.lowercase = lowercase
        self.pad_id, self.unk_id, self.sep_id = 0, 1, 2

    @classmethod
    def build(cls, texts: Iterable[str], *, max_size: int, min_freq: int = 1,
              lowercase: bool = True) -> "WordVocab":
        return cls.build_from_words((cls._split(t, lowercase) for t in texts), max_size=max_size,
                                    min_freq=min_freq, lowercase=lowercase)

    @classmethod
    def build_from_words(cls, word_lists: Iterable[Sequence[str]], *, max_size: int, min_freq: int = 1,
                         lowercase: bool = True) -> "WordVocab":
        """From pre-split words (e.g. spaCy tokens of a tagging corpus)."""
        counts: collections.Counter[str] = collections.Counter()
        for words in word_lists:
            counts.update(w.lower() if lowercase else w for w in words)
        # Ties broken alphabetically so the vocabulary never depends on row order.
        ranked = sorted((w for w, c in counts.items() if c >= min_freq), key=lambda w: (-counts[w], w))
        return cls(list(cls.specials) + ranked[: max(0, max_size - len(cls.specials))], lowercase=lowercase)

    @staticmethod
    def _split(text: str, lowercase: bool) -> list[str]:
        return _WORD_RE.findall(text.lower() if lowercase else text)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, text: str) -> list[int]:
        return [self.stoi.get(w, self.unk_id) for w in self._split(text, self.lowercase)]

    def word_id(self, word: str) -> int:
        return self.stoi.get(word.lower() if self.lowercase else word, self.unk_id)

    def save(self, directory: Path) -> dict[str, Any]:
        (directory / "vocab.txt").write_text("\n".join(self.itos) + "\n", encoding="utf-8")
        return {"kind": self.kind, "lowercase": self.lowercase}

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any]) -> "WordVocab":
        tokens = (directory / "vocab.txt").read_text(encoding="utf-8").split("\n")[:-1]
        return cls(tokens, lowercase=meta.get("lowercase", True))


class SpmTokenizer:
    """A sentencepiece model (the `spm` stage's files/spm.model, or any .model file)."""

    kind = "spm"

    def __init__(self, model_file: str | Path):
        import sentencepiece as spm

        self.model_file = Path(model_file)
        self.sp = spm.SentencePieceProcessor(model_file=str(self.model_file))
        n = self.sp.get_piece_size()
        # A model trained without a pad piece gets one extra id past its vocabulary.
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else n
        self._size = n if self.sp.pad_id() >= 0 else n + 1
        self.unk_id = self.sp.unk_id()
        self.sep_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else self.unk_id

    def __len__(self) -> int:
        return self._size

    def encode(self, text: str) -> list[int]:
        return list(self.sp.encode(text))

    def save(self, directory: Path) -> dict[str, Any]:
        shutil.copyfile(self.model_file, directory / "spm.model")
        return {"kind": self.kind}

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any]) -> "SpmTokenizer":
        return cls(directory / "spm.model")


class HFTokenizer:
    """A Hugging Face tokenizer from a local directory (e.g. the teacher's, for born-again)."""

    kind = "hf"

    def __init__(self, path: str | Path):
        from transformers import AutoTokenizer

        self.path = Path(path)
        self.tok = AutoTokenizer.from_pretrained(str(self.path))
        if len(self.tok) < 5:
            raise ValueError(f"tokenizer at {path} has only {len(self.tok)} tokens: a broken or "
                             "empty vocabulary; save a complete tokenizer there")
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else 0
        self.unk_id = self.tok.unk_token_id if self.tok.unk_token_id is not None else 0
        self.sep_id = self.tok.sep_token_id if self.tok.sep_token_id is not None else self.unk_id

    def __len__(self) -> int:
        return len(self.tok)

    def encode(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"]

    def encode_pair(self, text: str, pair: str | None, max_length: int) -> tuple[list[int], list[int]]:
        enc = self.tok(text, pair, truncation=True, max_length=max_length, return_token_type_ids=True)
        return enc["input_ids"], enc.get("token_type_ids") or [0] * len(enc["input_ids"])

    def save(self, directory: Path) -> dict[str, Any]:
        self.tok.save_pretrained(str(directory / "tokenizer"))
        return {"kind": self.kind}

    @classmethod
    def load(cls, directory: Path, meta: dict[str, Any]) -> "HFTokenizer":
        return cls(directory / "tokenizer")


TOKENIZERS = {c.kind: c for c in (WordVocab, SpmTokenizer, HFTokenizer)}


def load_tokenizer(directory: Path, meta: dict[str, Any]):
    return TOKENIZERS[meta["kind"]].load(directory, meta)


# --- batching --------------------------------------------------------------------------------
def pad_ids(rows: Sequence[Sequence[int]], pad_id: int, *, min_length: int = 1):
    """Right-padded LongTensor and lengths (an empty text becomes one pad token, length 1)."""
    import numpy as np
    import torch

    lengths = [max(1, len(r)) for r in rows]
    width = max([min_length, *lengths])
    out = np.full((len(rows), width), pad_id, dtype=np.int64)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = r
    return torch.from_numpy(out), torch.tensor(lengths, dtype=torch.long)


class SiameseTokenization:
    """Mixin for students that encode each side of a pair separately (bilstm, cnn)."""

    tokenizer: Any
    max_length: int
    pair: bool
    min_length: int = 1

    def tokenize_rows(self, texts: Sequence[str], pairs: Sequence[str] | None) -> list[tuple]:
        enc = self.tokenizer.encode
        n = self.max_length
        if pairs is None:
            return [(enc(t)[:n], None) for t in texts]
        return [(enc(a)[:n], enc(b)[:n]) for a, b in zip(texts, pairs)]

    def collate(self, rows: Sequence[tuple]) -> dict[str, Any]:
        pad = self.tokenizer.pad_id
        ids, lengths = pad_ids([r[0] for r in rows], pad, min_length=self.min_length)
        batch = {"ids": ids, "lengths": lengths}
        if self.pair:
            batch["ids2"], batch["lengths2"] = pad_ids([r[1] or [] for r in rows], pad, min_length=self.min_length)
        return batch


def pair_features(h1, h2):
    """[h1, h2, h1*h2, |h1-h2|] (Tang et al. 2019, after Conneau et al. 2017)."""
    import torch

    return torch.cat([h1, h2, h1 * h2, (h1 - h2).abs()], dim=-1)


# --- the loaded model ------------------------------------------------------------------------
class ClassifierStudent:
    """What `load_student` returns for bilstm/cnn/transformer students, and what train saves."""

    task = "classification"

    def __init__(self, *, module, meta: dict[str, Any]):
        self.module = module
        self.meta = meta
        self.label_names: list[str] | None = meta.get("label_names")

    @property
    def type(self) -> str:
        return self.meta["type"]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def logits(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, batch_size: int = 64):
        import numpy as np
        import torch

        from pipeline.devices import move

        self.module.eval()
        device = next(self.module.parameters()).device
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                chunk_pairs = None if pairs is None else pairs[start:start + batch_size]
                rows = self.module.tokenize_rows(texts[start:start + batch_size], chunk_pairs)
                batch = move(self.module.collate(rows), device)
                out.append(self.module(**batch).float().cpu().numpy())
        width = self.meta["num_labels"]
        return np.concatenate(out) if out else np.zeros((0, width), dtype=np.float32)

    def predict(self, texts: Sequence[str], pairs: Sequence[str] | None = None, *, batch_size: int = 64,
                return_names: bool = True) -> list:
        """Label names when the student knows them (else class indices)."""
        if self.meta.get("pair") and pairs is None:
            raise ValueError("this student classifies text pairs: call predict(texts, pairs)")
        idx = self.logits(list(texts), None if pairs is None else list(pairs), batch_size=batch_size).argmax(-1)
        if return_names and self.label_names:
            return [self.label_names[i] for i in idx]
        return [int(i) for i in idx]

    def save(self, directory: str | Path) -> Path:
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        meta = dict(self.meta)
        meta["tokenizer"] = self.module.tokenizer.save(directory)
        extra = getattr(self.module, "save_extra", None)
        if extra is not None:
            extra(directory)
        save_model(self.module, str(directory / WEIGHTS))
        (directory / STUDENT_JSON).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return directory


def load_classifier(path: str | Path, module_cls, student_cls=ClassifierStudent) -> ClassifierStudent:
    from safetensors.torch import load_model

    path = Path(path)
    meta = json.loads((path / STUDENT_JSON).read_text())
    tokenizer = load_tokenizer(path, meta["tokenizer"])
    module = module_cls.create(meta=meta, tokenizer=tokenizer, directory=path)
    load_model(module, str(path / WEIGHTS))
    module.eval()
    return student_cls(module=module, meta=meta)
