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

    from stages import losses

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

    from stages.students.cnn import CNNClassifier
    from stages.students.common import WordVocab

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
