"""The train stage and its students on tiny tables built with pyarrow (no Ray), plus spm."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from pipeline.testing import make_artifact, make_context
from kd.students import load_student
from stages.train import TrainStage

POS = ["a warm funny film", "the cast is terrific", "an absolute joy", "smart and beautiful"]
NEG = ["a dull mess", "the plot makes no sense", "painfully boring", "the worst acting"]
TINY_BERT = {"model_type": "bert", "hidden_size": 32, "num_hidden_layers": 1, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}
LABEL_MD = {"kdpipe.task": "classification", "kdpipe.label_names": '["neg", "pos"]',
            "kdpipe.logit_columns": '["logits"]'}


def corpus(n_repeat: int = 4):
    texts, labels = [], []
    for i in range(n_repeat):
        for j, t in enumerate(POS + NEG):
            texts.append(f"{t} {i}")
            labels.append(1 if j < len(POS) else 0)
    return [f"r{i:03d}" for i in range(len(texts))], texts, labels


def teacher_logits(labels, *, strength: float = 2.0):
    return [[-strength, strength] if y else [strength, -strength] for y in labels]


def label_artifact(path: Path, ids, logits, *, rows_per_shard: int, reverse: bool = True, md=LABEL_MD):
    order = list(range(len(ids)))[::-1] if reverse else list(range(len(ids)))
    table = pa.table({"id": [ids[i] for i in order],
                      "logits": pa.array([logits[i] for i in order], pa.list_(pa.float32(), 2))})
    return make_artifact(path, table, rows_per_shard=rows_per_shard, metadata=md)


def student_cfg(kind: str = "bilstm", **kw):
    base = {"student": {"type": kind, "embedding_dim": 32, "hidden_dim": 32, "mlp_dim": 32, "num_filters": 16,
                        "dropout": 0.1, **({"hf_config": TINY_BERT} if kind == "transformer" else {})},
            "epochs": 12, "lr": 3e-3 if kind != "transformer" else 1e-3, "batch_size": 8}
    base.update(kw)
    return TrainStage.Config(**base)


def metrics_of(ctx):
    return json.loads((ctx.out_dir / "metrics.json").read_text())


@pytest.fixture
def data_art(tmp_path):
    ids, texts, labels = corpus()
    return make_artifact(tmp_path / "data", pa.table({"id": ids, "text": texts, "label": labels}),
                         rows_per_shard=10, metadata={"kdpipe.label_names": '["neg", "pos"]'})


def is_png(path: Path) -> bool:
    import matplotlib.image

    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and matplotlib.image.imread(path).ndim == 3


@pytest.mark.slow
def test_bilstm_distils_from_unaligned_labels_and_round_trips(tmp_path, data_art):
    ids, texts, labels = corpus()
    # label shards laid out differently from the data shards (7 vs 10 rows, reversed): join by id
    labels_art = label_artifact(tmp_path / "labels", ids, teacher_logits(labels), rows_per_shard=7)
    ctx = make_context(tmp_path, inputs={"data": [data_art], "labels": [labels_art]}, name="kd")
    summary = TrainStage(config=student_cfg(losses={"ce": 0.0, "mse": 1.0, "kl": 1.0}, temperature=2.0)).run(ctx)
    history = metrics_of(ctx)["history"]
    assert history[-1]["loss"] < 0.5 * history[0]["loss"]
    assert summary["labels"] == [{"key": labels_art.key, "stage": None, "columns": ["logits"]}]
    student = load_student(ctx.out_dir.parent)  # the artifact directory resolves to files/student
    assert student.predict(texts) == [["neg", "pos"][y] for y in labels]
    assert student.num_parameters() == summary["parameters"]
    assert is_png(ctx.out_dir / "curves.png")
    # the saved directory alone reproduces the trained model's logits exactly
    again = load_student(ctx.out_dir / "student")
    np.testing.assert_array_equal(again.logits(texts), student.logits(texts))
    assert {p.name for p in (ctx.out_dir / "student").iterdir()} >= {"model.safetensors", "student.json", "vocab.txt"}


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["cnn", "transformer"])
def test_students_overfit_gold_labels(tmp_path, data_art, kind):
    _, texts, labels = corpus()
    ctx = make_context(tmp_path, inputs={"data": [data_art]}, name=kind)
    TrainStage(config=student_cfg(kind)).run(ctx)
    history = metrics_of(ctx)["history"]
    assert history[-1]["ce"] < 0.5 * history[0]["ce"]
    student = load_student(ctx.out_dir / "student")
    assert student.predict(texts, return_names=False) == labels
    assert load_student(ctx.out_dir / "student").predict(texts) == student.predict(texts)


@pytest.mark.slow
def test_siamese_pair_student(tmp_path):
    pairs = [("a man rides a horse", "a person rides an animal", 1), ("a man rides a horse", "the cat sleeps", 0),
             ("two dogs play", "dogs are playing", 1), ("two dogs play", "a woman reads", 0)] * 4
    table = pa.table({"id": [f"p{i}" for i in range(len(pairs))], "text": [p[0] for p in pairs],
                      "text_pair": [p[1] for p in pairs], "label": [p[2] for p in pairs]})
    data = make_artifact(tmp_path / "pairs", table, rows_per_shard=8)
    ctx = make_context(tmp_path, inputs={"data": [data]}, name="pair")
    TrainStage(config=student_cfg(student_pair_column="text_pair", epochs=15)).run(ctx)
    student = load_student(ctx.out_dir / "student")
    assert student.predict(table["text"].to_pylist(), table["text_pair"].to_pylist(),
                           return_names=False) == table["label"].to_pylist()
    with pytest.raises(ValueError, match="pairs"):
        student.predict(["a man rides a horse"])


def test_missing_teacher_labels_fail_loudly(tmp_path, data_art):
    ids, _, labels = corpus()
    partial = label_artifact(tmp_path / "labels", ids[:-3], teacher_logits(labels[:-3]), rows_per_shard=10,
                             reverse=False)
    ctx = make_context(tmp_path, inputs={"data": [data_art], "labels": [partial]})
    with pytest.raises(ValueError, match="no teacher labels"):
        TrainStage(config=student_cfg(losses={"ce": 0.0, "kl": 1.0}, epochs=1)).run(ctx)


def test_augmented_rows_use_only_the_teacher(tmp_path):
    from kd.train_data import ShardStream, label_sources

    ids, texts, labels = corpus(1)
    aug = [-1 if i % 2 == 0 else 0 for i in range(len(ids))]
    data = make_artifact(tmp_path / "aug", pa.table({"id": ids, "text": texts, "label": labels,
                                                      "aug_index": pa.array(aug, pa.int32())}))
    labels_art = label_artifact(tmp_path / "labels", ids, teacher_logits(labels), rows_per_shard=3)
    cfg = student_cfg(losses={"ce": 1.0, "kl": 1.0})
    stream = ShardStream(data=data, sources=label_sources([labels_art]), label_names=["neg", "pos"], cfg=cfg,
                         use_gold_on_augmented=False)
    shard = stream.load_shard(0, epoch=0, seed=1)
    by_text = dict(zip(shard["texts"], shard["gold"].tolist()))
    for t, y, a in zip(texts, labels, aug):
        assert by_text[t] == (y if a < 0 else -1)
    # the seeded order depends on ids, not on position: another epoch gives another order
    assert stream.load_shard(0, epoch=1, seed=1)["texts"] != shard["texts"]
    np.testing.assert_array_equal(shard["teachers"][0].argmax(-1)[shard["gold"] >= 0],
                                  shard["gold"][shard["gold"] >= 0])


@pytest.mark.slow
def test_resume_after_interruption_matches_uninterrupted_run(tmp_path, data_art):
    ids, texts, labels = corpus()
    labels_art = label_artifact(tmp_path / "labels", ids, teacher_logits(labels), rows_per_shard=10)
    cfg = student_cfg(losses={"ce": 1.0, "kl": 1.0}, anneal=True, epochs=3)
    inputs = {"data": [data_art], "labels": [labels_art]}

    class Interrupted(Exception):
        pass

    def stop_after_first(epoch: int) -> None:
        if epoch == 1:
            raise Interrupted

    ctx = make_context(tmp_path, inputs=inputs, name="interrupted")
    with pytest.raises(Interrupted):
        TrainStage(config=cfg).run(ctx, on_epoch_end=stop_after_first)
    state = json.loads((ctx.scratch_dir / "state.json").read_text())
    assert state["epoch"] == 1 and (ctx.scratch_dir / state["dir"] / "model.safetensors").is_file()
    resumed = TrainStage(config=cfg).run(ctx)
    assert resumed["resumed_from_epoch"] == 1 and resumed["epochs_run"] == 3

    whole = make_context(tmp_path, inputs=inputs, name="whole")
    TrainStage(config=cfg).run(whole)
    a, b = load_student(ctx.out_dir / "student"), load_student(whole.out_dir / "student")
    np.testing.assert_allclose(a.logits(texts), b.logits(texts), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_spm_tokenizer_artifact_feeds_a_student(tmp_path, data_art):
    from stages.spm import SpmStage

    _, texts, labels = corpus()
    spm_ctx = make_context(tmp_path, inputs={"data": [data_art]}, name="spm")
    spm_ctx.out_dir.mkdir(parents=True)
    spm_ctx.scratch_dir.mkdir(parents=True)
    summary = SpmStage(config=SpmStage.Config(vocab_size=60)).run(spm_ctx)
    assert 10 < summary["vocab_size"] <= 60
    spm_art = make_artifact(tmp_path / "spm-art", files={"spm.model": (spm_ctx.out_dir / "spm.model").read_bytes()})
    ctx = make_context(tmp_path, inputs={"data": [data_art], "tokenizer": [spm_art]}, name="spm-student")
    TrainStage(config=student_cfg(epochs=10)).run(ctx)
    student = load_student(ctx.out_dir / "student")
    assert json.loads((ctx.out_dir / "student" / "student.json").read_text())["tokenizer"]["kind"] == "spm"
    assert len(student.module.tokenizer) == summary["vocab_size"]
    assert student.predict(texts, return_names=False) == labels


def test_validate_reports_fixable_problems(data_art):
    stage = TrainStage(config=student_cfg("transformer", losses={"ce": 0.0, "kl": 1.0},
                                          student={"type": "transformer"}))
    problems = {p.loc: p.message for p in stage.validate(input_columns={"data": [["id", "sentence"]]})}
    assert "labels" in problems["inputs.labels"]
    assert "hf_config" in problems["config.student"]
    assert "'text' missing" in problems["inputs.data"]
    ok = TrainStage(config=student_cfg())
    assert ok.validate(input_columns={"data": [["id", "text", "label"]]}) == []


@pytest.mark.slow
def test_born_again_transformer_uses_the_teachers_architecture_and_tokenizer(tmp_path, data_art):
    from factories import tiny_bert_classifier
    from transformers import AutoConfig

    ids, texts, labels = corpus()
    teacher = tiny_bert_classifier(tmp_path / "teacher", label_names=["neg", "pos"], sentences=texts)
    labels_art = label_artifact(tmp_path / "labels", ids, teacher_logits(labels), rows_per_shard=10)
    cfg = student_cfg("transformer", student={"type": "transformer", "architecture_from": str(teacher)},
                      tokenizer={"kind": "hf", "path": str(teacher)}, losses={"ce": 0.0, "kl": 1.0}, epochs=8)
    assert TrainStage(config=cfg).validate(input_columns={"data": [["id", "text", "label"]],
                                                          "labels": [["id", "logits"]]}) == []
    assert set(TrainStage(config=cfg).fingerprint()) == {f"tokenizer {teacher}", f"architecture {teacher}"}
    ctx = make_context(tmp_path, inputs={"data": [data_art], "labels": [labels_art]}, name="born-again")
    TrainStage(config=cfg).run(ctx)
    student = load_student(ctx.out_dir / "student")
    same = AutoConfig.from_pretrained(str(ctx.out_dir / "student"))
    assert (same.hidden_size, same.num_hidden_layers) == (AutoConfig.from_pretrained(str(teacher)).hidden_size, 2)
    assert student.predict(texts, return_names=False) == labels


def test_teacher_ensemble_columns_and_artifacts_are_combined_by_weight(tmp_path, data_art):
    import torch

    from kd.train_data import ShardStream, label_sources

    ids, _, labels = corpus()
    a = np.array(teacher_logits(labels, strength=1.0), dtype=np.float32)
    two = pa.table({"id": ids, "logits_a": pa.array(a.tolist(), pa.list_(pa.float32(), 2)),
                    "logits_b": pa.array((3 * a).tolist(), pa.list_(pa.float16(), 2))})
    md = {**LABEL_MD, "kdpipe.logit_columns": '["logits_a", "logits_b"]'}
    ensemble_art = make_artifact(tmp_path / "ens", two, rows_per_shard=9, metadata=md)
    third = label_artifact(tmp_path / "third", ids, (5 * a).tolist(), rows_per_shard=40)
    sources = label_sources([ensemble_art, third])
    assert [s.columns for s in sources] == [["logits_a", "logits_b"], ["logits"]]
    cfg = student_cfg(losses={"ce": 0.0, "kl": 1.0}, ensemble={"mode": "weighted", "weights": [1, 1, 2]})
    stream = ShardStream(data=data_art, sources=sources, label_names=["neg", "pos"], cfg=cfg,
                         use_gold_on_augmented=False)
    from kd.students.common import WordVocab
    from stages.train import _student_module

    vocab = WordVocab.build(corpus()[1], max_size=100)
    module = _student_module("bilstm").create(meta={"num_labels": 2, "hyperparameters": {}}, tokenizer=vocab)
    seen = 0
    for _, gold, teacher in stream.batches(epoch=0, seed=0, module=module):
        # (1*a + 1*3a + 2*5a) / 4 = 3.5a, and a = +-1 towards the gold class
        expected = torch.where(gold.unsqueeze(-1) == 1, torch.tensor([-3.5, 3.5]), torch.tensor([3.5, -3.5]))
        torch.testing.assert_close(teacher, expected)
        seen += len(gold)
    assert seen == len(ids)


@pytest.mark.slow
def test_token_level_kd_trains_a_tagger_that_evaluate_scores(tmp_path):
    from stages.evaluate import EvaluateStage

    names = ["O", "B-PER", "B-LOC"]
    people, places = ["anna", "bob", "carla"], ["paris", "rome", "oslo"]
    words = [[p, "lives", "in", c] for p in people for c in places] + [["hello", p] for p in people]
    tags = [["B-PER", "O", "O", "B-LOC"] for _ in people for _ in places] + [["O", "B-PER"] for _ in people]
    ids = [f"t{i}" for i in range(len(words))]
    data = make_artifact(tmp_path / "data", pa.table({"id": ids, "words": words, "tags": tags}), rows_per_shard=5)
    # the teacher is confident and right, except that it calls "hello" a place: KD-only follows it
    logits = [[[4.0 if names[k] == (t if w != "hello" else "B-LOC") else 0.0 for k in range(3)]
               for w, t in zip(ws, ts)] for ws, ts in zip(words, tags)]
    token_type = pa.list_(pa.list_(pa.float32(), 3))
    md = {"kdpipe.task": "token_classification", "kdpipe.label_names": json.dumps(names)}
    labels_art = make_artifact(tmp_path / "labels", pa.table({"id": ids[::-1], "words": words[::-1],
                                                              "token_logits": pa.array(logits[::-1], token_type)}),
                               rows_per_shard=4, metadata=md)
    cfg = student_cfg(task="token_classification", student_column="words", label_column="tags",
                      losses={"ce": 0.0, "kl": 1.0}, epochs=25, lr=0.01)
    assert TrainStage(config=cfg).validate(input_columns={"data": [["id", "words", "tags"]],
                                                          "labels": [None]}) == []
    ctx = make_context(tmp_path, inputs={"data": [data], "labels": [labels_art]}, name="tagger")
    TrainStage(config=cfg).run(ctx)
    tagger = load_student(ctx.out_dir / "student")
    assert tagger.task == "token_classification"
    expected = [["B-LOC" if w == "hello" else t for w, t in zip(ws, ts)] for ws, ts in zip(words, tags)]
    assert tagger.predict(words) == expected
    assert tagger.predict(["anna lives in rome"]) == [["B-PER", "O", "O", "B-LOC"]]

    ev_ctx = make_context(tmp_path, inputs={"data": [data], "models": [make_artifact(tmp_path / "art")]}, name="ev")
    (tmp_path / "art" / "files").mkdir(exist_ok=True)
    import shutil

    shutil.copytree(ctx.out_dir / "student", tmp_path / "art" / "files" / "student")
    ev_ctx.out_dir.mkdir(parents=True)
    summary = EvaluateStage(config=EvaluateStage.Config(text_column="words", label_column="tags", speed_rows=8)).run(ev_ctx)
    # gold has 3*3*2 + 3 = 21 entity tokens; 3 "hello" tokens are wrongly tagged B-LOC (fp)
    assert summary["models"]["art"]["metrics"]["token_f1"] == pytest.approx(2 * 21 / (2 * 21 + 3), abs=1e-4)


def _model_artifact(path: Path, model_dir: Path):
    """A finetune-like artifact holding `model_dir` as files/model/."""
    return make_artifact(path, files={f"model/{f.name}": f.read_bytes() for f in model_dir.iterdir() if f.is_file()})


@pytest.mark.slow
def test_a_student_initialised_from_the_teacher_keeps_the_chosen_layers_and_its_function(tmp_path):
    import torch

    from factories import tiny_bert_classifier
    from kd.students.common import HFTokenizer
    from kd.students.transformer import TransformerClassifier
    from transformers import AutoModelForSequenceClassification

    _, texts, _ = corpus()
    teacher_dir = tiny_bert_classifier(tmp_path / "teacher", label_names=["neg", "pos"], sentences=texts)
    teacher = AutoModelForSequenceClassification.from_pretrained(str(teacher_dir)).eval()
    tok = HFTokenizer(teacher_dir)
    meta = {"num_labels": 2, "label_names": ["neg", "pos"], "max_length": 64}
    whole, copied = TransformerClassifier.from_teacher(teacher_dir, layers=None, meta=meta, tokenizer=tok)
    assert copied == {"layers": [0, 1], "of": 2, "head": "teacher's"}
    batch = whole.collate(whole.tokenize_rows(texts, None))
    with torch.no_grad():  # all layers and the head: the teacher's function exactly
        assert torch.allclose(whole.eval()(**batch), teacher(**batch).logits, atol=1e-6)
    upper, copied = TransformerClassifier.from_teacher(teacher_dir, layers=[1], meta=meta, tokenizer=tok)
    assert upper.config.num_hidden_layers == 1 and copied["layers"] == [1]
    assert torch.equal(upper.model.bert.encoder.layer[0].output.dense.weight,
                       teacher.bert.encoder.layer[1].output.dense.weight)
    assert torch.equal(upper.model.bert.embeddings.word_embeddings.weight, teacher.bert.embeddings.word_embeddings.weight)
    swapped, copied = TransformerClassifier.from_teacher(teacher_dir, layers=[0], meta={**meta, "label_names": ["pos", "neg"]},
                                                         tokenizer=tok)
    assert copied["head"] == "fresh"  # the teacher's head orders the labels otherwise: not copied
    assert not torch.equal(swapped.model.classifier.weight, teacher.classifier.weight)
    with pytest.raises(ValueError, match=r"layers 0\.\.1"):
        TransformerClassifier.from_teacher(teacher_dir, layers=[0, 2], meta=meta, tokenizer=tok)


@pytest.mark.slow
def test_train_initialises_a_transformer_student_from_an_init_artifact(tmp_path, data_art):
    from factories import tiny_bert_classifier
    from transformers import AutoConfig

    ids, texts, labels = corpus()
    teacher_dir = tiny_bert_classifier(tmp_path / "teacher", label_names=["neg", "pos"], sentences=texts)
    init_art = _model_artifact(tmp_path / "init", teacher_dir)
    labels_art = label_artifact(tmp_path / "labels", ids, teacher_logits(labels), rows_per_shard=10)
    cfg = TrainStage.Config(student={"type": "transformer", "init_layers": [1]}, losses={"ce": 0.0, "mse": 1.0},
                            epochs=8, lr=1e-3, batch_size=8)
    columns = {"data": [["id", "text", "label"]], "labels": [["id", "logits"]], "init": [None]}
    assert TrainStage(config=cfg).validate(input_columns=columns) == []
    ctx = make_context(tmp_path, inputs={"data": [data_art], "labels": [labels_art], "init": [init_art]}, name="init")
    TrainStage(config=cfg).run(ctx)
    assert metrics_of(ctx)["initialised_from"] == {"layers": [1], "of": 2, "head": "teacher's"}
    assert AutoConfig.from_pretrained(str(ctx.out_dir / "student")).num_hidden_layers == 1
    student = load_student(ctx.out_dir / "student")  # self-contained: the teacher's tokenizer went with it
    assert student.meta["tokenizer"]["kind"] == "hf"
    assert student.predict(texts, return_names=False) == labels


def test_validate_names_what_an_init_input_cannot_go_with():
    columns = {"data": [["id", "text", "label"]], "labels": [["id", "logits"]], "init": [None]}

    def problems(**cfg):
        base = {"losses": {"ce": 0.0, "mse": 1.0}}
        return {p.loc: p.message for p in TrainStage(config=TrainStage.Config(**{**base, **cfg})).validate(
            input_columns=columns)}

    assert "transformer" in problems(student={"type": "bilstm"})["inputs.init"]
    assert "hf_config" in problems(student={"type": "transformer", "hf_config": {"hidden_size": 8}})["config.student"]
    assert "tokenizer" in problems(student={"type": "transformer"}, tokenizer={"kind": "word"})["config.tokenizer"]
    assert "distinct" in problems(student={"type": "transformer", "init_layers": [1, 1]})["config.student.init_layers"]
    assert problems(student={"type": "transformer", "init_layers": [0, 2]}) == {}
    no_init = {p.loc: p.message for p in TrainStage(config=TrainStage.Config(
        student={"type": "transformer", "hf_config": {"hidden_size": 8}, "init_layers": [0]})).validate(
        input_columns={"data": [["id", "text", "label"]]})}
    assert "init" in no_init["config.student.init_layers"]


@pytest.mark.parametrize("grouped", [False, True])
def test_batches_keep_rows_their_labels_and_group_by_length_pads_less(tmp_path, grouped):
    rng = np.random.default_rng(0)
    n = 600
    words = [int(k) for k in rng.integers(1, 40, size=n)]
    ids = [f"r{i:04d}" for i in range(n)]
    texts = [" ".join(f"w{j}" for j in range(k)) for k in words]
    data = make_artifact(tmp_path / "data", pa.table({"id": ids, "text": texts, "label": [k % 2 for k in words]}),
                         rows_per_shard=250, metadata={"kdpipe.label_names": '["neg", "pos"]'})
    # The teacher's first logit is the row's word count, so each batch shows whether its rows kept their labels.
    labels = label_artifact(tmp_path / "labels", ids, [[float(k), 0.0] for k in words], rows_per_shard=300)
    cfg = student_cfg(losses={"ce": 0.0, "mse": 1.0}, batch_size=16, group_by_length=grouped)
    job = TrainStage(config=cfg)._prepare(make_context(tmp_path, inputs={"data": [data], "labels": [labels]}), seed=0)
    batches = list(job["stream"].batches(epoch=1, seed=0, module=job["module"]))
    assert len(batches) == job["stream"].batches_per_epoch()
    seen = []
    for batch, gold, teacher in batches:
        assert batch["lengths"].tolist() == teacher[:, 0].long().tolist()
        assert gold.tolist() == [k % 2 for k in batch["lengths"].tolist()]
        seen += batch["lengths"].tolist()
    assert sorted(seen) == sorted(words)
    padded = sum(b["ids"].numel() for b, _, _ in batches)
    if grouped:
        assert padded < 1.1 * sum(words)  # sorted within windows: nearly no padding
        again = list(job["stream"].batches(epoch=1, seed=0, module=job["module"]))
        assert [b["ids"].tolist() for b, _, _ in again] == [b["ids"].tolist() for b, _, _ in batches]
    else:
        assert padded > 1.5 * sum(words)  # random batches of 1..39-word rows
