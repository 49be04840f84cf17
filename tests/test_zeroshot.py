"""Zero-shot FR->DE by distillation: the chain (pivot) model, a Seq-KD student's own vocabulary
covering the teacher's hypotheses, and manifests/zeroshot-fr-de.yaml planned and run end to end
on a toy three-way parallel corpus."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# A tiny, perfectly regular EN / DE / FR language (line-aligned, like Multi30k).
SUBJECTS = [("a man", "ein mann", "un homme"), ("a woman", "eine frau", "une femme"),
            ("a dog", "ein hund", "un chien"), ("a child", "ein kind", "un enfant")]
VERBS = [("sees", "sieht", "voit"), ("likes", "mag", "aime"), ("paints", "malt", "peint"),
         ("finds", "findet", "trouve")]
OBJECTS = [("the house", "das haus", "la maison"), ("the car", "das auto", "la voiture"),
           ("the door", "die tür", "la porte"), ("the ball", "den ball", "le ballon")]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def toy_triples() -> list[tuple[str, str, str]]:
    return [tuple(f"{s[i]} {v[i]} {o[i]} ." for i in range(3))
            for s, v, o in itertools.product(SUBJECTS, VERBS, OBJECTS)]


def write_toy_multi30k(directory: Path) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    rows = toy_triples()
    for split, part in (("train", rows), ("test_2016_flickr", rows[::4])):
        for i, lang in enumerate(("en", "de", "fr")):
            (directory / f"{split}.{lang}").write_text("\n".join(r[i] for r in part) + "\n", encoding="utf-8")
    return directory


TINY = {"pairs": 64, "vocab_size": 60, "cpus": 1, "teacher_d_model": 32, "teacher_d_ff": 64, "teacher_layers": 1,
        "teacher_epochs": 4, "student_d_model": 16, "student_d_ff": 32, "student_layers": 1, "student_epochs": 2,
        "batch_size": 16, "num_beams": 2, "max_tokens": 12, "test_rows": 16, "rows_per_shard": 32}


def test_seqkd_student_vocabulary_covers_the_teachers_hypotheses(tmp_path):
    """Without a teacher input, a Seq-KD student trains its own sentencepiece. It must see the
    hypotheses (the target language), not only the sources: before the fix it was trained on
    French sources and empty references, so German-only characters (ü, ß) became <unk>."""
    import pyarrow as pa

    from pipeline.testing import make_artifact, make_context
    from stages.train_seq2seq import TrainSeq2SeqStage

    rows = toy_triples()
    ids = [f"p{i:03d}" for i in range(len(rows))]
    german = [de.replace("ein mann", "ein großer mann").replace("sieht", "grüßt") for _, de, _ in rows]
    data = make_artifact(tmp_path / "data", pa.table({"id": ids, "fr": [fr for _, _, fr in rows]}))
    labels = make_artifact(tmp_path / "labels", pa.table({
        "id": ids, "hyp_text": pa.array([[g] for g in german], pa.list_(pa.string())),
        "hyp_ids": pa.array([[[1]] for _ in ids], pa.list_(pa.list_(pa.int32())))}))
    ctx = make_context(tmp_path, inputs={"data": [data], "labels": [labels]}, name="zs")
    cfg = TrainSeq2SeqStage.Config(target="seqkd", source_column="fr", vocab_size=60,
                                   model={"d_model": 16, "d_ff": 32, "num_layers": 1, "num_decoder_layers": 1},
                                   train={"epochs": 1, "max_steps": 1, "batch_size": 16, "warmup_steps": 0})
    TrainSeq2SeqStage(config=cfg).run(ctx)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(ctx.out_dir / "student"))
    encoded = tok(german)["input_ids"]
    assert all(tok.unk_token_id not in ids_ for ids_ in encoded)
    assert tok.decode(encoded[0], skip_special_tokens=True) == german[0]


def _seq2seq_dir(tmp_path: Path, name: str, pairs: list[tuple[str, str]]) -> Path:
    """A briefly trained train_seq2seq student folder on (source, target) pairs."""
    import pyarrow as pa

    from pipeline.testing import make_artifact, make_context
    from stages.train_seq2seq import TrainSeq2SeqStage

    data = make_artifact(tmp_path / f"{name}-data", pa.table({
        "id": [f"{name}{i}" for i in range(len(pairs))], "text": [s for s, _ in pairs], "de": [t for _, t in pairs]}))
    ctx = make_context(tmp_path, inputs={"data": [data]}, name=name)
    cfg = TrainSeq2SeqStage.Config(vocab_size=60, model={"d_model": 16, "d_ff": 32, "num_layers": 1,
                                                         "num_decoder_layers": 1},
                                   train={"epochs": 1, "max_steps": 2, "batch_size": 16, "warmup_steps": 0})
    TrainSeq2SeqStage(config=cfg).run(ctx)
    return ctx.out_dir


def test_chain_decodes_the_second_model_on_the_first_models_output(tmp_path):
    from kd.students import load_student
    from pipeline.testing import make_artifact, make_context
    from stages.chain_seq2seq import ChainSeq2SeqStage

    rows = toy_triples()
    fr_en = _seq2seq_dir(tmp_path, "first", [(fr, en) for en, _, fr in rows])
    en_de = _seq2seq_dir(tmp_path, "second", [(en, de) for en, de, _ in rows])
    first = make_artifact(tmp_path / "a1", files={str(p.relative_to(fr_en)): p.read_bytes()
                                                  for p in fr_en.rglob("*") if p.is_file()})
    second = make_artifact(tmp_path / "a2", files={str(p.relative_to(en_de)): p.read_bytes()
                                                   for p in en_de.rglob("*") if p.is_file()})
    ctx = make_context(tmp_path, inputs={"first": [first], "second": [second]}, name="chain")
    summary = ChainSeq2SeqStage(config=ChainSeq2SeqStage.Config(second_num_beams=2)).run(ctx)

    chain = load_student(ctx.out_dir / "student")
    one, two = load_student(fr_en / "student"), load_student(en_de / "student")
    texts = [fr for _, _, fr in rows[:8]]
    assert chain.task == "seq2seq"
    assert chain.predict(texts) == two.predict(one.predict(texts), num_beams=2)
    assert summary["parameters"] == one.num_parameters() + two.num_parameters()


def test_chain_refuses_a_classifier(tmp_path):
    from pipeline.testing import make_artifact, make_context
    from stages.chain_seq2seq import ChainSeq2SeqStage

    empty = make_artifact(tmp_path / "empty", files={"metrics.json": b"{}"})
    ctx = make_context(tmp_path, inputs={"first": [empty], "second": [empty]}, name="chain")
    with pytest.raises(FileNotFoundError, match="inputs.first"):
        ChainSeq2SeqStage(config=ChainSeq2SeqStage.Config()).run(ctx)


def test_zeroshot_manifest_plans_with_the_documented_inputs(tmp_path):
    """The zero-shot student reads French and teacher labels only, never the German side."""
    from pipeline.graph import build_graph
    from pipeline.manifest import load_manifest

    data = write_toy_multi30k(tmp_path / "multi30k")  # files laid out like shared/data/multi30k
    manifest = load_manifest(REPO / "manifests" / "zeroshot-fr-de.yaml", overrides={"multi30k": str(data)})
    stages = {s.name: s for s in manifest.stages}
    student = stages["student_zeroshot"]
    assert student.config["target"] == "seqkd" and student.config["source_column"] == "fr"
    assert "teacher" not in student.inputs  # own vocabulary over French + the teacher's German
    assert stages["labels"].inputs["data"] == stages["student_zeroshot"].inputs["data"] == "transfer"
    assert stages["teacher"].inputs["data"] == "teacher_half"
    build_graph(manifest)  # validates every stage, input and column


@pytest.mark.ray
@pytest.mark.slow
def test_zeroshot_manifest_runs_end_to_end(tmp_path, ray_session):
    from pipeline.artifact import Artifact
    from pipeline.graph import build_graph
    from pipeline.manifest import load_manifest
    from pipeline.runner import run_graph

    data = write_toy_multi30k(tmp_path / "multi30k")
    manifest = load_manifest(REPO / "manifests" / "zeroshot-fr-de.yaml",
                             overrides={"multi30k": str(data), **{k: str(v) for k, v in TINY.items()}})
    manifest.workdir = str(tmp_path / "wd")
    summary = run_graph(build_graph(manifest), progress=False, log=lambda *a: None)
    by_name = {s["name"]: s for s in summary}
    assert all(s["status"] == "ran" for s in summary), [(s["name"], s["status"]) for s in summary]

    teacher_ids = set(Artifact(by_name["teacher_half"]["path"]).read_table()["id"].to_pylist())
    transfer_ids = set(Artifact(by_name["transfer"]["path"]).read_table()["id"].to_pylist())
    assert teacher_ids and transfer_ids and not teacher_ids & transfer_ids
    assert len(teacher_ids | transfer_ids) == 64
    labelled = set(Artifact(by_name["labels"]["path"]).read_table()["id"].to_pylist())
    assert labelled == transfer_ids

    metrics = json.loads((Path(by_name["evaluate"]["path"]) / "files" / "metrics.json").read_text())
    names = {m["name"]: m for m in metrics["models"]}
    assert set(names) == {"student_zeroshot", "pivot", "ceiling_fr_de"} and metrics["rows"] == 16
    # evaluate read the test artifact and the three models it names, and every BLEU is
    # sacrebleu's on that model's own translations of it, recomputed here
    import sacrebleu

    from kd.students import load_student
    from stages.evaluate import model_dir

    evaluated = Artifact(by_name["evaluate"]["path"])
    assert [i["key"] for i in evaluated.manifest["inputs"]["data"]] == [Artifact(by_name["test"]["path"]).key]
    assert metrics["data"] == Artifact(by_name["test"]["path"]).key
    test = Artifact(by_name["test"]["path"]).read_table().slice(0, metrics["rows"])
    src, refs = test["fr"].to_pylist(), test["de"].to_pylist()
    for name, m in names.items():
        assert m["task"] == "seq2seq" and m["key"] == Artifact(by_name[name]["path"]).key, name
        hyps = load_student(model_dir(Path(by_name[name]["path"]))).predict(src, batch_size=64)
        assert m["metrics"]["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score, abs=1e-3), name
    assert names["pivot"]["type"] == "chain"
    teacher = json.loads((Path(by_name["evaluate_teacher"]["path"]) / "files" / "metrics.json").read_text())
    assert teacher["models"][0]["is_teacher"]
