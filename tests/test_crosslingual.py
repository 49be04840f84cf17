"""Cross-lingual distillation: an English classifier labels the English side of parallel pairs,
a German student learns from the German side (joined by id), agreement on held-out pairs."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from test_seq2seq import toy_pairs, write_toy_multi30k

REPO = Path(__file__).resolve().parent.parent


def test_agreement_metrics_counts_and_confusion():
    from stages.agreement import agreement_metrics

    m = agreement_metrics([0, 0, 1, 1, 1], [0, 1, 1, 1, 0], ["neg", "pos"])
    assert m["agreement"] == 0.6
    assert m["teacher_counts"] == {"neg": 2, "pos": 3} and m["student_counts"] == {"neg": 2, "pos": 3}
    assert m["confusion_teacher_rows_student_cols"] == [[1, 1], [1, 2]]
    # chance = (2*2 + 3*3) / 25 = 0.52; kappa = (0.6 - 0.52) / (1 - 0.52)
    assert m["cohen_kappa"] == round(0.08 / 0.48, 4) and m["teacher_majority_rate"] == 0.6
    constant = agreement_metrics([1, 1, 1, 0], [1, 1, 1, 1], ["neg", "pos"])
    assert constant["agreement"] == 0.75 and constant["cohen_kappa"] == 0.0


def test_agreement_validation_names_the_fix():
    from stages.agreement import AgreementStage

    stage = AgreementStage(config=AgreementStage.Config(student_column="fr", logits_column="logits"))
    problems = stage.validate(input_columns={"data": [["id", "text", "de"]], "labels": [["id", "logits_a"]]})
    assert {p.loc for p in problems} == {"config.student_column", "config.logits_column"}
    assert "logits_a" in next(p.message for p in problems if p.loc == "config.logits_column")


@pytest.mark.ray
@pytest.mark.slow
def test_crosslingual_manifest_runs_end_to_end(tmp_path, ray_session, sentiment_tsv):
    import numpy as np

    from factories import tiny_bert_classifier
    from pipeline.artifact import Artifact
    from pipeline.graph import build_graph
    from pipeline.manifest import load_manifest
    from pipeline.runner import run_graph
    from kd.students import load_student

    teacher_base = tiny_bert_classifier(tmp_path / "base", 2, ["negative", "positive"],
                                        sentences=[e for e, _ in toy_pairs()])
    data = write_toy_multi30k(tmp_path / "multi30k")
    overrides = {"sst2_train": str(sentiment_tsv), "sst2_dev": str(sentiment_tsv), "multi30k": str(data),
                 "base_model": str(teacher_base), "sst2_rows": "40", "pairs": "64", "transfer_fraction": "0.75",
                 "rows_per_shard": "64", "student_epochs": "1", "cpus": "1"}
    manifest = load_manifest(REPO / "manifests" / "crosslingual.yaml", overrides=overrides)
    manifest.workdir = str(tmp_path / "wd")
    summary = run_graph(build_graph(manifest), progress=False, log=lambda *a: None)
    by_name = {s["name"]: s for s in summary}
    assert all(s["status"] == "ran" for s in summary)

    heldout = Artifact(by_name["heldout"]["path"]).read_table()
    transfer = Artifact(by_name["transfer"]["path"]).read_table()
    assert not set(heldout["id"].to_pylist()) & set(transfer["id"].to_pylist())
    assert heldout.num_rows + transfer.num_rows == 64 and heldout.num_rows > 0

    metrics = json.loads((Path(by_name["agreement"]["path"]) / "files" / "metrics.json").read_text())
    assert metrics["rows"] == heldout.num_rows and metrics["unlabeled_rows"] == 0
    assert metrics["label_names"] == ["negative", "positive"]
    de, en = metrics["students"]["student_de"], metrics["students"]["student_en"]
    assert de["column"] == "de" and en["column"] == "text"
    assert sum(de["teacher_counts"].values()) == heldout.num_rows

    # recompute the German student's agreement independently, joining by id
    labels = Artifact(by_name["heldout_labels"]["path"]).read_table()
    teacher = dict(zip(labels["id"].to_pylist(), np.asarray(labels["logits"].to_pylist()).argmax(-1).tolist()))
    student = load_student(Path(by_name["student_de"]["path"]))
    pred = student.predict(heldout["de"].to_pylist(), return_names=False)
    agree = np.mean([int(p) == teacher[i] for p, i in zip(pred, heldout["id"].to_pylist())])
    assert de["agreement"] == pytest.approx(agree, abs=1e-4)
