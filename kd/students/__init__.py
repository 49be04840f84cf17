"""Student (and wrapped teacher) models behind one loading protocol.

A saved model directory holds `student.json` with at least {"type": <key>, "task": ...}.
`load_student(path)` imports the module registered for that type and calls its `load(path)`,
which returns an object with:

    task: str                          "classification" | "token_classification" | "seq2seq"
    predict(texts, **kw) -> list       class indices / label names, tag lists, or output strings
    num_parameters() -> int
"""
from __future__ import annotations

import importlib
import json
from pathlib import Path
from typing import Any

# student type -> module providing load(path)
STUDENTS: dict[str, str] = {
    "bilstm": "kd.students.bilstm",
    "cnn": "kd.students.cnn",
    "transformer": "kd.students.transformer",
    "seq2seq": "kd.students.seq2seq",
    "chain": "kd.students.chain",  # two seq2seq models decoded in turn (pivot translation)
    "hf": "kd.students.hf",  # an HF checkpoint directory (teachers), see hf.py
}


def load_student(path: str | Path) -> Any:
    path = Path(path)
    if (path / "files" / "student").is_dir():  # an artifact directory was given
        path = path / "files" / "student"
    meta_file = path / "student.json"
    if not meta_file.is_file():
        if (path / "config.json").is_file():  # a bare HF checkpoint (e.g. a fine-tuned teacher)
            return importlib.import_module(STUDENTS["hf"]).load(path)
        raise FileNotFoundError(f"{path} holds neither student.json nor an HF config.json")
    kind = json.loads(meta_file.read_text())["type"]
    if kind not in STUDENTS:
        raise ValueError(f"{meta_file}: unknown student type {kind!r}; known: {', '.join(STUDENTS)}")
    return importlib.import_module(STUDENTS[kind]).load(path)
