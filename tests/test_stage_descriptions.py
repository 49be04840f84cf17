"""The engine learns about a stage only by asking its class: facts of another run's artifact
(`artifact_facts`), where its model is (`model_folder`, for `predict`), its report section."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest
from factories import tiny_bert_classifier

from pipeline.errors import KdpipeError, ManifestError
from pipeline.graph import build_graph
from pipeline.manifest import parse_manifest
from pipeline.predict import resolve_model_dir
from pipeline.registry import get_stage_class
from pipeline.stage import Stage
from pipeline.testing import make_artifact


def finished_run(workdir: Path, run: str, stage: str, art) -> None:
    """Alias runs/RUN/STAGE -> the artifact, as a finished run leaves it."""
    link = workdir / "runs" / run / stage
    link.parent.mkdir(parents=True, exist_ok=True)
    os.symlink(os.path.relpath(art.path, link.parent), link)


def test_default_artifact_facts_decode_json_lists_and_keep_strings():
    facts = Stage.artifact_facts({"label_names": '["neg", "pos"]', "mask_token": "[MASK]", "spacy_model": "x"})
    assert facts.get("label_names") == ["neg", "pos"] and facts.get("mask_token") == "[MASK]"


def test_label_names_of_another_runs_artifact_reach_the_teacher_check(tmp_path):
    workdir = tmp_path / "wd"
    table = pa.table({"id": ["a", "b"], "text": ["good", "bad"], "label": [1, 0]})
    art = make_artifact(workdir / "artifacts" / "read" / "k1", table, type_key="read",
                        metadata={"kdpipe.label_names": json.dumps(["negative", "positive"])})
    finished_run(workdir, "first", "read", art)
    teacher = tiny_bert_classifier(tmp_path / "teacher", num_labels=3)
    manifest = {"name": "second", "workdir": str(workdir), "stages": [
        {"name": "label", "type": "label", "inputs": {"data": "@first/read"}, "config": {"teacher": str(teacher)}}]}
    with pytest.raises(ManifestError) as err:
        build_graph(parse_manifest(manifest))
    message = "\n".join(err.value.problems)
    # the data's label names and where they were set come from the other run's artifact
    assert "has 3 labels" in message and "['negative', 'positive']" in message and "inputs (@first/read)" in message


def test_predict_finds_the_model_where_the_stage_type_keeps_it(tmp_path):
    files = {"student/student.json": b'{"type": "cnn"}'}
    train_art = make_artifact(tmp_path / "train", files=files, type_key="train")
    assert get_stage_class("train").model_folder == "student"
    assert resolve_model_dir(str(train_art.path), str(tmp_path)) == train_art.path / "files" / "student"
    # the same folder in an artifact of a stage type that makes no model is not a model
    read_art = make_artifact(tmp_path / "read", files=files, type_key="read")
    with pytest.raises(KdpipeError, match="holds no trained model"):
        resolve_model_dir(str(read_art.path), str(tmp_path))


def test_report_sections_come_from_the_stage_classes(tmp_path):
    from pipeline.report import collect_rows

    run_dir = tmp_path / "runs" / "r"
    train_metrics = {"student": "cnn", "parameters": 10, "dev_accuracy": 0.5, "labels": []}
    train = make_artifact(tmp_path / "a" / "train", type_key="train",
                          files={"metrics.json": json.dumps(train_metrics).encode(), "student/w": b"1234"})
    evaluated = {"models": [{"name": "teacher", "is_teacher": True, "type": "hf", "parameters": 99,
                             "metrics": {"accuracy": 0.9}, "sentences_per_s": 10.0, "speedup_vs_teacher": 1.0}]}
    ev = make_artifact(tmp_path / "a" / "evaluate", type_key="evaluate",
                       files={"metrics.json": json.dumps(evaluated).encode()})
    other = make_artifact(tmp_path / "a" / "read", pa.table({"id": ["a"]}), type_key="read")
    for name, art in (("student", train), ("evaluate", ev), ("read", other)):
        finished_run(tmp_path, "r", name, art)
    rows, figures = collect_rows(run_dir)
    assert [(r["model"], r["role"], r["metric"], r["value"]) for r in rows] == [
        ("teacher", "teacher", "accuracy (evaluate)", 0.9), ("student", "student", "dev accuracy", 0.5)]
    assert rows[1]["size_bytes"] == 4 and figures == []
