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

from pipeline.stage import throughput_fields
from pipeline.testing import make_artifact, make_context
from stages.label import LabelConfig, LabelStage
from stages.teachers import length_batches

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


def test_throughput_knobs_stay_out_of_the_cache_key():
    assert {"device", "token_budget", "batch_size", "num_cpus", "num_gpus", "concurrency"} <= throughput_fields(LabelConfig)
    assert "dtype" not in throughput_fields(LabelConfig)  # fp16 vs fp32 changes the numbers


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


def test_greedy_seq2seq_reads_a_configured_column(tmp_path, models):
    table = _table().rename_columns(["id", "en", "de"])
    _, out = _run(tmp_path, table, task="seq2seq", teacher=str(models["s2s"]), text_column="en", num_beams=1,
                  max_new_tokens=5)
    assert out.column_names == ["id", "hyp_text", "hyp_ids", "hyp_scores"]
    assert all(len(h) == 1 and len(h[0]) <= 5 for h in out.column("hyp_ids").to_pylist())
    assert all(s[0] <= 0 for s in out.column("hyp_scores").to_pylist())


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
