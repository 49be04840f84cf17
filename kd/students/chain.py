"""Two seq2seq models decoded one after the other (pivot translation: FR→EN, then EN→DE), behind
the student protocol so `evaluate` and `predict` score the chain like any other translator.

A chain directory holds `first/` and `second/` (each a loadable model directory) and
`student.json` {"type": "chain", "task": "seq2seq", "first_num_beams": ..., "second_num_beams": ...};
a beam width of null means that model's own default (greedy for students, the checkpoint's
generation config for HF teachers)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Sequence


class ChainModel:
    task = "seq2seq"
    type = "chain"

    def __init__(self, first, second, meta: dict[str, Any]):
        self.first, self.second, self.meta = first, second, meta

    def num_parameters(self) -> int:
        return self.first.num_parameters() + self.second.num_parameters()

    def predict(self, texts: Sequence[str], *, batch_size: int = 64, **_: Any) -> list[str]:
        pivot = self.first.predict(list(texts), batch_size=batch_size, **_beams(self.meta.get("first_num_beams")))
        return self.second.predict(pivot, batch_size=batch_size, **_beams(self.meta.get("second_num_beams")))


def _beams(width: int | None) -> dict[str, int]:
    return {} if width is None else {"num_beams": int(width)}


def load(path: str | Path) -> ChainModel:
    from kd.students import load_student

    path = Path(path)
    meta = json.loads((path / "student.json").read_text())
    first, second = load_student(path / "first"), load_student(path / "second")
    for part, model in (("first", first), ("second", second)):
        if model.task != "seq2seq":
            raise ValueError(f"{path / part} is a {model.task} model; a chain needs two seq2seq models")
    return ChainModel(first, second, meta)
