"""Issue 13 (items 3, 4, 8): what a cached label artifact means is never mixed up.

* label order by name: a teacher whose id2label order differs from the data's label_names is
  permuted into the data's order (or refused at plan time when the names differ);
* teacher columns from inputs are named by run/stage, so two runs' teachers never collide;
* numerics: missing teacher logits (NaN) are masked, CNN pooling ignores padding, resume ignores
  throughput knobs, and training depends on the data's shard layout only (as documented).

Each test failed on 97763dc (see the report in the commit message / RELIABILITY.md).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from factories import DEFAULT_SENTENCES, tiny_bert_encoder
from pipeline.testing import make_artifact, make_context

POS, NEG = DEFAULT_SENTENCES[:6], DEFAULT_SENTENCES[6:12]


def labeled_table(n: int, offset: int = 0) -> pa.Table:
    rows = [(f"r{offset + i:04d}", f"{(POS if i % 2 else NEG)[(i // 2) % 6]}", i % 2) for i in range(n)]
    return pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows],
                     "label": pa.array([r[2] for r in rows], pa.int64())})


DATA_MD = {"kdpipe.label_names": json.dumps(["negative", "positive"])}


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_bert_encoder(tmp_path_factory.mktemp("enc"))


# --- item 8: numerics ---------------------------------------------------------------------------
def test_words_without_a_teacher_logit_are_masked_in_every_teacher_term():
    import torch

    from kd import losses

    student = torch.tensor([[1.0, -1.0, 0.5], [0.2, 0.3, -0.4], [2.0, 0.0, 1.0]])
    teacher = torch.tensor([[0.5, -0.5, 0.0], [math.nan] * 3, [1.0, 1.0, -1.0]])
    gold = torch.tensor([0, 2, -1])
    keep = torch.tensor([True, False, True])
    assert losses.logit_mse(student, teacher).item() == pytest.approx(
        losses.logit_mse(student[keep], teacher[keep]).item())
    assert losses.kl_at_temperature(student, teacher, 2.0).item() == pytest.approx(
        losses.kl_at_temperature(student[keep], teacher[keep], 2.0).item())
    # annealing: the row without a teacher logit follows its gold label alone
    targets = losses.annealed_targets(teacher, gold, 0.3)
    assert torch.isfinite(targets).all()
    assert targets[1].tolist() == [0.0, 0.0, 1.0]
    assert math.isfinite(losses.annealed_cross_entropy(student, teacher, gold, 0.3).item())
    # an ensemble: a word one teacher lacks takes the other teacher's logits
    other = torch.tensor([[1.5, -1.5, 0.0], [3.0, 0.0, -3.0], [0.0, 0.0, 0.0]])
    mean = losses.combine_teachers([teacher, other], mode="mean")
    assert mean[1].tolist() == [3.0, 0.0, -3.0]
    assert mean[0].tolist() == pytest.approx([1.0, -1.0, 0.0])
    weighted = losses.combine_teachers([teacher, other], mode="weighted", weights=[3.0, 1.0])
    assert weighted[1].tolist() == [3.0, 0.0, -3.0]
    total, parts = losses.distillation_loss(student, gold=gold, teacher=teacher, ce=1.0, mse=1.0, kl=1.0,
                                            temperature=2.0, anneal=True, progress=0.5)
    assert all(math.isfinite(v) for v in parts.values()) and math.isfinite(total.item())


def test_cnn_features_of_a_row_do_not_depend_on_the_padding_of_its_batch():
    import torch

    from kd.students.cnn import CNNClassifier
    from kd.students.common import WordVocab

    texts = ["a dull mess", "one of the best films of the year , i loved every minute of it", "joy"]
    vocab = WordVocab.build(texts, max_size=100)
    torch.manual_seed(0)
    cnn = CNNClassifier(tokenizer=vocab, num_labels=2, pair=False, max_length=64, embedding_dim=8,
                        num_filters=4, filter_sizes=[2, 3], dropout=0.0).eval()
    rows = cnn.tokenize_rows(texts, None)
    with torch.no_grad():
        together = cnn(**cnn.collate(rows))
        alone = torch.cat([cnn(**cnn.collate([r])) for r in rows])
    assert torch.allclose(together, alone, atol=1e-6), (together, alone)


def test_finetune_resumes_when_only_a_throughput_knob_changed(tmp_path, encoder):
    from stages.finetune import FinetuneConfig, FinetuneStage

    data = make_artifact(tmp_path / "train", labeled_table(24), rows_per_shard=10, metadata=DATA_MD)
    dev = make_artifact(tmp_path / "dev", labeled_table(8, offset=500), metadata=DATA_MD)
    ctx = make_context(tmp_path, inputs={"data": [data], "dev": [dev]}, name="ft")
    cfg = dict(base_model=str(encoder), epochs=1, lr=1e-2, batch_size=8, warmup=0.0, num_cpus=1)
    first = FinetuneStage(config=FinetuneConfig(**cfg, eval_batch_size=64)).run(ctx)
    assert first["resumed_from_epoch"] == 0
    again = FinetuneStage(config=FinetuneConfig(**cfg, eval_batch_size=3)).run(ctx)
    assert again["resumed_from_epoch"] == 1, "a changed eval_batch_size restarted training"
    assert again["dev_accuracy"] == first["dev_accuracy"]


def _train(tmp_path: Path, name: str, data, labels) -> bytes:
    from stages.train import TrainStage

    cfg = TrainStage.Config(student={"type": "bilstm", "embedding_dim": 16, "hidden_dim": 16, "mlp_dim": 16},
                            losses={"ce": 1.0, "mse": 1.0}, epochs=2, batch_size=4)
    ctx = make_context(tmp_path, inputs={"data": [data], "labels": [labels]}, name=name)
    TrainStage(config=cfg).run(ctx)
    return (ctx.out_dir / "student" / "model.safetensors").read_bytes()


def test_training_depends_on_the_data_shard_layout_only_as_documented(tmp_path):
    """Batches never cross data shards (documented), and the label artifact's own layout
    changes nothing: its rows are joined by id."""
    import stages.train

    table = labeled_table(30)
    data = make_artifact(tmp_path / "data", table, rows_per_shard=8, metadata=DATA_MD)
    rng = np.random.default_rng(0)
    logits = pa.array(rng.normal(size=(30, 2)).astype(np.float32).tolist(), pa.list_(pa.float32(), 2))
    md = {**DATA_MD, "kdpipe.task": "classification", "kdpipe.logit_columns": '["logits"]'}
    label_table = pa.table({"id": table["id"], "logits": logits})
    one = make_artifact(tmp_path / "labels1", label_table, metadata=md)
    many = make_artifact(tmp_path / "labels7", label_table.take(list(range(29, -1, -1))), rows_per_shard=7,
                         metadata=md)
    assert _train(tmp_path, "a", data, one) == _train(tmp_path, "b", data, many)
    other_layout = make_artifact(tmp_path / "data15", table, rows_per_shard=15, metadata=DATA_MD)
    assert _train(tmp_path, "c", other_layout, one) != _train(tmp_path, "d", data, one)
    doc = stages.train.__doc__
    assert "depend on the `data` artifact's\nshard layout" in doc and "neither on worker count nor on shard layout" not in doc


# --- item 3: label order by name -----------------------------------------------------------------
@pytest.fixture(scope="module")
def teachers(tmp_path_factory, encoder):
    """A fine-tuned tiny teacher in the data's order [negative, positive], and the same model
    saved with its labels reversed ({0: positive, 1: negative})."""
    from factories import relabelled_copy
    from stages.finetune import FinetuneConfig, FinetuneStage

    tmp = tmp_path_factory.mktemp("teachers")
    data = make_artifact(tmp / "train", labeled_table(48), rows_per_shard=10, metadata=DATA_MD)
    ctx = make_context(tmp, inputs={"data": [data]}, name="ft")
    FinetuneStage(config=FinetuneConfig(base_model=str(encoder), epochs=4, lr=1e-2, batch_size=8, warmup=0.0,
                                        num_cpus=1)).run(ctx)
    straight = ctx.out_dir / "model"
    return straight, relabelled_copy(straight, tmp / "reversed", [1, 0])


def _label(tmp_path: Path, name: str, data, teacher: Path, **cfg):
    from stages.label import LabelConfig, LabelStage

    stage = LabelStage(config=LabelConfig(teacher=str(teacher), **cfg))
    ctx = make_context(tmp_path, inputs={"data": [data]}, name=name)
    stage.setup(ctx)
    md = {f"kdpipe.{k}": v for k, v in stage.metadata().items()}
    out = pa.concat_tables([stage.process(t, ctx, shard_index=i) for i, t in enumerate(data.iter_shards())])
    return make_artifact(tmp_path / name, out, metadata=md), md


def _logits(art) -> np.ndarray:
    return np.array(art.read_table(columns=["logits"])["logits"].to_pylist(), dtype=np.float32)


def test_a_teacher_with_reversed_id2label_gives_kd_targets_in_the_data_order(tmp_path, teachers):
    """KD and CE targets agree, and every reported accuracy equals the one recomputed by name
    from the predictions (on 97763dc the KD targets were flipped against gold and the reported
    accuracies were 1 - the true ones)."""
    from pipeline.artifact import Artifact
    from stages.evaluate import EvaluateConfig, EvaluateStage
    from kd.students import load_student
    from stages.train import TrainStage
    from kd.train_data import ShardStream, label_sources, resolve_label_names

    straight, reversed_ = teachers
    table = labeled_table(40, offset=100)
    data = make_artifact(tmp_path / "data", table, rows_per_shard=16, metadata=DATA_MD)
    names = ["negative", "positive"]
    gold_names = [names[g] for g in table["label"].to_pylist()]
    texts = table["text"].to_pylist()
    seen: dict[str, object] = {}

    ref, _ = _label(tmp_path, "ref", data, straight)
    labels, md = _label(tmp_path, "rev", data, reversed_)
    seen["max |logit difference| vs the straight teacher"] = float(np.abs(_logits(ref) - _logits(labels)).max())
    seen["label metadata"] = {k: md.get(f"kdpipe.{k}") for k in ("label_names", "label_permutation",
                                                                 "teacher_label_names")}
    teacher_pred = load_student(reversed_).predict(texts)
    teacher_acc = float(np.mean([p == g for p, g in zip(teacher_pred, gold_names)]))
    assert teacher_acc >= 0.75, f"the fixture teacher should be good (accuracy {teacher_acc})"

    cfg = TrainStage.Config(student={"type": "bilstm", "embedding_dim": 16, "hidden_dim": 16, "mlp_dim": 16},
                            losses={"ce": 1.0, "mse": 1.0}, epochs=6, batch_size=8, lr=3e-3)
    sources = label_sources([labels])
    order = resolve_label_names(data, sources, "label")
    stream = ShardStream(data=data, sources=sources, label_names=order, cfg=cfg, use_gold_on_augmented=True)
    agree = []
    for i in range(data.num_shards()):
        shard = stream.load_shard(i, epoch=0, seed=0)
        agree += list(shard["teachers"][0].argmax(-1) == shard["gold"])
    seen["KD argmax == CE gold"] = float(np.mean(agree))
    seen["teacher accuracy by name"] = teacher_acc

    ctx = make_context(tmp_path, inputs={"data": [data], "labels": [labels]}, name="student")
    TrainStage(config=cfg).run(ctx)
    student = load_student(ctx.out_dir / "student")
    student_acc = float(np.mean([p == g for p, g in zip(student.predict(texts), gold_names)]))
    ev = make_context(tmp_path, inputs={"data": [data], "models": [Artifact(ctx.out_dir.parent)]}, name="eval")
    ev.out_dir.mkdir(parents=True)
    result = EvaluateStage(config=EvaluateConfig(teacher_model=str(reversed_), speed_rows=8)).run(ev)
    reported = {n: m["metrics"]["accuracy"] for n, m in result["models"].items()}
    seen["reported accuracy"] = reported
    seen["recomputed accuracy"] = {"reversed": round(teacher_acc, 4), "student-out": round(student_acc, 4)}

    assert seen["max |logit difference| vs the straight teacher"] < 1e-5, seen
    assert json.loads(md["kdpipe.label_names"]) == names, seen
    assert json.loads(md["kdpipe.label_permutation"]) == {"reversed": [1, 0]}, seen
    assert json.loads(md["kdpipe.teacher_label_names"]) == {"reversed": ["positive", "negative"]}, seen
    assert seen["KD argmax == CE gold"] == pytest.approx(teacher_acc), seen
    assert reported == seen["recomputed accuracy"], seen


def _manifest(tmp_path: Path, tsv: Path, teacher: Path, **label_cfg):
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest

    raw = {"name": "order", "workdir": str(tmp_path / "store"), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(tsv), "text_column": "sentence",
                                                    "label_column": "label", "label_names": ["negative", "positive"]}},
        {"name": "label", "type": "label", "inputs": {"data": "read"},
         "config": {"teacher": str(teacher), **label_cfg}}]}
    return build_graph(parse_manifest(raw))


def test_teacher_label_names_are_matched_with_the_data_at_plan_time(tmp_path, sentiment_tsv):
    from factories import tiny_bert_classifier
    from pipeline.errors import ManifestError

    other = tiny_bert_classifier(tmp_path / "other", label_names=["bad", "good"])
    with pytest.raises(ManifestError) as err:
        _manifest(tmp_path, sentiment_tsv, other)
    text = str(err.value)
    assert "['bad', 'good']" in text and "['negative', 'positive']" in text and "label_map" in text, text
    assert "stages[1].config.teacher" in text
    assert _manifest(tmp_path, sentiment_tsv, other, label_map={"bad": "negative", "good": "positive"})
    with pytest.raises(ManifestError, match="label_map names \\['god'\\]"):
        _manifest(tmp_path, sentiment_tsv, other, label_map={"god": "positive"})
    swapped = tiny_bert_classifier(tmp_path / "swapped", label_names=["positive", "negative"])
    assert _manifest(tmp_path, sentiment_tsv, swapped)  # same names, other order: permuted at run time
    placeholders = tiny_bert_classifier(tmp_path / "plain")  # LABEL_0, LABEL_1: positions
    assert _manifest(tmp_path, sentiment_tsv, placeholders)


def test_label_map_renames_teacher_labels_into_the_data_order(tmp_path):
    from factories import tiny_bert_classifier

    teacher = tiny_bert_classifier(tmp_path / "t", label_names=["POS", "NEG"])
    data = make_artifact(tmp_path / "data", labeled_table(6), metadata=DATA_MD)
    plain, _ = _label(tmp_path, "plain", make_artifact(tmp_path / "nonames", labeled_table(6)), teacher)
    mapped, md = _label(tmp_path, "mapped", data, teacher, label_map={"POS": "positive", "NEG": "negative"})
    assert np.allclose(_logits(mapped), _logits(plain)[:, [1, 0]])
    assert json.loads(md["kdpipe.label_names"]) == ["negative", "positive"]
    assert json.loads(md["kdpipe.teacher_label_names"]) == {"t": ["POS", "NEG"]}


# --- item 4: unique teacher columns --------------------------------------------------------------
def _finished_teacher(workdir: Path, run: str, stage: str, *, seed: int,
                      label_names: tuple[str, ...] = ("negative", "positive")) -> Path:
    """A finished checkpoint artifact of stage `stage` in run `run` (what a finetune stage
    leaves, label names in its summary), aliased as runs/<run>/<stage> in `workdir`."""
    from factories import tiny_bert_classifier

    model = tiny_bert_classifier(workdir.parent / f"src-{run}", label_names=label_names, seed=seed)
    files = {f"model/{p.relative_to(model)}": p.read_bytes() for p in model.rglob("*") if p.is_file()}
    art = make_artifact(workdir / "artifacts" / "finetune" / f"key{run}", files=files, type_key="finetune")
    manifest = {**art.manifest, "run": run, "stage_name": stage, "summary": {"label_names": list(label_names)}}
    art.manifest_path.write_text(json.dumps(manifest), encoding="utf-8")
    alias = workdir / "runs" / run / stage
    alias.parent.mkdir(parents=True, exist_ok=True)
    alias.symlink_to(art.path)
    return art.path


def _ensemble_graph(workdir: Path, tsv: Path, refs: list[str]):
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest

    raw = {"name": "ens", "workdir": str(workdir), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(tsv), "text_column": "sentence",
                                                    "label_column": "label", "label_names": ["negative", "positive"]}},
        {"name": "label", "type": "label", "inputs": {"data": "read", "teacher": refs}, "config": {}}]}
    return build_graph(parse_manifest(raw))


def test_same_stage_name_in_two_runs_gives_two_teacher_columns(tmp_path, sentiment_tsv):
    from pipeline.artifact import Artifact
    from pipeline.errors import ManifestError

    workdir = tmp_path / "store"
    arts = [_finished_teacher(workdir, "runA", "teacher", seed=1), _finished_teacher(workdir, "runB", "teacher", seed=2)]
    graph = _ensemble_graph(workdir, sentiment_tsv, ["@runA/teacher", "@runB/teacher"])
    stage = graph.nodes["label"].stage
    expected = ["id", "logits_runA__teacher", "logits_runB__teacher"]
    assert stage.output_columns(input_columns={"data": [["id", "text", "label"]], "teacher": [None, None]}) == expected
    assert json.loads(stage.fingerprint()["teacher input names"]) == ["runA__teacher", "runB__teacher"]

    data = make_artifact(tmp_path / "data", labeled_table(6), metadata=DATA_MD)
    ctx = make_context(tmp_path, inputs={"data": [data], "teacher": [Artifact(a) for a in arts]}, name="label")
    stage.setup(ctx)
    out = stage.process(data.read_table(), ctx, shard_index=0)
    assert out.column_names == expected
    assert json.loads(stage.metadata()["logit_columns"]) == expected[1:]
    a, b = (np.array(out[c].to_pylist()) for c in expected[1:])
    assert not np.allclose(a, b), "the two teachers' logits must both be there"

    with pytest.raises(ManifestError, match="would all write columns named '\\*_runA__teacher'"):
        _ensemble_graph(workdir, sentiment_tsv, ["@runA/teacher", "@runA/teacher"])


def test_a_teacher_from_another_run_is_matched_by_name_at_plan_time(tmp_path, sentiment_tsv):
    from pipeline.errors import ManifestError

    workdir = tmp_path / "store"
    _finished_teacher(workdir, "old", "teacher", seed=1, label_names=("bad", "good"))
    with pytest.raises(ManifestError) as err:
        _ensemble_graph(workdir, sentiment_tsv, ["@old/teacher"])
    text = str(err.value)
    assert "stages[1].inputs.teacher[0]" in text and "['bad', 'good']" in text and "label_map" in text, text


def test_train_puts_label_artifacts_of_another_order_into_the_data_order(tmp_path):
    from stages.train import TrainStage
    from kd.train_data import ShardStream, label_sources, resolve_label_names

    table = labeled_table(12)
    data = make_artifact(tmp_path / "data", table, rows_per_shard=5, metadata=DATA_MD)
    # a label artifact in the order [positive, negative] (e.g. made before labels were ordered by name)
    logits = [[2.0, -2.0] if y else [-2.0, 2.0] for y in table["label"].to_pylist()]
    md = {"kdpipe.task": "classification", "kdpipe.logit_columns": '["logits"]',
          "kdpipe.label_names": '["positive", "negative"]'}
    rev = make_artifact(tmp_path / "rev", pa.table({"id": table["id"], "logits": pa.array(
        logits, pa.list_(pa.float32(), 2))}), metadata=md)
    cfg = TrainStage.Config(losses={"ce": 1.0, "mse": 1.0})
    sources = label_sources([rev])
    names = resolve_label_names(data, sources, "label")
    assert names == ["negative", "positive"]
    stream = ShardStream(data=data, sources=sources, label_names=names, cfg=cfg, use_gold_on_augmented=True)
    for i in range(data.num_shards()):
        shard = stream.load_shard(i, epoch=0, seed=0)
        assert (shard["teachers"][0].argmax(-1) == shard["gold"]).all()
    other = make_artifact(tmp_path / "other", rev.read_table(), metadata={**md, "kdpipe.label_names": '["a", "b"]'})
    with pytest.raises(ValueError, match="relabel"):
        ShardStream(data=data, sources=label_sources([other]), label_names=names, cfg=cfg, use_gold_on_augmented=True)


# --- paths: a key holds the bytes a path names, not how the path is spelled ---------------------
def _keys(tmp_path: Path, tsv: str, teacher: str) -> dict[str, str]:
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.plan import make_plan

    raw = {"name": "paths", "workdir": str(tmp_path / "store"), "stages": [
        {"name": "read", "type": "read", "config": {"path": tsv, "text_column": "sentence",
                                                    "label_column": "label", "label_names": ["negative", "positive"]}},
        {"name": "label", "type": "label", "inputs": {"data": "read"}, "config": {"teachers": [
            {"name": "t", "path": teacher}]}}]}
    return {p.name: p.key for p in make_plan(build_graph(parse_manifest(raw)))}


def test_the_same_files_under_another_path_reuse_the_same_artifacts(tmp_path, sentiment_tsv, monkeypatch):
    """A manifest run from another directory, or on a node that mounts the data elsewhere, must
    not relabel everything: the key held the path as written (relative vs absolute gave two keys)."""
    import shutil

    from factories import tiny_bert_classifier

    teacher = tiny_bert_classifier(tmp_path / "models" / "teacher", label_names=["negative", "positive"])
    monkeypatch.chdir(tmp_path)
    base = _keys(tmp_path, str(sentiment_tsv), str(teacher))
    assert _keys(tmp_path, "sample.tsv", "models/teacher") == base  # relative spelling
    (tmp_path / "elsewhere").mkdir()
    shutil.copy(sentiment_tsv, tmp_path / "elsewhere" / "data.tsv")
    shutil.copytree(teacher, tmp_path / "elsewhere" / "teacher")
    assert _keys(tmp_path, "elsewhere/data.tsv", "elsewhere/teacher") == base  # same bytes, other place
    # ... while the bytes still decide: one changed row, or one changed weight file, is a new key
    (tmp_path / "elsewhere" / "data.tsv").write_text(sentiment_tsv.read_text().replace("terrific", "fine"))
    changed = _keys(tmp_path, "elsewhere/data.tsv", "elsewhere/teacher")
    assert changed["read"] != base["read"] and changed["label"] != base["label"]
    (tmp_path / "elsewhere" / "teacher" / "config.json").write_text(
        (teacher / "config.json").read_text().replace('"hidden_act"', '"layer_norm_eps": 1e-6, "hidden_act"', 1))
    assert _keys(tmp_path, "sample.tsv", "elsewhere/teacher")["label"] != base["label"]


def test_a_value_that_is_not_a_local_path_stays_in_the_key():
    from pipeline.stage import LOCATED, key_config
    from stages.finetune import FinetuneConfig
    from stages.read import ReadConfig

    assert key_config(FinetuneConfig(base_model="org/some-model", revision="abc123"))["base_model"] == "org/some-model"
    assert key_config(ReadConfig(path=__file__, format="text"))["path"] == LOCATED
