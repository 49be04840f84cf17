"""Born-again students: finetune's teacher term (labels input, kd_alpha, temperature) and
manifests/born-again.yaml (teacher -> gen1 -> gen2, one architecture) end to end."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pytest
from factories import DEFAULT_SENTENCES, tiny_bert_encoder

from pipeline.testing import make_artifact, make_context
from stages.finetune import FinetuneConfig, FinetuneStage, kd_loss

REPO = Path(__file__).resolve().parent.parent
POS, NEG = DEFAULT_SENTENCES[:6], DEFAULT_SENTENCES[6:12]
NAMES_MD = {"kdpipe.label_names": json.dumps(["negative", "positive"])}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_bert_encoder(tmp_path_factory.mktemp("enc"))


def labeled_table(n: int) -> pa.Table:
    return pa.table({"id": [f"r{i:04d}" for i in range(n)],
                     "text": [(POS if i % 2 else NEG)[(i // 2) % 6] for i in range(n)],
                     "label": pa.array([i % 2 for i in range(n)], pa.int64())})


def logits_table(table: pa.Table, *, invert: bool) -> pa.Table:
    """Confident teacher logits that agree with gold, or contradict it (invert)."""
    rows = [[4.0, -4.0] if (g == 1) == invert else [-4.0, 4.0] for g in table["label"].to_pylist()]
    order = list(range(table.num_rows))[::-1]  # label rows in another order: joined by id
    return pa.table({"id": [table["id"][i].as_py() for i in order],
                     "logits": pa.array([rows[i] for i in order], pa.list_(pa.float32(), 2))})


def test_kd_loss_matches_a_hand_computation():
    import torch

    logits = torch.tensor([[1.0, -1.0], [0.5, 2.0]])
    teacher = torch.tensor([[3.0, 0.0], [-1.0, 1.0]])
    gold = torch.tensor([0, 1])
    t, alpha = 2.0, 0.25
    ce = -(torch.log_softmax(logits, -1)[[0, 1], gold]).mean()
    p = torch.softmax(teacher / t, -1)
    kl = (p * (p.log() - torch.log_softmax(logits / t, -1))).sum(-1).mean()
    expected = (1 - alpha) * ce + alpha * t * t * kl
    assert kd_loss(logits, gold, teacher, alpha=alpha, temperature=t).item() == pytest.approx(expected.item(), rel=1e-5)
    assert kd_loss(logits, gold, None, alpha=0.0, temperature=t).item() == pytest.approx(ce.item(), rel=1e-6)


@pytest.mark.parametrize("alpha,expect_inverted", [(0.0, False), (1.0, True)])
def test_the_teacher_term_decides_what_the_model_learns(tmp_path, encoder, alpha, expect_inverted):
    """A teacher contradicting gold: with kd_alpha 1 the model follows the teacher, with 0 the gold."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    table = labeled_table(48)
    train = make_artifact(tmp_path / "train", table, rows_per_shard=10, metadata=NAMES_MD)
    labels = make_artifact(tmp_path / "labels", logits_table(table, invert=True), metadata=NAMES_MD)
    inputs = {"data": [train]} | ({"labels": [labels]} if alpha else {})
    ctx = make_context(tmp_path, inputs=inputs)
    FinetuneStage(config=FinetuneConfig(base_model=str(encoder), epochs=4, lr=1e-2, batch_size=8, warmup=0.0,
                                        kd_alpha=alpha, num_cpus=1)).run(ctx)
    model_dir = ctx.out_dir / "model"
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        pred = model(**tok(POS + NEG, padding=True, return_tensors="pt")).logits.argmax(-1).tolist()
    gold = [1] * 6 + [0] * 6
    assert pred == ([1 - g for g in gold] if expect_inverted else gold)


def test_unlabelled_rows_and_other_label_orders_are_errors(tmp_path, encoder):
    table = labeled_table(16)
    train = make_artifact(tmp_path / "train", table, metadata=NAMES_MD)
    partial = make_artifact(tmp_path / "partial", logits_table(table.slice(0, 10), invert=False), metadata=NAMES_MD)
    stage = FinetuneStage(config=FinetuneConfig(base_model=str(encoder), epochs=1, kd_alpha=0.5, num_cpus=1))
    with pytest.raises(ValueError, match="6 of 16 training rows have no teacher logits"):
        stage.run(make_context(tmp_path, inputs={"data": [train], "labels": [partial]}, name="a"))
    swapped = make_artifact(tmp_path / "swapped", logits_table(table, invert=False),
                            metadata={"kdpipe.label_names": json.dumps(["positive", "negative"])})
    with pytest.raises(ValueError, match="label order"):
        stage.run(make_context(tmp_path, inputs={"data": [train], "labels": [swapped]}, name="b"))


def test_validation_pairs_kd_alpha_with_a_labels_input(encoder):
    cols = ["id", "text", "label"]
    without = FinetuneStage(config=FinetuneConfig(base_model=str(encoder), kd_alpha=0.5))
    assert [p.loc for p in without.validate(input_columns={"data": [cols]})] == ["config.kd_alpha"]
    unused = FinetuneStage(config=FinetuneConfig(base_model=str(encoder)))
    assert [p.loc for p in unused.validate(input_columns={"data": [cols], "labels": [["id", "logits"]]})] \
        == ["config.kd_alpha"]
    ensemble = FinetuneStage(config=FinetuneConfig(base_model=str(encoder), kd_alpha=0.5))
    assert [p.loc for p in ensemble.validate(input_columns={"data": [cols], "labels": [["id", "logits_a"]]})] \
        == ["inputs.labels"]


@pytest.mark.ray
@pytest.mark.slow
def test_born_again_manifest_runs_three_generations(tmp_path, sentiment_tsv, encoder, ray_session):
    from pipeline.artifact import Artifact
    from pipeline.graph import build_graph
    from pipeline.manifest import load_manifest
    from pipeline.runner import run_graph

    tiny = {"train": str(sentiment_tsv), "dev": str(sentiment_tsv), "base_model": str(encoder), "rows": "40",
            "dev_rows": "40", "epochs": "2", "batch_size": "8", "lr": "0.01", "cpus": "1"}
    manifest = load_manifest(REPO / "manifests" / "born-again.yaml", overrides=tiny)
    manifest.workdir = str(tmp_path / "wd")
    summary = run_graph(build_graph(manifest), progress=False, log=lambda *a: None)
    by_name = {s["name"]: s for s in summary}
    assert all(s["status"] == "ran" for s in summary), [(s["name"], s["status"]) for s in summary]
    # gen2 is taught by gen1's logits, gen1 by the teacher's; all three share one architecture
    for student, teacher in (("labels_teacher", "teacher"), ("labels_gen1", "gen1")):
        used = Artifact(by_name[student]["path"]).manifest["inputs"]["teacher"][0]["key"]
        assert used == Artifact(by_name[teacher]["path"]).key
    for gen, labels in (("gen1", "labels_teacher"), ("gen2", "labels_gen1")):  # each reads the labels it claims
        assert [i["key"] for i in Artifact(by_name[gen]["path"]).manifest["inputs"]["labels"]] == \
            [Artifact(by_name[labels]["path"]).key], gen
    configs = [json.loads((Path(by_name[g]["path"]) / "files" / "model" / "config.json").read_text())
               for g in ("teacher", "gen1", "gen2")]
    assert len({(c["model_type"], c["hidden_size"], c["num_hidden_layers"]) for c in configs}) == 1
    metrics = json.loads((Path(by_name["evaluate"]["path"]) / "files" / "metrics.json").read_text())
    assert {m["name"]: m["key"] for m in metrics["models"]} == \
        {g: Artifact(by_name[g]["path"]).key for g in ("teacher", "gen1", "gen2")}
    # every reported accuracy is that generation's saved model on the saved dev split, recomputed here
    from kd.students import load_student
    from stages.evaluate import model_dir

    assert metrics["data"] == Artifact(by_name["dev"]["path"]).key
    dev = Artifact(by_name["dev"]["path"]).read_table()
    texts, gold = dev["text"].to_pylist(), dev["label"].to_pylist()
    for m in metrics["models"]:
        model = load_student(model_dir(Path(by_name[m["name"]]["path"])))
        assert model.label_names == ["negative", "positive"]  # gold 0/1 index these names
        pred = model.predict(texts, batch_size=64, return_names=False)
        assert m["metrics"]["accuracy"] == pytest.approx(sum(int(p) == int(g) for p, g in zip(pred, gold)) / len(gold),
                                                         abs=1e-4), m["name"]
