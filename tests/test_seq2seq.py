"""Sequence-level KD: seq2seq teacher from scratch, students on reference / Seq-KD / Seq-Inter /
Word-KD targets, the seq2seq student loader, and the multi30k-seqkd manifest end to end."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

SUBJECTS = [("a man", "ein mann"), ("a woman", "eine frau"), ("a dog", "ein hund"), ("a child", "ein kind")]
VERBS = [("sees", "sieht"), ("likes", "mag"), ("paints", "malt"), ("finds", "findet")]
OBJECTS = [("the house", "das haus"), ("the car", "das auto"), ("the tree", "den baum"), ("the ball", "den ball")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_pairs() -> list[tuple[str, str]]:
    """64 EN-DE pairs of a tiny, perfectly regular language."""
    return [(f"{s} {v} {o} .", f"{sd} {vd} {od} .")
            for (s, sd), (v, vd), (o, od) in itertools.product(SUBJECTS, VERBS, OBJECTS)]


def parallel_table():
    import pyarrow as pa

    pairs = toy_pairs()
    return pa.table({"id": [f"p{i:03d}" for i in range(len(pairs))], "text": [e for e, _ in pairs],
                     "de": [d for _, d in pairs]})


def tiny_schedule(**kw):
    return {"epochs": 20, "max_steps": 6, "batch_size": 16, "warmup_steps": 2, "lr": 3e-3, **kw}


@pytest.fixture(scope="module")
def teacher_art(tmp_path_factory):
    """A seq2seq_teacher artifact trained briefly on the toy corpus (no Ray)."""
    from pipeline.testing import make_artifact, make_context
    from stages.seq2seq_teacher import Seq2SeqTeacherStage

    tmp = tmp_path_factory.mktemp("teacher")
    data = make_artifact(tmp / "data", parallel_table(), rows_per_shard=20)
    ctx = make_context(tmp, inputs={"data": [data]}, name="teacher")
    stage = Seq2SeqTeacherStage(config=Seq2SeqTeacherStage.Config(vocab_size=60, train=tiny_schedule(max_steps=30),
                                                              checkpoint_every=10))
    summary = stage.run(ctx)
    from pipeline.testing import make_artifact as _mk

    art = _mk(tmp / "teacher-art", files={str(p.relative_to(ctx.out_dir)): p.read_bytes()
                                          for p in ctx.out_dir.rglob("*") if p.is_file()})
    return art, summary


def beam_labels(model_dir: Path, ids: list[str], texts: list[str], *, num_beams: int = 3, topk: int = 4,
                references: list[str] | None = None):
    """A label table in the ARCHITECTURE.md seq2seq layout from direct `generate` calls (what
    the label stage produces), for testing students independently of it."""
    import pyarrow as pa
    import torch
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).eval()
    enc = tok(texts, return_tensors="pt", padding=True)
    with torch.inference_mode():
        out = model.generate(**enc, num_beams=num_beams, num_return_sequences=num_beams, max_new_tokens=12,
                             output_scores=True, return_dict_in_generate=True)
        seqs = out.sequences.view(len(texts), num_beams, -1)
        best = seqs[:, 0, :]
        # top-k of the model's own distribution along the best hypothesis (teacher forcing)
        logits = model(**enc, decoder_input_ids=best[:, :-1]).logits
        top = torch.log_softmax(logits.float(), -1).topk(topk, dim=-1)
    hyp_text, hyp_ids, topk_ids, topk_lp = [], [], [], []
    for i in range(len(texts)):
        rows = [[t for t in s.tolist()[1:] if t != tok.pad_token_id] for s in seqs[i]]
        hyp_ids.append(rows)
        hyp_text.append(tok.batch_decode(seqs[i], skip_special_tokens=True))
        n = len(rows[0])
        topk_ids.append(top.indices[i, :n].tolist())
        topk_lp.append(top.values[i, :n].tolist())
    scores = out.sequences_scores.view(len(texts), num_beams).tolist()
    extra = {}
    if references is not None:  # top-k given the gold prefixes (Kim & Rush word-level KD)
        from kd.seq2seq import encode

        gold = encode(tok, references, 12)
        ref_ids, ref_top_ids, ref_top_lp = [], [], []
        for i, g in enumerate(gold):
            with torch.inference_mode():
                logits = model(input_ids=enc["input_ids"][i:i + 1], attention_mask=enc["attention_mask"][i:i + 1],
                               decoder_input_ids=torch.tensor([[0] + g[:-1]])).logits[0]
            top_g = torch.log_softmax(logits.float(), -1).topk(topk, dim=-1)
            ref_ids.append(g)
            ref_top_ids.append(top_g.indices.tolist())
            ref_top_lp.append(top_g.values.tolist())
        extra = {"ref_ids": pa.array(ref_ids, pa.list_(pa.int32())),
                 "ref_topk_ids": pa.array(ref_top_ids, pa.list_(pa.list_(pa.int32(), topk))),
                 "ref_topk_logprobs": pa.array(ref_top_lp, pa.list_(pa.list_(pa.float16(), topk)))}
    return pa.table({
        "id": pa.array(ids, pa.string()),
        "hyp_text": pa.array(hyp_text, pa.list_(pa.string())),
        "hyp_ids": pa.array(hyp_ids, pa.list_(pa.list_(pa.int32()))),
        "hyp_scores": pa.array(scores, pa.list_(pa.float32())),
        "topk_ids": pa.array(topk_ids, pa.list_(pa.list_(pa.int32(), topk))),
        "topk_logprobs": pa.array(topk_lp, pa.list_(pa.list_(pa.float16(), topk))),
        **extra,
    })


# --- teacher ----------------------------------------------------------------------------------

def test_teacher_is_a_plain_hf_checkpoint(teacher_art):
    import sentencepiece as spm
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    art, summary = teacher_art
    model_dir = art.files_dir / "model"
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    sp = spm.SentencePieceProcessor(model_file=str(model_dir / "spiece.model"))
    assert len(tok) == sp.get_piece_size() > 20
    text = "a dog likes the car ."
    assert tok(text)["input_ids"] == sp.encode(text) + [tok.eos_token_id]
    assert tok.unk_token_id not in tok(text)["input_ids"]
    model = AutoModelForSeq2SeqLM.from_pretrained(str(model_dir))
    assert model.num_parameters() == summary["parameters"]
    assert summary["steps"] == 30 and len(summary["loss_curve"]) == 10
    assert summary["final_loss"] < summary["loss_curve"][0][1]  # it learns


def untrained_model(*, vocab_size: int = 30, architecture: str = "bart"):
    """A 16-d encoder-decoder over ids 0..vocab_size-1 (pad 0, eos 1), no tokenizer needed."""
    from stages.seq2seq_teacher import ModelDims, build_model

    class IdsOnly:  # all build_model reads from a tokenizer
        pad_token_id, eos_token_id = 0, 1

        def __len__(self):
            return vocab_size

    dims = ModelDims(architecture=architecture, d_model=16, d_ff=32, num_heads=2, dropout=0.0)
    return build_model(IdsOnly(), dims, seed=0, max_new_tokens=8, num_beams=1)


@pytest.mark.parametrize("architecture", ["bart", "t5"])
def test_teacher_forcing_inputs_match_the_models_own_shift(architecture):
    import torch

    from stages.seq2seq_teacher import decoder_inputs

    model = untrained_model(architecture=architecture).eval()
    src = torch.tensor([[5, 6, 7, 1], [8, 9, 1, 0]])
    labels = torch.tensor([[10, 11, 12, 1], [13, 1, -100, -100]])
    ours = model(input_ids=src, attention_mask=(src != 0).long(), decoder_input_ids=decoder_inputs(model, labels)).logits
    theirs = model(input_ids=src, attention_mask=(src != 0).long(), labels=labels).logits
    assert decoder_inputs(model, labels).tolist() == [[0, 10, 11, 12], [0, 13, 1, 0]]
    assert torch.allclose(ours, theirs)


def test_source_reliance_is_zero_only_when_the_decoder_cannot_see_the_source():
    import torch

    from stages.seq2seq_teacher import source_reliance

    model = untrained_model()
    examples = [{"src": [3 + i, 4 + i, 1], "tgt": [10 + i, 1]} for i in range(8)]
    assert source_reliance(model, examples) != 0.0
    with torch.no_grad():
        for layer in model.model.decoder.layers:
            layer.encoder_attn.out_proj.weight.zero_()
            layer.encoder_attn.out_proj.bias.zero_()
    assert source_reliance(model, examples) == 0.0
    assert model.training  # restored


@pytest.mark.parametrize("architecture", ["bart", "t5"])
def test_fit_resumes_from_scratch_checkpoint_to_identical_weights(tmp_path, architecture):
    import torch

    from stages.seq2seq_teacher import ModelDims, TrainSchedule, build_model, encode, fit, load_spm_tokenizer, \
        train_sentencepiece

    pairs = toy_pairs()
    train_sentencepiece([e for e, _ in pairs] + [d for _, d in pairs], tmp_path / "tok", 60, seed=0)
    tok = load_spm_tokenizer(tmp_path / "tok")
    examples = [{"src": s, "tgt": t} for s, t in zip(encode(tok, [e for e, _ in pairs], 32),
                                                     encode(tok, [d for _, d in pairs], 32))]
    schedule = TrainSchedule(**tiny_schedule(max_steps=7))
    dims = ModelDims(architecture=architecture, d_model=32, d_ff=64, num_heads=2)

    straight = build_model(tok, dims, seed=1, max_new_tokens=8, num_beams=1)
    fit(straight, examples, schedule, scratch=tmp_path / "a", seed=3, checkpoint_every=2)

    class Crash(Exception):
        pass

    def crash_at_5(step):
        if step == 5:
            raise Crash

    interrupted = build_model(tok, dims, seed=1, max_new_tokens=8, num_beams=1)
    with pytest.raises(Crash):
        fit(interrupted, examples, schedule, scratch=tmp_path / "b", seed=3, checkpoint_every=2, on_step=crash_at_5)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["step"] == 4
    resumed = build_model(tok, dims, seed=99, max_new_tokens=8, num_beams=1)  # weights come from the checkpoint
    stats = fit(resumed, examples, schedule, scratch=tmp_path / "b", seed=3, checkpoint_every=2)
    assert stats["steps"] == 7
    for (name, a), (_, b) in zip(straight.state_dict().items(), resumed.state_dict().items()):
        assert torch.equal(a, b), name


# --- targets ----------------------------------------------------------------------------------

def test_seqinter_picks_the_highest_sentence_bleu_hypothesis():
    from sacrebleu import sentence_bleu

    from stages.train_seq2seq import closest_hypothesis

    ref = "ein mann sieht das haus am see ."
    hyps = ["ein hund mag den ball .", "eine frau sieht das haus .", "ein mann sieht das haus am see .",
            "ein mann sieht das auto ."]
    assert closest_hypothesis(hyps, ref) == 2
    cases = [(hyps[::-1], ref), (["das haus", "ein mann sieht"], ref), (["x y z", "x y z"], ref)]
    for candidates, reference in cases:
        scores = [sentence_bleu(h, [reference]).score for h in candidates]
        picked = closest_hypothesis(candidates, reference)
        assert scores[picked] == max(scores)
        assert picked == scores.index(max(scores))  # ties: the better-ranked hypothesis


def test_clean_hypothesis_strips_start_and_padding():
    from stages.train_seq2seq import clean_hypothesis

    ids = dict(start_id=0, pad_id=0, eos_id=1)
    assert clean_hypothesis([0, 5, 6, 1, 0, 0], **ids) == [5, 6, 1]
    assert clean_hypothesis([5, 6, 1], **ids) == [5, 6, 1]
    assert clean_hypothesis([5, 6], **ids) == [5, 6, 1]


def test_targets_follow_ids_when_label_shards_are_out_of_order(tmp_path, teacher_art):
    import pyarrow as pa

    from pipeline.testing import make_artifact, make_context
    from stages.train_seq2seq import TrainSeq2SeqConfig, _read_sources, build_examples, clean_hypothesis, join_labels
    from stages.seq2seq_teacher import load_spm_tokenizer, read_pairs

    teacher, _ = teacher_art
    table = parallel_table()
    data = make_artifact(tmp_path / "data", table, rows_per_shard=16)
    labels = beam_labels(teacher.files_dir / "model", table["id"].to_pylist(), table["text"].to_pylist(),
                         references=table["de"].to_pylist())
    # the label shards come back in another order and another sharding
    perm = list(range(table.num_rows))[::-1]
    perm = perm[1::2] + perm[::2]
    shuffled = labels.take(pa.array(perm))
    label_art = make_artifact(tmp_path / "labels", shuffled, rows_per_shard=10)
    ctx = make_context(tmp_path, inputs={"data": [data], "labels": [label_art], "teacher": [teacher]})
    tok = load_spm_tokenizer(teacher.files_dir / "model")
    expected = {r["id"]: r for r in labels.to_pylist()}
    source_of = dict(zip(table["id"].to_pylist(), table["text"].to_pylist()))

    for target in ("seqkd", "seqinter", "seqkd_wordkd"):
        cfg = TrainSeq2SeqConfig(target=target)
        pairs = read_pairs(ctx, "data", "text", "de") if target == "seqinter" else _read_sources(ctx, "text")
        joined = join_labels(pairs, label_art, ["hyp_text", "hyp_ids", "topk_ids", "topk_logprobs"])
        examples, _ = build_examples(joined, tok, cfg, teacher_vocab=True)
        assert len(examples) == table.num_rows
        for pair, ex in zip(joined, examples):
            assert pair["src"] == source_of[pair["id"]]
            assert ex["src"] == tok(pair["src"])["input_ids"]
            row = expected[pair["id"]]
            chosen = 0 if target != "seqinter" else max(
                range(len(row["hyp_text"])), key=lambda i: (__import__("sacrebleu").sentence_bleu(
                    row["hyp_text"][i], [pair["tgt"]]).score, -i))
            want = clean_hypothesis(row["hyp_ids"][chosen], start_id=0, pad_id=0, eos_id=1)
            if target == "seqkd_wordkd":  # top-k exists for the generated positions only
                want = want[: len(row["topk_ids"])]
                assert ex["topk_ids"] == row["topk_ids"][: len(want)]
            assert ex["tgt"] == want


def test_gold_prefix_wordkd_trains_on_the_reference_and_its_topk_not_the_hypothesis(tmp_path, teacher_art):
    """Kim & Rush's word-level KD: targets are the gold references (as encoded for the student),
    with the teacher's top-k given the gold prefixes; Seq-KD + Word-KD keeps the hypothesis."""
    from pipeline.testing import make_artifact, make_context
    from stages.seq2seq_teacher import load_spm_tokenizer
    from stages.train_seq2seq import TrainSeq2SeqConfig, _read_sources, build_examples, join_labels
    from kd.seq2seq import encode

    teacher, _ = teacher_art
    table = parallel_table()
    data = make_artifact(tmp_path / "data", table, rows_per_shard=16)
    labels = beam_labels(teacher.files_dir / "model", table["id"].to_pylist(), table["text"].to_pylist(),
                         references=table["de"].to_pylist())
    label_art = make_artifact(tmp_path / "labels", labels, rows_per_shard=10)
    ctx = make_context(tmp_path, inputs={"data": [data], "labels": [label_art], "teacher": [teacher]})
    tok = load_spm_tokenizer(teacher.files_dir / "model")
    gold = dict(zip(table["id"].to_pylist(), encode(tok, table["de"].to_pylist(), 12)))  # beam_labels: 12 tokens
    by_id = {r["id"]: r for r in labels.to_pylist()}
    columns = ["hyp_text", "hyp_ids", "topk_ids", "topk_logprobs", "ref_ids", "ref_topk_ids", "ref_topk_logprobs"]
    joined = join_labels(_read_sources(ctx, "text"), label_art, columns)
    word, _ = build_examples(joined, tok, TrainSeq2SeqConfig(target="wordkd"), teacher_vocab=True)
    hyp, _ = build_examples(joined, tok, TrainSeq2SeqConfig(target="seqkd_wordkd"), teacher_vocab=True)
    differ = 0
    for pair, w, h in zip(joined, word, hyp):
        row = by_id[pair["id"]]
        assert w["tgt"] == gold[pair["id"]] and w["topk_ids"] == row["ref_topk_ids"]
        assert w["topk_logprobs"] == row["ref_topk_logprobs"]
        assert h["topk_ids"] == row["topk_ids"][: len(h["tgt"])]
        differ += w["tgt"] != h["tgt"]
    assert differ > len(word) // 2  # the teacher's hypotheses are not the references here
    assert "reference_column" in " ".join(str(p) for p in _student_problems(
        "wordkd", labels=[["id", "hyp_text", "hyp_ids", "topk_ids", "topk_logprobs"]]))


def _student_problems(target: str, labels: list) -> list:
    from stages.train_seq2seq import TrainSeq2SeqStage

    stage = TrainSeq2SeqStage(config=TrainSeq2SeqStage.Config(target=target))
    return stage.validate(input_columns={"data": [["id", "text", "de"]], "labels": labels,
                                         "teacher": [None]})


def test_missing_labels_are_an_error(tmp_path):
    from pipeline.testing import make_artifact
    from stages.train_seq2seq import join_labels

    import pyarrow as pa

    labels = make_artifact(tmp_path / "l", pa.table({"id": ["a"], "hyp_text": [["x"]]}))
    with pytest.raises(ValueError, match="1 of 2 rows have no label"):
        join_labels([{"id": "a"}, {"id": "b"}], labels, ["hyp_text"])


def test_word_kd_loss_matches_a_hand_computation():
    import torch

    from stages.seq2seq_teacher import TrainSchedule
    from stages.train_seq2seq import word_kd_loss

    model = untrained_model(vocab_size=20).eval()
    batch = [{"src": [5, 6, 1], "tgt": [7, 8, 1], "topk_ids": [[7, 9], [8, 3], [1, 4]],
              "topk_logprobs": [[-0.1, -2.5], [-0.3, -1.5], [-0.01, -5.0]]},
             {"src": [4, 1], "tgt": [9, 1], "topk_ids": [[9, 7], [1, 2]], "topk_logprobs": [[-0.2, -1.8], [-0.05, -3.0]]}]
    schedule = TrainSchedule(label_smoothing=0.0)
    got = word_kd_loss(model, batch, schedule, alpha=0.3)
    nll, kd, n = 0.0, 0.0, 0
    for ex in batch:
        src = torch.tensor([ex["src"]])
        logits = model(input_ids=src, labels=torch.tensor([ex["tgt"]])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        for t, tok in enumerate(ex["tgt"]):
            nll -= lp[t, tok].item()
            p = torch.softmax(torch.tensor(ex["topk_logprobs"][t]), -1)
            kd -= sum(p[j].item() * lp[t, ex["topk_ids"][t][j]].item() for j in range(2))
            n += 1
    assert got.item() == pytest.approx(0.7 * nll / n + 0.3 * kd / n, rel=1e-4)


# --- students ---------------------------------------------------------------------------------

def test_students_train_on_each_target_and_load(tmp_path, teacher_art):
    from pipeline.testing import make_artifact, make_context
    from kd.students import load_student
    from stages.train_seq2seq import TrainSeq2SeqStage

    teacher, _ = teacher_art
    table = parallel_table()
    data = make_artifact(tmp_path / "data", table, rows_per_shard=16)
    labels = make_artifact(tmp_path / "labels", beam_labels(teacher.files_dir / "model", table["id"].to_pylist(),
                                                             table["text"].to_pylist(),
                                                             references=table["de"].to_pylist()), rows_per_shard=25)
    small = {"d_model": 32, "d_ff": 64, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2}
    for target in ("reference", "seqkd", "seqinter", "wordkd", "seqkd_wordkd"):
        inputs = {"data": [data], "teacher": [teacher]}
        if target != "reference":
            inputs["labels"] = [labels]
        ctx = make_context(tmp_path, inputs=inputs, name=target)
        cfg = TrainSeq2SeqStage.Config(target=target, model=small, train=tiny_schedule(max_steps=4))
        summary = TrainSeq2SeqStage(config=cfg).run(ctx)
        assert summary["steps"] == 4 and summary["target"] == target
        student = load_student(ctx.out_dir.parent)  # the artifact directory
        assert student.task == "seq2seq"
        assert student.num_parameters() == summary["parameters"]
        texts = ["a dog sees the tree .", "a child paints the ball .", "a man likes the house ."]
        greedy = student.predict(texts)
        beam = student.predict(texts, num_beams=3, batch_size=2)
        assert len(greedy) == len(beam) == 3 and all(isinstance(t, str) for t in greedy + beam)
        assert json.loads((ctx.out_dir / "metrics.json").read_text())["target"] == target
        assert (ctx.out_dir / "curves.png").is_file()
    # without a teacher the student trains its own sentencepiece model
    ctx = make_context(tmp_path, inputs={"data": [data]}, name="own-vocab")
    cfg = TrainSeq2SeqStage.Config(target="reference", vocab_size=50, model=small, train=tiny_schedule(max_steps=2))
    assert TrainSeq2SeqStage(config=cfg).run(ctx)["vocab_size"] >= 40


def test_student_validation_explains_missing_inputs():
    from stages.train_seq2seq import TrainSeq2SeqStage

    stage = TrainSeq2SeqStage(config=TrainSeq2SeqStage.Config(target="seqkd_wordkd"))
    problems = stage.validate(input_columns={"data": [["id", "text", "de"]], "labels": [["id", "hyp_text", "hyp_ids"]]})
    messages = " | ".join(f"{p.loc}: {p.message}" for p in problems)
    assert "topk_ids" in messages and "teacher" in messages
    stage = TrainSeq2SeqStage(config=TrainSeq2SeqStage.Config(target="seqkd", source_column="en"))
    problems = stage.validate(input_columns={"data": [["id", "text", "de"]]})
    assert {p.loc for p in problems} == {"config.source_column", "inputs"}
    assert TrainSeq2SeqStage(config=TrainSeq2SeqStage.Config()).validate(
        input_columns={"data": [["id", "text", "de"]]}) == []


# --- the manifest, end to end through the engine -------------------------------------------------

TINY_VARS = {"teacher_pairs": 64, "train_pairs": 64, "vocab_size": 60, "cpus": 1, "teacher_d_model": 32, "teacher_d_ff": 64,
             "teacher_layers": 1, "teacher_epochs": 8, "student_d_model": 16, "student_d_ff": 32,
             "student_layers": 1, "student_epochs": 2, "batch_size": 16, "num_beams": 3, "nbest": 3,
             "topk": 4, "max_tokens": 12, "test_rows": 16, "rows_per_shard": 16, "label_actors": 2}


def write_toy_multi30k(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    pairs = toy_pairs()
    for split, rows in (("train", pairs), ("test_2016_flickr", pairs[::4])):
        (directory / f"{split}.en").write_text("\n".join(e for e, _ in rows) + "\n", encoding="utf-8")
        (directory / f"{split}.de").write_text("\n".join(d for _, d in rows) + "\n", encoding="utf-8")
    return directory


@pytest.mark.ray
@pytest.mark.slow
def test_multi30k_seqkd_manifest_runs_end_to_end(tmp_path, ray_session):
    import sacrebleu
    from transformers import AutoModelForSeq2SeqLM, AutoTokenizer

    from pipeline.artifact import Artifact
    from pipeline.graph import build_graph
    from pipeline.manifest import load_manifest
    from pipeline.runner import run_graph

    data = write_toy_multi30k(tmp_path / "multi30k")
    manifest = load_manifest(REPO / "manifests" / "multi30k-seqkd.yaml",
                             overrides={"multi30k": str(data), **{k: str(v) for k, v in TINY_VARS.items()}})
    manifest.workdir = str(tmp_path / "wd")
    summary = run_graph(build_graph(manifest), progress=False, log=lambda *a: None)
    by_name = {s["name"]: s for s in summary}
    assert all(s["status"] == "ran" for s in summary), [(s["name"], s["status"]) for s in summary]

    train = Artifact(by_name["train_pairs"]["path"]).read_table()
    labels = Artifact(by_name["labels"]["path"])
    assert labels.num_shards() == 4  # 64 rows / 16: processed by two actors in any order
    label_rows = {r["id"]: r for r in labels.read_table().to_pylist()}
    assert set(label_rows) == set(train["id"].to_pylist())
    # the stored n-best is the teacher's beam search on *that id's* source sentence
    teacher_dir = Path(by_name["teacher"]["path"]) / "files" / "model"
    tok = AutoTokenizer.from_pretrained(str(teacher_dir))
    model = AutoModelForSeq2SeqLM.from_pretrained(str(teacher_dir)).eval()
    agree = 0
    for row_id, text in list(zip(train["id"].to_pylist(), train["text"].to_pylist()))[::4]:
        out = model.generate(**tok([text], return_tensors="pt"), num_beams=3, num_return_sequences=3,
                             max_new_tokens=12, do_sample=False)
        agree += tok.batch_decode(out, skip_special_tokens=True) == label_rows[row_id]["hyp_text"]
        assert len(label_rows[row_id]["topk_ids"]) == len(label_rows[row_id]["hyp_ids"][0])
    assert agree >= 14  # of 16; batching may flip a near-tie beam now and then

    # Seq-KD trained on the teacher's best hypotheses, Seq-Inter on the closest to the reference
    seqinter = json.loads((Path(by_name["student_seqinter"]["path"]) / "files" / "metrics.json").read_text())
    refs = dict(zip(train["id"].to_pylist(), train["de"].to_pylist()))
    not_top = sum(max(range(3), key=lambda i: (sacrebleu.sentence_bleu(r["hyp_text"][i], [refs[k]]).score, -i)) != 0
                  for k, r in label_rows.items())
    assert seqinter["seqinter_not_top"] == pytest.approx(not_top / len(label_rows), abs=1e-4)

    metrics = json.loads((Path(by_name["evaluate"]["path"]) / "files" / "metrics.json").read_text())
    names = {m["name"]: m for m in metrics["models"]}
    assert set(names) == {"teacher", "student_reference", "student_seqkd", "student_seqinter", "student_wordkd",
                          "student_seqkd_wordkd"}
    assert names["teacher"]["is_teacher"] and metrics["rows"] == 16
    # every reported score is sacrebleu's on that model's own translations of the test split, recomputed
    from kd.students import load_student
    from stages.evaluate import model_dir

    test = Artifact(by_name["test_pairs"]["path"]).read_table().slice(0, 16)
    src, refs = test["text"].to_pylist(), test["de"].to_pylist()
    for name, m in names.items():
        hyps = load_student(model_dir(Path(by_name[name]["path"]))).predict(src, batch_size=64)
        assert m["task"] == "seq2seq" and m["metrics"]["bleu"] == pytest.approx(
            sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-3), name
        assert m["metrics"]["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score, abs=1e-3), name
    # a second run is all cache hits
    again = run_graph(build_graph(manifest), progress=False, log=lambda *a: None)
    assert {s["status"] for s in again} == {"cached"}


def test_labels_from_another_teacher_are_refused(tmp_path, teacher_art):
    import pyarrow as pa

    from pipeline.artifact import write_json
    from pipeline.testing import make_artifact, make_context
    from stages.train_seq2seq import _check_same_teacher

    teacher, _ = teacher_art
    labels = make_artifact(tmp_path / "labels", pa.table({"id": ["a"], "hyp_text": [["x"]]}))
    manifest = labels.manifest
    manifest["inputs"] = {"teacher": [{"stage": "other", "key": "0123456789abcdef0123"}]}
    write_json(labels.manifest_path, manifest)
    ctx = make_context(tmp_path, inputs={"labels": [labels], "teacher": [teacher]})
    with pytest.raises(ValueError, match="not by the `teacher` input"):
        _check_same_teacher(ctx)
    manifest["inputs"] = {"teacher": [{"stage": "teacher", "key": teacher.key}]}
    write_json(labels.manifest_path, manifest)
    _check_same_teacher(ctx)


def test_hf_seq2seq_decodes_with_the_checkpoints_own_beam_width(tmp_path: Path):
    """A teacher checkpoint saved with generation_config.num_beams = 5 is decoded with 5 beams by
    `evaluate` (through kd/students/hf.py), not with a hard-coded default of 4, and the width
    used is reported."""
    import torch

    from kd.seq2seq import ModelDims, build_model, load_spm_tokenizer, save_checkpoint, train_sentencepiece
    from kd.students.hf import HFModel

    pairs = toy_pairs()
    spm_dir = tmp_path / "spm"
    train_sentencepiece([s for p in pairs for s in p] * 3, spm_dir, 60, seed=0)
    tok = load_spm_tokenizer(spm_dir)
    dims = ModelDims(d_model=32, d_ff=64, num_layers=1, num_decoder_layers=1, num_heads=2)
    model = build_model(tok, dims, seed=0, max_new_tokens=8, num_beams=5)
    save_checkpoint(model, tok, spm_dir, tmp_path / "model")

    teacher = HFModel(tmp_path / "model")
    assert teacher.num_beams == 5
    texts = [src for src, _ in pairs[:4]]
    enc = teacher._encode(texts, return_token_type_ids=False)
    with torch.inference_mode():
        five = teacher.model.generate(**enc, num_beams=5, max_new_tokens=64)
    assert teacher.predict(texts, batch_size=4) == teacher.tokenizer.batch_decode(five, skip_special_tokens=True)


def test_a_config_seed_gives_another_student_and_zero_keeps_the_manifest_seed(tmp_path):
    from safetensors.torch import load_file

    from pipeline.testing import make_artifact, make_context
    from stages.train_seq2seq import TrainSeq2SeqStage

    data = make_artifact(tmp_path / "data", parallel_table(), rows_per_shard=64)
    small = {"d_model": 16, "d_ff": 32, "num_layers": 1, "num_decoder_layers": 1, "num_heads": 2}
    weights = {}
    for name, seed, run_seed in (("a", 0, 0), ("b", 0, 0), ("c", 1, 0), ("d", 0, 5)):
        ctx = make_context(tmp_path, inputs={"data": [data]}, name=name, seed=run_seed)
        cfg = TrainSeq2SeqStage.Config(vocab_size=50, model=small, train=tiny_schedule(max_steps=1), seed=seed)
        TrainSeq2SeqStage(config=cfg).run(ctx)
        weights[name] = load_file(str(ctx.out_dir / "student" / "model.safetensors"))
    same = lambda x, y: all((weights[x][k] == weights[y][k]).all() for k in weights[x])  # noqa: E731
    assert same("a", "b") and not same("a", "c") and not same("a", "d") and not same("c", "d")
