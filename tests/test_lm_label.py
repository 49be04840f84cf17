"""`lm_label`: a tiny random GPT-2 (padded vocab, sentencepiece tokenizer) labels documents."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from factories import DEFAULT_SENTENCES, tiny_causal_lm
from pipeline.testing import make_artifact, make_context
from stages.lm_label import LmLabelStage

REPO = Path(__file__).resolve().parent.parent
LONG = " ".join(DEFAULT_SENTENCES)  # ~100 tokens: several windows at max_length 32


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return tiny_causal_lm(tmp_path_factory.mktemp("lm") / "teacher")


def _docs() -> pa.Table:
    texts = ["a man is riding a horse", LONG, "", "the cat sleeps on the sofa"]
    return pa.table({"id": [f"d{i}" for i in range(len(texts))], "text": texts})


def _label(tmp_path: Path, teacher: Path, **config):
    table = _docs()
    ctx = make_context(tmp_path, inputs={"data": [make_artifact(tmp_path / "docs", table)]}, seed=3)
    stage = LmLabelStage(config=LmLabelStage.Config(teacher=str(teacher), max_length=32, stride=16, **config))
    assert stage.validate(input_columns={"data": [["id", "text"]]}) == []
    stage.setup(ctx)
    return stage, stage.process(table, ctx, shard_index=0)


def _teacher_logprobs(teacher: Path, ids: list[int]) -> np.ndarray:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(teacher))
    model = AutoModelForCausalLM.from_pretrained(str(teacher)).eval()
    with torch.no_grad():
        z = model(input_ids=torch.tensor([ids])).logits[0, :-1, : len(tok)]
    return torch.log_softmax(z.double(), -1).numpy()


def test_topk_rows_windows_and_narrow_dtypes(tmp_path, teacher):
    stage, out = _label(tmp_path, teacher, mode="topk", k=4)
    assert out.column_names == stage.output_columns(input_columns={})
    assert "d2" not in out.column("doc_id").to_pylist()  # empty documents carry no tokens
    vocab = len(stage.tok)
    assert vocab < 256 and stage.model_vocab > vocab  # padded embedding rows
    assert out.schema.field("input_ids").type == pa.list_(pa.uint8())
    assert out.schema.field("topk_ids").type == pa.list_(pa.list_(pa.uint8(), 4))
    assert out.schema.field("topk_logprobs").type == pa.list_(pa.list_(pa.float16(), 4))
    rows = out.to_pylist()
    for r in rows:
        assert len(r["topk_ids"]) == len(r["input_ids"]) - 1 - r["target_start"] == len(r["log_normalizer"])
        assert max(max(ids) for ids in r["topk_ids"]) < vocab
    # A long document: several windows, together predicting each of its tokens exactly once.
    from kd.lm.text import document_ids

    long_ids = document_ids(stage.tok, LONG)
    long_rows = [r for r in rows if r["doc_id"] == "d1"]
    assert len(long_rows) > 2 and len(long_ids) > 32
    assert sum(len(r["topk_ids"]) for r in long_rows) == len(long_ids) - 1
    # The first window's stored log-probs are the teacher's own (over the tokenizer's ids only).
    first = long_rows[0]
    logp = _teacher_logprobs(teacher, first["input_ids"])
    ids = np.array(first["topk_ids"], dtype=np.int64)
    np.testing.assert_array_equal(ids, np.argsort(-logp, -1, kind="stable")[:, :4])
    np.testing.assert_allclose(np.array(first["topk_logprobs"], dtype=np.float64),
                               np.take_along_axis(logp, ids, -1), atol=5e-3)
    assert all(r["kl_rebuilt"] > 0 for r in rows)
    md = stage.metadata()
    assert md["mode"] == "topk" and int(md["vocab_size"]) == vocab and int(md["model_vocab_size"]) > vocab


@pytest.mark.parametrize("max_length,stride", [(2, 1), (8, 1), (8, 4), (8, 7), (9, 5), (32, 16), (32, 31)])
def test_windows_predict_every_token_once_with_the_most_context(max_length, stride):
    from kd.lm.text import windows

    for n in range(1, 80):
        wins = windows(n, max_length, stride)
        predictor: dict[int, object] = {}
        for w in wins:
            assert 0 <= w.start < w.end <= n and w.end - w.start <= max_length
            for pos in range(w.start + w.target_start, w.end - 1):  # positions whose next token is a target
                assert pos + 1 not in predictor, (n, pos + 1)
                predictor[pos + 1] = w
        assert sorted(predictor) == list(range(1, n))  # token 0 (the start) has no prediction
        starts = [w.start for w in wins]
        assert starts == sorted(set(starts)) and all(b - a <= stride for a, b in zip(starts, starts[1:]))
        for t, w in predictor.items():  # context of token t: the tokens before it in its window
            assert t - w.start == max(t - v.start for v in wins if v.start < t < v.end)  # the most there is
            assert t - w.start >= min(t, max_length - stride)  # at least max_length - stride past the first


def test_every_window_of_a_long_document_holds_the_teachers_distribution_in_its_own_context(tmp_path, teacher):
    from kd.lm.text import document_ids

    stage, out = _label(tmp_path, teacher, mode="topk", k=4)
    long_ids = document_ids(stage.tok, LONG)
    rows = [r for r in out.to_pylist() if r["doc_id"] == "d1"]
    predicted = []
    for r in rows:
        start = int(r["id"].split("#")[1]) * 16  # stride 16
        start = min(start, len(long_ids) - 32)
        assert r["input_ids"] == long_ids[start:start + len(r["input_ids"])]
        logp = _teacher_logprobs(teacher, r["input_ids"])[r["target_start"]:]
        np.testing.assert_allclose(np.array(r["topk_logprobs"], dtype=np.float64),
                                   np.take_along_axis(logp, np.array(r["topk_ids"], dtype=np.int64), -1), atol=5e-3)
        predicted += [start + p + 1 for p in range(r["target_start"], len(r["input_ids"]) - 1)]
    assert predicted == list(range(1, len(long_ids)))


def test_sampled_rows_are_seeded_and_counts_sum_to_k(tmp_path, teacher):
    stage, out = _label(tmp_path, teacher, mode="sampled", k=12, store_logprobs=True)
    again = stage.process(_docs(), make_context(tmp_path / "b", seed=3), shard_index=0)
    assert out.equals(again)
    other = stage.process(_docs(), make_context(tmp_path / "c", seed=4), shard_index=0)
    assert not out.column("sample_ids").equals(other.column("sample_ids"))
    for r in out.to_pylist():
        assert all(sum(c) == 12 for c in r["sample_counts"])
        assert all(len(i) == len(c) == len(lp) for i, c, lp in
                   zip(r["sample_ids"], r["sample_counts"], r["sample_logprobs"]))


def test_bad_config_and_teacher_are_rejected_before_running(tmp_path, teacher):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="stride"):
        LmLabelStage.Config(teacher=str(teacher), max_length=16, stride=16)
    with pytest.raises(ValidationError, match="store_logprobs"):
        LmLabelStage.Config(teacher=str(teacher), mode="topk", store_logprobs=True)
    stage = LmLabelStage(config=LmLabelStage.Config(teacher=str(tmp_path / "nope")))
    assert "not found" in str(stage.validate(input_columns={"data": [["id", "text"]]})[0])
    stage = LmLabelStage(config=LmLabelStage.Config(teacher=str(teacher), text_column="body"))
    assert "text_column" in stage.validate(input_columns={"data": [["id", "text"]]})[0].loc
    facts = LmLabelStage(config=LmLabelStage.Config(teacher=str(teacher))).output_facts(input_facts={})
    assert facts.get("lm_vocab_size") < 256 and facts.get("lm_vocab")


def test_padded_embedding_rows_never_change_the_stored_distributions(tmp_path, teacher):
    """Rows past the tokenizer's length, set huge at random, change nothing that is stored."""
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    loud = tmp_path / "loud"
    shutil.copytree(teacher, loud)
    model = AutoModelForCausalLM.from_pretrained(str(loud))
    vocab = LmLabelStage(config=LmLabelStage.Config(teacher=str(teacher))).output_facts(
        input_facts={}).get("lm_vocab_size")
    rows = model.get_output_embeddings().weight
    assert rows.shape[0] > vocab
    with torch.no_grad():
        torch.manual_seed(0)
        rows[vocab:] = torch.randn_like(rows[vocab:]) * 100  # would take most of the mass if not sliced off
    model.save_pretrained(str(loud))
    for mode in ("topk", "sampled"):
        _, quiet_out = _label(tmp_path / f"q{mode}", teacher, mode=mode, k=8)
        _, loud_out = _label(tmp_path / f"l{mode}", loud, mode=mode, k=8)
        for col in quiet_out.column_names:
            if col in ("topk_logprobs", "log_normalizer", "kl_rebuilt"):  # float: same within float32 rounding
                a = np.concatenate([np.ravel(np.array(x, dtype=np.float64)) for x in quiet_out.column(col).to_pylist()])
                b = np.concatenate([np.ravel(np.array(x, dtype=np.float64)) for x in loud_out.column(col).to_pylist()])
                np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-3)
            else:
                assert quiet_out.column(col).equals(loud_out.column(col)), col


def test_a_tokenizer_longer_than_the_models_vocabulary_exits_2_at_plan(tmp_path):
    from transformers import AutoTokenizer

    short = tiny_causal_lm(tmp_path / "short", pad_rows=1)
    tok = AutoTokenizer.from_pretrained(str(short))
    tok.add_tokens(["zebraword", "quokkaword", "yakword"])
    tok.save_pretrained(str(short))
    problems = LmLabelStage(config=LmLabelStage.Config(teacher=str(short))).validate(
        input_columns={"data": [["id", "text"]]})
    assert [p.loc for p in problems] == ["config.teacher"] and "cannot be scored" in problems[0].message
    corpus = tmp_path / "docs.txt"
    corpus.write_text("a man is riding a horse\n")
    manifest = tmp_path / "m.yaml"
    manifest.write_text(f"""
name: lmrows
workdir: {tmp_path / "wd"}
stages:
  - {{name: read, type: read, config: {{path: {corpus}, format: text}}}}
  - {{name: lm, type: lm_label, inputs: {{data: read}}, config: {{teacher: {short}}}}}
""")
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "plan", str(manifest)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "stages[1].config.teacher" in proc.stdout + proc.stderr and "cannot be scored" in proc.stdout + proc.stderr


# --- crash: kill -9 mid-label, resume, shards identical to a clean run --------------------------

def _manifest(path: Path, workdir: Path, corpus: Path, teacher: Path) -> Path:
    path.write_text(f"""
name: lmcrash
workdir: {workdir}
seed: 1
stages:
  - name: read
    type: read
    config: {{path: {corpus}, format: text, rows_per_shard: 12}}
  - name: lm
    type: lm_label
    inputs: {{data: read}}
    config: {{teacher: {teacher}, mode: sampled, k: 12, max_length: 32, concurrency: 1, batch_size: 8}}
""")
    return path


def _shard_hashes(workdir: Path) -> dict[str, str]:
    shards = sorted((workdir / "runs" / "lmcrash" / "lm" / "shards").glob("*.parquet"))
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in shards}


@pytest.fixture
def ray_tmp():
    """Short Ray temp dirs (socket path limit) outside tmp_path, removed afterwards."""
    import shutil

    base = f"/tmp/kdl{os.getpid()}"
    yield base
    for suffix in ("a", "b"):
        shutil.rmtree(base + suffix, ignore_errors=True)


@pytest.mark.slow
@pytest.mark.timeout(1800)  # three runs with Ray start-ups: minutes on a busy 2-core machine
def test_kill_9_mid_label_then_resume_gives_identical_shards(tmp_path, teacher, ray_tmp):
    from test_crash import run_until_killed

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n".join(f"{s} {i} {LONG if i % 7 == 0 else ''}" for i, s in
                                enumerate(DEFAULT_SENTENCES * 6)) + "\n")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO)}
    clean_wd, crashed_wd = tmp_path / "clean", tmp_path / "crashed"
    for wd in (clean_wd, crashed_wd):
        wd.mkdir()
    env_clean = {**env, "KDPIPE_RAY_TMPDIR": ray_tmp + "a"}
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(_manifest(tmp_path / "a.yaml", clean_wd, corpus,
                    teacher)), "--no-progress"], cwd=REPO, env=env_clean, check=True, timeout=600)
    clean = _shard_hashes(clean_wd)
    assert len(clean) == 9

    def some_done() -> bool:
        markers = list(crashed_wd.glob("artifacts/lm_label/*/completions/*.json"))
        return 2 <= len(markers) < 9

    env_crash = {**env, "KDPIPE_RAY_TMPDIR": ray_tmp + "b"}
    crashed = _manifest(tmp_path / "b.yaml", crashed_wd, corpus, teacher)
    run_until_killed([sys.executable, "-m", "pipeline.cli", "run", str(crashed), "--no-progress"], env_crash, some_done)
    done_at_kill = len(list(crashed_wd.glob("artifacts/lm_label/*/completions/*.json")))
    time.sleep(0.1)
    subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(crashed), "--no-progress"], cwd=REPO,
                   env=env_crash, check=True, timeout=600)
    assert 2 <= done_at_kill < 9
    assert _shard_hashes(crashed_wd) == clean
    shown = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", "lmcrash/lm", "--workdir", str(clean_wd)],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=300, check=True).stdout
    assert "token distributions: mode sampled, k 12" in shown and "bytes/token on disk" in shown


def test_lm_teacher_trains_a_padded_vocab_gpt2_that_lm_label_reads_as_an_input(tmp_path):
    from stages.lm_teacher import LmTeacherStage

    docs = make_artifact(tmp_path / "docs", pa.table({"id": [f"d{i}" for i in range(len(DEFAULT_SENTENCES))],
                                                      "text": DEFAULT_SENTENCES}))
    heldout = make_artifact(tmp_path / "held", pa.table({"id": ["h"], "text": ["a cat reads a book"]}))
    ctx = make_context(tmp_path, inputs={"data": [docs], "heldout": [heldout]}, name="teacher")
    cfg = LmTeacherStage.Config(vocab_size=60, pad_vocab_to=64, max_length=16,
                                model={"d_model": 16, "layers": 1, "heads": 2, "max_positions": 16},
                                train={"epochs": 2, "batch_size": 4, "warmup_steps": 1})
    summary = LmTeacherStage(config=cfg).run(ctx)
    assert summary["embedding_rows"] % 64 == 0 and summary["embedding_rows"] > summary["vocab_size"]
    assert summary["windows"] >= len(DEFAULT_SENTENCES) and summary["steps"] == 2 * -(-summary["windows"] // 4)
    assert summary["heldout"]["perplexity"] > 1
    teacher_art = make_artifact(tmp_path / "teacher-art", files={
        str(p.relative_to(ctx.out_dir)): p.read_bytes() for p in (ctx.out_dir / "model").iterdir()})
    stage = LmLabelStage(config=LmLabelStage.Config(max_length=16, mode="topk", k=4))
    label_ctx = make_context(tmp_path, inputs={"data": [docs], "teacher": [teacher_art]}, name="label")
    assert stage.validate(input_columns={"data": [["id", "text"]], "teacher": [None]}) == []
    stage.setup(label_ctx)
    out = stage.process(docs.read_table(), label_ctx, shard_index=0)
    assert out.num_rows == summary["windows"]  # same windows as the teacher trained on
    assert max(max(max(p) for p in row) for row in out.column("topk_ids").to_pylist()) < summary["vocab_size"]
