"""End to end through the engine: read -> split -> label (tiny teacher) -> two students (KD and
no KD) sharing one label artifact -> evaluate -> report and predict from the CLI. Plus evaluate
on a seq2seq teacher."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from factories import tiny_bert_classifier, tiny_seq2seq

from pipeline.cli import main
from pipeline.graph import build_graph
from pipeline.manifest import parse_manifest
from pipeline.runner import run_graph

STUDENT = {"type": "bilstm", "embedding_dim": 16, "hidden_dim": 16, "mlp_dim": 16}


def sweep_manifest(tmp_path: Path, tsv: Path, teacher: Path) -> dict:
    train = {"student": STUDENT, "epochs": 3, "batch_size": 8, "lr": 0.005}
    return {"name": "kd", "workdir": str(tmp_path / "wd"), "stages": [
        {"name": "read", "type": "read",
         "config": {"path": str(tsv), "text_column": "sentence", "label_column": "label",
                    "label_names": ["negative", "positive"], "rows_per_shard": 16}},
        {"name": "train_set", "type": "split", "inputs": {"data": "read"}, "config": {"fraction": 0.75}},
        {"name": "dev", "type": "split", "inputs": {"data": "read"}, "config": {"fraction": 0.75, "part": "out"}},
        {"name": "label", "type": "label", "inputs": {"data": "train_set"},
         "config": {"teacher": str(teacher), "concurrency": 1}},
        {"name": "student_kd", "type": "train", "inputs": {"data": "train_set", "labels": "label", "dev": "dev"},
         "config": {**train, "losses": {"ce": 0.0, "mse": 1.0}}},
        {"name": "student_gold", "type": "train", "inputs": {"data": "train_set", "dev": "dev"},
         "config": {**train, "losses": {"ce": 1.0}}},
        {"name": "evaluate", "type": "evaluate", "inputs": {"data": "dev", "models": ["student_kd", "student_gold"]},
         "config": {"teacher_model": str(teacher), "speed_rows": 16}},
    ]}


def json_rows(art_path: str) -> list[dict]:
    from pipeline.artifact import Artifact

    return Artifact(art_path).read_table().to_pylist()


def is_png(path: Path) -> bool:
    import matplotlib.image

    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).ndim == 3


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_labels_once_then_evaluate_report_and_predict(tmp_path, sentiment_tsv, ray_session, capsys):
    teacher = tiny_bert_classifier(tmp_path / "teacher", label_names=["negative", "positive"])
    manifest = sweep_manifest(tmp_path, sentiment_tsv, teacher)
    summary = {s["name"]: s for s in run_graph(build_graph(parse_manifest(manifest)), progress=False,
                                               log=lambda *a: None)}
    assert summary["label"]["status"] == "ran"
    assert summary["student_kd"]["status"] == summary["student_gold"]["status"] == "ran"
    # both students read the one label artifact, computed once; the gold-only one consumed none
    kd = json.loads((Path(summary["student_kd"]["path"]) / "files" / "metrics.json").read_text())
    gold = json.loads((Path(summary["student_gold"]["path"]) / "files" / "metrics.json").read_text())
    assert [lab["key"] for lab in kd["labels"]] == [summary["label"]["key"]] and gold["labels"] == []

    # a sweep adding a third student: the labels are cached, only the new student trains
    manifest["stages"].append({"name": "student_cnn", "type": "train", "inputs": {"data": "train_set", "labels": "label"},
                               "config": {"student": {"type": "cnn", "embedding_dim": 16, "num_filters": 8},
                                          "epochs": 1, "losses": {"ce": 0.0, "kl": 1.0}}})
    again = {s["name"]: s for s in run_graph(build_graph(parse_manifest(manifest)), progress=False,
                                             log=lambda *a: None)}
    assert again["label"]["status"] == "cached" and again["student_kd"]["status"] == "cached"
    assert again["student_cnn"]["status"] == "ran"

    ev = json.loads((Path(summary["evaluate"]["path"]) / "files" / "metrics.json").read_text())
    by_name = {m["name"]: m for m in ev["models"]}
    assert set(by_name) == {"teacher", "student_kd", "student_gold"} and ev["teacher"] == "teacher"
    assert by_name["teacher"]["speedup_vs_teacher"] == 1.0
    # every reported accuracy is the saved model's on the saved dev split, recomputed here
    from kd.students import load_student
    from stages.evaluate import model_dir

    dev = pa.Table.from_pylist(json_rows(summary["dev"]["path"]))
    texts, gold = [t or "" for t in dev["text"].to_pylist()], dev["label"].to_pylist()
    paths = {"teacher": teacher, "student_kd": model_dir(Path(summary["student_kd"]["path"])),
             "student_gold": model_dir(Path(summary["student_gold"]["path"]))}
    for name, m in by_name.items():
        pred = load_student(paths[name]).predict(texts, batch_size=8, return_names=False)
        recomputed = sum(int(p) == int(g) for p, g in zip(pred, gold)) / len(gold)
        assert m["metrics"]["accuracy"] == pytest.approx(recomputed, abs=1e-4), name
        assert m["parameters"] > 0 and m["sentences_per_s"] > 0
    assert by_name["student_kd"]["labels_used"] == ["label"] and by_name["student_gold"]["labels_used"] == []

    workdir = str(tmp_path / "wd")
    assert main(["report", "kd", "--workdir", workdir]) == 0
    out = capsys.readouterr().out
    for name in ("teacher", "student_kd", "student_gold"):
        assert name in out
    report = tmp_path / "wd" / "runs" / "kd" / "report"
    assert (report / "report.md").is_file() and (report / "report.html").is_file()
    pngs = sorted(p.name for p in report.glob("*.png"))
    assert "accuracy_vs_speed.png" in pngs and "curves-student_kd.png" in pngs
    assert all(is_png(report / p) for p in pngs)
    md = (report / "report.md").read_text()
    assert "| teacher | teacher |" in md and "| student_kd | student |" in md

    assert main(["predict", "kd/student_kd", "--workdir", workdir, "--text", "the cast is terrific",
                 "--text", "a dull , lifeless mess"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and all(line.split("\t")[0] in ("negative", "positive") for line in lines)
    assert main(["predict", "kd/no_such_stage", "--workdir", workdir, "--text", "x"]) == 1


def test_evaluate_scores_a_seq2seq_model_with_bleu_and_chrf(tmp_path):
    from pipeline.testing import make_artifact, make_context
    from stages.evaluate import EvaluateStage

    src = ["a man rides a horse", "two dogs play in the snow", "a woman reads a book"]
    tgt = ["ein mann reitet ein pferd", "zwei hunde spielen im schnee", "eine frau liest ein buch"]
    model = tiny_seq2seq(tmp_path / "mt", src, tgt)
    data = make_artifact(tmp_path / "data", pa.table({"id": ["a", "b", "c"], "text": src, "target": tgt}))
    ctx = make_context(tmp_path, inputs={"data": [data], "models": []})
    ctx.out_dir.mkdir(parents=True)
    summary = EvaluateStage(config=EvaluateStage.Config(teacher_model=str(model), speed_rows=3)).run(ctx)
    metrics = summary["models"]["mt"]["metrics"]
    assert set(metrics) == {"bleu", "chrf", "num_beams"}
    # the scores are sacrebleu's on this model's own translations, recomputed here
    import sacrebleu

    from kd.students import load_student
    hyps = load_student(model).predict(src, batch_size=3)
    assert metrics["chrf"] == pytest.approx(round(sacrebleu.corpus_chrf(hyps, [tgt]).score, 3), abs=1e-3)
    assert metrics["bleu"] == pytest.approx(round(sacrebleu.corpus_bleu(hyps, [tgt]).score, 3), abs=1e-3)
    # the beam width actually used: the checkpoint's own generation config, not a default of 4
    from transformers import GenerationConfig
    assert metrics["num_beams"] == (GenerationConfig.from_pretrained(str(model)).num_beams or 1)
    assert summary["teacher"] == "mt" and summary["models"]["mt"]["speedup_vs_teacher"] == 1.0


def test_report_names_a_missing_run(tmp_path, capsys):
    assert main(["report", "nope", "--workdir", str(tmp_path)]) == 1
    assert "no run 'nope'" in capsys.readouterr().err


def test_metric_functions_against_hand_counts():
    from stages.evaluate import accuracy, macro_f1, token_f1

    pred, gold = [0, 0, 1, 1, 2], [0, 1, 1, 1, -1]  # the last row has no gold label
    assert accuracy(pred, gold) == pytest.approx(3 / 4)
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 2 fp 0 fn 1 -> 4/5
    assert macro_f1(pred, gold) == pytest.approx((2 / 3 + 4 / 5) / 2)
    # tagged tokens: tp 2 (B-PER, I-PER), fp 1 (B-LOC for O), fn 1 (B-ORG predicted O)
    p = [["B-PER", "I-PER", "O", "B-LOC"], ["O"]]
    g = [["B-PER", "I-PER", "O", "O"], ["B-ORG"]]
    assert token_f1(p, g) == pytest.approx(2 * 2 / (2 * 2 + 1 + 1))
