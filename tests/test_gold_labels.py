"""One mapping from gold values to class indices (kd.teachers.gold_indices), used by train's data
feeding, finetune, evaluate and the audit; and one id2label parser (kd.teachers.label_names)."""
from __future__ import annotations

import ast
import json
from pathlib import Path

import pyarrow as pa
import pytest

from kd.teachers import gold_indices, label_names
from pipeline.testing import make_artifact

REPO = Path(__file__).resolve().parent.parent


def test_the_rule():
    assert gold_indices([0, 1, None, -1], ["a", "b"]) == [0, 1, -1, -1]       # positions; no gold -> -1
    assert gold_indices([0, 1], ["pos", "neg"], data_names=["neg", "pos"]) == [1, 0]  # ints name data_names[i]
    assert gold_indices(["neg", "pos"], ["pos", "neg"]) == [1, 0]             # names by name
    assert gold_indices(["x", 7], ["a", "b"], unknown=-2) == [-2, -2]
    with pytest.raises(ValueError, match="gold label 7 is not one of the label names"):
        gold_indices([7], ["a", "b"])


def test_train_finetune_and_evaluate_map_the_same_gold_the_same_way(tmp_path):
    """Integer gold over data named [neg, pos], a model ordered [pos, neg]: every consumer puts a
    row on the index of its name."""
    from stages.evaluate import _gold_indices as evaluate_gold
    from stages.finetune import FinetuneConfig, load_examples

    gold = [0, 1, 1, None]
    data = make_artifact(tmp_path / "d", pa.table({"id": ["a", "b", "c", "d"], "text": ["x"] * 4,
                                                   "label": pa.array(gold, pa.int64())}),
                         metadata={"kdpipe.label_names": json.dumps(["neg", "pos"])})
    model_order = ["pos", "neg"]
    assert evaluate_gold(gold, model_order, data) == [1, 0, 0, -1]
    with pytest.raises(ValueError, match="row d has no label"):
        load_examples(data, FinetuneConfig(), model_order)
    labelled = make_artifact(tmp_path / "e", pa.table({"id": ["a", "b", "c"], "text": ["x"] * 3,
                                                       "label": pa.array(gold[:3], pa.int64())}),
                             metadata={"kdpipe.label_names": json.dumps(["neg", "pos"])})
    assert load_examples(labelled, FinetuneConfig(), model_order)["labels"] == [1, 0, 0]

    from kd.train_data import read_eval_table

    class Cfg:
        student_column, student_pair_column, label_column, task = "text", None, "label", "classification"

    assert read_eval_table(labelled, Cfg(), ["neg", "pos"])["gold"] == [0, 1, 1]
    # train's dev set with its own label order: integers name its names (positions before the fix)
    reversed_dev = make_artifact(tmp_path / "r", pa.table({"id": ["a", "b"], "text": ["x"] * 2,
                                                           "label": pa.array([0, 1], pa.int64())}),
                                 metadata={"kdpipe.label_names": json.dumps(["pos", "neg"])})
    assert read_eval_table(reversed_dev, Cfg(), ["neg", "pos"])["gold"] == [1, 0]


def test_no_module_maps_gold_or_parses_id2label_on_its_own():
    """Beyond kd/teachers.py, nobody reads id2label items or builds its own name->index map of gold."""
    offenders = []
    for path in [*REPO.glob("stages/*.py"), *REPO.glob("kd/**/*.py"), *REPO.glob("pipeline/*.py")]:
        if path.name == "teachers.py" and path.parent.name == "kd":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and "gold" in node.name and "indices" in node.name:
                calls = {getattr(c.func, "id", getattr(c.func, "attr", None)) for c in ast.walk(node)
                         if isinstance(c, ast.Call)}
                if "gold_indices" not in calls:
                    offenders.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name}")
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                    and node.slice.value == "id2label" and isinstance(node.ctx, ast.Load):
                offenders.append(f"{path.relative_to(REPO)}:{node.lineno} reads id2label")
    assert not offenders, offenders
    assert label_names({"id2label": {"1": "pos", "0": "neg"}}) == ["neg", "pos"]
