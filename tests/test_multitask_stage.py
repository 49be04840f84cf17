"""train_multitask (shared encoder, per-task heads, TaskSampler, MT-DNN soft targets, BAM!
annealing, adversarial imitation) and pair_detection, on tiny tables without Ray."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest

from pipeline.testing import make_artifact, make_context
from stages.pair_detection import LABEL_NAMES, PairDetectionStage, detection_rows
from stages.train_multitask import TrainMultitaskStage

POS = ["a warm funny film", "the cast is terrific", "an absolute joy", "smart and beautiful", "i loved it"]
NEG = ["a dull lifeless mess", "the plot makes no sense", "painfully boring", "the worst acting", "a waste"]
EN = ["a dog runs", "a man sings", "two kids play", "a woman reads a book", "the cat sleeps", "a boy jumps high",
      "people walk", "a girl smiles at the camera"]
DE = ["ein hund rennt", "ein mann singt", "zwei kinder spielen", "eine frau liest ein buch", "die katze schläft",
      "ein junge springt hoch", "leute gehen", "ein mädchen lächelt in die kamera"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def sentiment(n: int, prefix: str = "s") -> pa.Table:
    return pa.table({"id": [f"{prefix}{i:04d}" for i in range(n)],
                     "text": [(POS if i % 2 else NEG)[(i // 2) % 5] for i in range(n)],
                     "label": pa.array([i % 2 for i in range(n)], pa.int64())})


def parallel(n: int) -> pa.Table:
    return pa.table({"id": [f"p{i:04d}" for i in range(n)], "text": [EN[i % 8] for i in range(n)],
                     "de": [DE[i % 8] for i in range(n)]})


def logits_for(table: pa.Table, *, invert: bool) -> pa.Table:
    rows = [[3.0, -3.0] if (g == 1) == invert else [-3.0, 3.0] for g in table["label"].to_pylist()]
    return pa.table({"id": table["id"], "logits": pa.array(rows, pa.list_(pa.float32(), 2))})


MD = {"kdpipe.label_names": json.dumps(["negative", "positive"])}


# --- pair_detection ------------------------------------------------------------------------------

def test_pair_detection_keeps_every_row_and_swaps_negatives_with_length_neighbours():
    table = parallel(200)
    ids, en, de = table["id"].to_pylist(), table["text"].to_pylist(), table["de"].to_pylist()
    rows = detection_rows(ids, en, de, seed=0, fraction=0.5)
    assert sorted(r["id"] for r in rows) == sorted(ids)
    by_id = dict(zip(ids, de))
    positives = [r for r in rows if r["label"] == 1]
    negatives = [r for r in rows if r["label"] == 0]
    assert 0.35 < len(positives) / len(rows) < 0.65
    assert all(r["text_pair"] == by_id[r["id"]] for r in positives)
    assert all(r["pair_source_id"] != r["id"] and r["text_pair"] == by_id[r["pair_source_id"]] for r in negatives)
    # every negative translation is used once (a permutation), and lengths stay close
    assert sorted(r["pair_source_id"] for r in negatives) == sorted(r["id"] for r in negatives)
    gaps = sorted(abs(len(r["text_pair"]) - len(by_id[r["id"]])) for r in negatives)
    assert gaps[len(gaps) // 2] <= 4
    assert rows == detection_rows(ids[::-1], en[::-1], de[::-1], seed=0, fraction=0.5)  # order-free


def test_pair_detection_stage_writes_labelled_pairs():
    stage = PairDetectionStage(config=PairDetectionStage.Config())
    out = stage.process(parallel(40), None, shard_index=0)
    assert out.column_names == ["id", "text", "text_pair", "label", "pair_source_id"]
    assert json.loads(stage.metadata()["label_names"]) == LABEL_NAMES
    assert stage.validate(input_columns={"data": [["id", "text"]]})[0].loc == "config.target_column"


# --- train_multitask ------------------------------------------------------------------------------

def _run(tmp_path, tasks, *, name="mt", extra=None, **cfg):
    """tasks: name -> (train table, dev table, [label tables], task spec extras)."""
    inputs = {"data": [], "labels": [], "dev": []}
    refs = {"data": [], "labels": [], "dev": []}
    specs = []
    for task, (train, dev, labels, spec) in tasks.items():
        md = MD if "label_names" not in spec else {}
        inputs["data"].append(make_artifact(tmp_path / f"{name}-{task}-data", train, rows_per_shard=50, metadata=md))
        refs["data"].append(f"{task}_data")
        inputs["dev"].append(make_artifact(tmp_path / f"{name}-{task}-dev", dev, metadata=md))
        refs["dev"].append(f"{task}_dev")
        label_refs = []
        for k, table in enumerate(labels):
            inputs["labels"].append(make_artifact(tmp_path / f"{name}-{task}-l{k}", table, metadata=md))
            refs["labels"].append(f"{task}_labels{k}")
            label_refs.append(f"{task}_labels{k}")
        specs.append({"name": task, "data": f"{task}_data", "dev": f"{task}_dev", "labels": label_refs,
                      **{k: v for k, v in spec.items() if k != "label_names"}})
    config = TrainMultitaskStage.Config(tasks=specs, encoder={"embedding_dim": 16, "hidden_dim": 16, "mlp_dim": 16},
                                        batch_size=8, lr=1e-2, **cfg)
    stage = TrainMultitaskStage(config=config, input_refs=refs)
    ctx = make_context(tmp_path, inputs=inputs, name=name)
    summary = stage.run(ctx)
    return summary, json.loads((ctx.out_dir / "metrics.json").read_text())


def pair_task(n: int, prefix: str) -> pa.Table:
    rows = detection_rows([f"{prefix}{i:04d}" for i in range(n)], [EN[i % 8] for i in range(n)],
                          [DE[(i * 3) % 8] if i % 5 == 0 else DE[i % 8] for i in range(n)], seed=0, fraction=0.5)
    return pa.table({"id": [r["id"] for r in rows], "text": [r["text"] for r in rows],
                     "text_pair": [r["text_pair"] for r in rows], "label": pa.array([r["label"] for r in rows], pa.int64())})


def test_two_tasks_share_an_encoder_and_steps_follow_size_to_the_075(tmp_path):
    sst, pairs = sentiment(160), pair_task(40, "q")
    summary, metrics = _run(tmp_path, {
        "sst": (sst, sentiment(20, "d"), [logits_for(sst, invert=False)], {}),
        "pairs": (pairs, pair_task(20, "e"), [], {"pair_column": "text_pair", "label_names": 1})},
        epochs=6)
    tasks = metrics["tasks"]
    expected = 160 ** 0.75 / (160 ** 0.75 + 40 ** 0.75)
    assert tasks["sst"]["sampling_probability"] == pytest.approx(expected, abs=1e-3)
    share = tasks["sst"]["steps"] / metrics["steps"]
    assert abs(share - expected) < 0.1
    assert metrics["steps"] == round(6 * (20 + 5))
    assert tasks["sst"]["dev_accuracy"] == 1.0  # separable word by word


@pytest.mark.parametrize("spec,follows", [({"gold_weight": 0.0}, "teacher"), ({"gold_weight": 1.0}, "gold"),
                                          ({"anneal": True, "anneal_end": 0.05}, "gold")])
def test_gold_weight_and_annealing_decide_between_teacher_and_gold(tmp_path, spec, follows):
    """A teacher that contradicts gold everywhere: MT-DNN's mix at gold weight 0 learns the
    teacher, at 1 the gold; BAM! annealing that reaches gold after 5% of training ends on gold."""
    sst = sentiment(80)
    dev = sentiment(20, "d")
    _, metrics = _run(tmp_path, {"sst": (sst, dev, [logits_for(sst, invert=True)], spec)}, epochs=6)
    acc = metrics["tasks"]["sst"]["dev_accuracy"]
    assert (acc == 0.0) if follows == "teacher" else (acc == 1.0)


def test_an_ensemble_target_is_the_mean_of_the_teachers_probabilities(tmp_path):
    """Two teachers that disagree on every row: their mean is uniform, so at gold weight 0 the
    student learns nothing decisive; one teacher agreeing twice as strongly wins."""
    sst = sentiment(80)
    right, wrong = logits_for(sst, invert=False), logits_for(sst, invert=True)
    _, metrics = _run(tmp_path, {"sst": (sst, sentiment(20, "d"), [right, right, wrong], {"gold_weight": 0.0})},
                      epochs=6)
    assert metrics["tasks"]["sst"]["teachers"] == 3
    assert metrics["tasks"]["sst"]["dev_accuracy"] == 1.0


def test_inputs_named_by_tasks_must_be_given():
    config = TrainMultitaskStage.Config(tasks=[{"name": "sst", "data": "sst_data", "labels": ["nowhere"]}])
    stage = TrainMultitaskStage(config=config, input_refs={"data": ["sst_data"], "labels": ["labels_sst"]})
    problems = stage.validate(input_columns={"data": [["id", "text", "label"]], "labels": [["id", "logits"]]})
    assert [p.loc for p in problems] == ["config.tasks[0].labels"]
    missing_col = TrainMultitaskStage(config=TrainMultitaskStage.Config(
        tasks=[{"name": "p", "data": "d", "pair_column": "text_pair"}]), input_refs={"data": ["d"]})
    assert [p.loc for p in missing_col.validate(input_columns={"data": [["id", "text", "label"]]})] == ["config.tasks[0]"]
    with pytest.raises(ValueError, match="adversarial.task"):
        TrainMultitaskStage.Config(tasks=[{"name": "a", "data": "d"}], adversarial={"task": "b"})


def test_adversarial_imitation_drives_the_discriminator_towards_chance(tmp_path):
    """Teacher distributions are confident and the student's start near uniform, so the
    discriminator soon tells them apart; as the student imitates the teacher (KD plus the
    reversed discriminator gradient) its accuracy falls back to chance."""
    sst = sentiment(160)
    _, metrics = _run(tmp_path, {"sst": (sst, sentiment(20, "d"), [logits_for(sst, invert=False)],
                                         {"gold_weight": 0.0})},
                      epochs=8, adversarial={"task": "sst", "weight": 1.0, "lr": 3e-2})
    curve = [accuracy for _, accuracy in metrics["discriminator_curve"]]
    assert len(curve) == metrics["tasks"]["sst"]["steps"] == 160
    windows = [sum(curve[i:i + 8]) / 8 for i in range(0, len(curve), 8)]
    peak = max(windows[: len(windows) // 4])
    last = metrics["discriminator_accuracy_last"]  # the last 10% of the steps
    assert peak >= 0.8
    assert abs(last - 0.5) <= 0.1 and last < peak - 0.3
    assert metrics["tasks"]["sst"]["dev_accuracy"] == 1.0


def test_a_rerun_resumes_from_the_finished_checkpoint_to_the_same_weights(tmp_path):
    """The loop is kd.training's: a second run of the same stage and scratch resumes (here from
    the last epoch) and saves the same student, discriminator included in the checkpoint."""
    from safetensors.torch import load_file

    sst = sentiment(40)
    tasks = {"sst": (sst, sentiment(10, "d"), [logits_for(sst, invert=False)], {"anneal": True})}
    kwargs = dict(epochs=2, adversarial={"task": "sst", "weight": 0.5})
    _, first = _run(tmp_path, tasks, **kwargs)
    weights = load_file(str(tmp_path / "mt-out" / "files" / "student" / "model.safetensors"))
    _, again = _run(tmp_path, tasks, **kwargs)
    assert first["resumed_from"] is None and again["resumed_from"] == {"step": first["steps"], "epoch": 2}
    resumed = load_file(str(tmp_path / "mt-out" / "files" / "student" / "model.safetensors"))
    assert weights.keys() == resumed.keys() and all((weights[k] == resumed[k]).all() for k in weights)
    assert again["tasks"] == first["tasks"]


# --- the manifests ----------------------------------------------------------------------------

REPO = __import__("pathlib").Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("manifest", ["multitask.yaml", "adversarial.yaml"])
def test_manifests_plan(manifest, tmp_path, sentiment_tsv):
    from pipeline.graph import build_graph
    from pipeline.manifest import load_manifest

    # Tiny files laid out like shared/data (SST-2 TSVs, Multi30k line-aligned text).
    multi30k = tmp_path / "multi30k"
    multi30k.mkdir()
    for split in ("train", "val"):
        (multi30k / f"{split}.en").write_text("a dog runs .\na cat sleeps .\n", encoding="utf-8")
        (multi30k / f"{split}.de").write_text("ein hund rennt .\neine katze schläft .\n", encoding="utf-8")
    overrides = {"sst2_train": str(sentiment_tsv), "sst2_dev": str(sentiment_tsv)}
    if manifest == "multitask.yaml":
        overrides["multi30k"] = str(multi30k)
    # every stage, input and column validated
    build_graph(load_manifest(REPO / "manifests" / manifest, overrides=overrides))


def test_a_task_naming_a_stage_missing_from_inputs_fails_the_plan():
    import yaml

    from pipeline.errors import ManifestError
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest

    raw = yaml.safe_load((REPO / "manifests" / "multitask.yaml").read_text())
    student = next(s for s in raw["stages"] if s["name"] == "st_gold_pairs")
    student["inputs"] = {"data": ["pairs"], "dev": ["sst2_dev"]}  # pairs_dev left out
    with pytest.raises(ManifestError) as err:
        build_graph(parse_manifest(raw))
    assert "tasks[0].dev" in str(err.value) and "pairs_dev" in str(err.value)
