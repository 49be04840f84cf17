"""`lm_generate`: a tiny random GPT-2 (padded vocab) completes prompts; train_lm learns the text."""
from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pytest
import torch

from factories import DEFAULT_SENTENCES, tiny_causal_lm
from pipeline.testing import make_artifact, make_context
from stages.lm_generate import LmGenerateStage
from stages.train_lm import TrainLmStage

DOCS = pa.table({"id": [f"d{i}" for i in range(6)], "text": DEFAULT_SENTENCES[:5] + [""]})


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("lmg") / "teacher")


def _stage(teacher: Path, **config) -> LmGenerateStage:
    stage = LmGenerateStage(config=LmGenerateStage.Config(teacher=str(teacher), max_length=32, **config))
    assert stage.validate(input_columns={"data": [["id", "text"]]}) == []
    return stage


def _generate(tmp_path: Path, stage: LmGenerateStage, table: pa.Table = DOCS, seed: int = 3) -> pa.Table:
    ctx = make_context(tmp_path, seed=seed, name=f"gen{seed}")
    stage.setup(ctx)
    return stage.process(table, ctx, shard_index=0)


def test_sampled_completions_are_seeded_per_document_and_never_use_padded_ids(tmp_path, teacher):
    from kd.lm.text import document_ids

    # A hot temperature spreads the mass over every id: padded rows would be drawn if not suppressed.
    stage = _stage(teacher, prompt_tokens=3, max_new_tokens=12, num_samples=8, temperature=8.0)
    out = _generate(tmp_path, stage)
    assert stage.model_vocab > len(stage.tok)
    assert out.num_rows == 5 * 8 and "d5" not in out.column("doc_id").to_pylist()  # empty document skipped
    assert out.column_names == stage.output_columns(input_columns={})
    rows = out.to_pylist()
    generated = [t for r in rows for t in r["input_ids"][r["target_start"] + 1:]]
    assert len(generated) > 200 and max(generated) < len(stage.tok)
    eos = stage.tok.eos_token_id
    for r in rows:
        prompt = document_ids(stage.tok, DOCS.column("text")[int(r["doc_id"][1:])].as_py())[:4]
        assert r["input_ids"][:4] == prompt and r["target_start"] == 3
        completion = r["input_ids"][4:]
        assert completion[-1] == eos or len(completion) == 12
        assert eos not in completion[:-1]
    # Same seed: the same completions, whatever the shard split (a resumed or re-sharded run).
    halves = [_generate(tmp_path / "a", stage, DOCS.slice(0, 2)), _generate(tmp_path / "b", stage, DOCS.slice(2))]
    assert pa.concat_tables(halves).equals(out)
    assert not _generate(tmp_path / "c", stage, seed=4).column("input_ids").equals(out.column("input_ids"))
    # A document's samples differ from one another (one draw per row, not one per document).
    assert len({tuple(r["input_ids"]) for r in rows if r["doc_id"] == "d0"}) > 1


def test_beam_of_width_one_is_the_teachers_greedy_continuation(tmp_path, teacher):
    from kd.lm.text import document_ids

    stage = _stage(teacher, strategy="beam", num_beams=1, max_new_tokens=10, targets="all")
    out = _generate(tmp_path, stage)
    model, vocab = stage.model, len(stage.tok)
    for r in out.to_pylist():
        assert r["target_start"] == 0
        ids = list(r["input_ids"])
        prompt = document_ids(stage.tok, DOCS.column("text")[int(r["doc_id"][1:])].as_py())[:-1]  # no eos
        prompt_len = len(prompt)
        assert ids[:prompt_len] == prompt and len(ids) > prompt_len
        seq = ids[:prompt_len]
        with torch.no_grad():
            for _ in range(len(ids) - prompt_len):
                logits = model(input_ids=torch.tensor([seq])).logits[0, -1, :vocab]
                seq.append(int(logits.argmax()))
        assert seq == ids
    again = _generate(tmp_path / "again", stage, seed=99)  # beam search uses no seed
    assert again.equals(out)


def test_bad_generation_configs_are_rejected_before_running(teacher):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="max_new_tokens"):
        LmGenerateStage.Config(teacher=str(teacher), max_length=16, max_new_tokens=15)
    with pytest.raises(ValidationError, match="prompt_tokens"):
        LmGenerateStage.Config(teacher=str(teacher), max_length=16, max_new_tokens=8, prompt_tokens=8)
    with pytest.raises(ValidationError, match="num_beams"):
        LmGenerateStage.Config(teacher=str(teacher), strategy="beam", num_beams=2, num_samples=3)
    stage = LmGenerateStage(config=LmGenerateStage.Config(max_length=16, max_new_tokens=4))
    assert "no teacher" in stage.validate(input_columns={"data": [["id", "text"]]})[0].message


def test_train_lm_learns_generated_text_with_cross_entropy_only(tmp_path, teacher):
    stage = _stage(teacher, prompt_tokens=2, max_new_tokens=8, num_samples=4)
    out = _generate(tmp_path, stage)
    art = make_artifact(tmp_path / "gen-art", out, rows_per_shard=8,
                        metadata={f"kdpipe.{k}": v for k, v in stage.metadata().items()})
    facts = stage.output_facts(input_facts={})
    assert facts.get("lm_mode") == "text" and facts.get("lm_vocab")
    kd_stage = TrainLmStage(config=TrainLmStage.Config(tokenizer=str(teacher), kd={"alpha": 0.5}))
    assert [p.loc for p in kd_stage.validate_facts(input_facts={"data": [facts]})] == ["config.kd.alpha"]
    ce = TrainLmStage(config=TrainLmStage.Config(
        tokenizer=str(teacher), kd={"alpha": 0.0}, student={"d_model": 16, "layers": 1, "heads": 2,
                                                             "max_positions": 32},
        train={"epochs": 2, "batch_size": 4, "warmup_steps": 1}, eval_max_length=32))
    assert ce.validate_facts(input_facts={"data": [facts]}) == []
    heldout = make_artifact(tmp_path / "held", pa.table({"id": ["h"], "text": ["a cat reads a book"]}))
    ctx = make_context(tmp_path, inputs={"data": [art], "heldout": [heldout]}, name="student", seed=0)
    summary = ce.run(ctx)
    assert summary["targets"] == "text" and summary["steps"] == 2 * 5
    assert summary["heldout"]["perplexity"] > 1
    assert (ctx.out_dir / "student" / "model.safetensors").is_file()
