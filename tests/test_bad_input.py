"""Bad input matrix: every case exits 2 with one `error: <where>: <what and how to fix>` line per
problem, before any compute starts (Ray is never initialised) and without touching the store.

Each case builds its files under tmp_path and returns the manifest (a dict, or raw YAML text).
The test drives the CLI in-process, hashes the whole tmp_path tree (store included) before and
after, and fails if the engine tries to start Ray.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

import pyarrow as pa
import pytest
import yaml

import pipeline.executor
from pipeline.cli import main
from pipeline.testing import make_artifact

from factories import tiny_bert_classifier, tiny_bert_encoder


def _tree_hash(root: Path) -> str:
    """Names, kinds and bytes of everything below root (symlinks by target)."""
    h = hashlib.sha256()
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        if path.is_symlink():
            h.update(f"L {rel} -> {path.readlink()}\n".encode())
        elif path.is_file():
            h.update(f"F {rel} ".encode() + hashlib.sha256(path.read_bytes()).digest() + b"\n")
        else:
            h.update(f"D {rel}\n".encode())
    return h.hexdigest()


@dataclasses.dataclass
class Case:
    id: str
    build: Callable[[Path], Any]  # tmp_path -> manifest dict or YAML text
    loc: str  # the location the first error line must start with (after "error: ")
    fix: tuple[str, ...]  # words of the advice, lower-cased match
    args: tuple[str, ...] = ()
    problems: int = 1
    missing: str | None = None  # behaviour not implemented yet: strict xfail with this reason


def _tsv(tmp: Path, rows: list[tuple[str, Any]], header: str = "sentence\tlabel", name: str = "c.tsv") -> Path:
    path = tmp / name
    path.write_text("\n".join([header] + [f"{t}\t{lab}" for t, lab in rows]) + "\n", encoding="utf-8")
    return path


GOOD_ROWS = [("a warm funny film", 1), ("a dull mess", 0), ("the cast is terrific", 1), ("so boring", 0)]


def _read(tmp: Path, **config: Any) -> dict:
    cfg = {"path": str(_tsv(tmp, GOOD_ROWS)), "text_column": "sentence", "label_column": "label"}
    cfg.update(config)
    return {"name": "read", "type": "read", "config": cfg}


def _m(tmp: Path, *stages: dict, **top: Any) -> dict:
    return {"name": "bad", "workdir": str(tmp / "wd"), **top, "stages": list(stages)}


def _split(name: str = "split", data: Any = "read", **config: Any) -> dict:
    spec: dict[str, Any] = {"name": name, "type": "split", "config": {"fraction": 0.5, **config}}
    if data is not None:
        spec["inputs"] = {"data": data} if isinstance(data, str) else data
    return spec


def _label(teacher: Path, data: str = "read", **config: Any) -> dict:
    return {"name": "label", "type": "label", "inputs": {"data": data},
            "config": {"teacher": str(teacher), **config}}


def _tag() -> dict:
    return {"name": "tag", "type": "pos_tag", "inputs": {"data": "read"}}


def _without_tokenizer(tmp: Path) -> Path:
    d = tiny_bert_classifier(tmp / "notok")
    for f in d.iterdir():
        if f.name.startswith(("vocab", "tokenizer", "special_tokens")):
            f.unlink()
    return d


def _remote_code_model(tmp: Path) -> Path:
    """A local model dir whose config asks for custom code (auto_map, unknown model_type)."""
    d = tmp / "remote_model"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({
        "model_type": "kdpipe_evil", "architectures": ["EvilForSequenceClassification"],
        "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                     "AutoModelForSequenceClassification": "modeling_evil.EvilForSequenceClassification"}}))
    (d / "modeling_evil.py").write_text("raise SystemExit('remote code must never run')\n")
    (d / "vocab.txt").write_text("[PAD]\n[UNK]\n")
    (d / "model.safetensors").write_bytes(b"")
    return d


CASES = [
    # --- manifest structure ---------------------------------------------------------------
    Case("unknown_stage_type", lambda t: _m(t, {**_read(t), "type": "raed"}), "stages[0].type", ("did you mean 'read'",)),
    Case("unknown_config_key", lambda t: _m(t, _read(t, rows_per_shrad=5)), "stages[0].config.rows_per_shrad",
         ("remove it", "kdpipe schema")),
    Case("wrong_type", lambda t: _m(t, _read(t, rows_per_shard="many")), "stages[0].config.rows_per_shard",
         ("valid integer",)),
    Case("out_of_range_fraction", lambda t: _m(t, _read(t), _split(fraction=1.5)), "stages[1].config.fraction",
         ("less than or equal to 1",)),
    Case("out_of_range_rows_per_shard", lambda t: _m(t, _read(t, rows_per_shard=0)),
         "stages[0].config.rows_per_shard", ("greater than 0",)),
    Case("cycle", lambda t: _m(t, _read(t), _split("a", data="b"), _split("b", data="a")), "stages[1].inputs",
         ("cycle: a -> b -> a", "may only read")),
    Case("input_names_unknown_stage", lambda t: _m(t, _read(t), _split(data="raed")), "stages[1].inputs.data",
         ("did you mean 'read'",)),
    Case("required_input_missing", lambda t: _m(t, _read(t), _split(data=None)), "stages[1].inputs",
         ("add `inputs: {data:",)),
    Case("unknown_input_role", lambda t: _m(t, _read(t), _split(data={"data": "read", "teacher": "read"})),
         "stages[1].inputs.teacher", ("it takes: data",)),
    Case("self_input", lambda t: _m(t, _read(t), _split(data="split")), "stages[1].inputs.data",
         ("cannot read its own output",)),
    Case("duplicate_stage_name", lambda t: _m(t, _read(t), {**_read(t)}), "stages[1].name", ("must be unique",)),
    Case("stage_type_missing", lambda t: _m(t, {"name": "read", "config": {}}), "stages[0].type",
         ("required key is missing",)),
    Case("no_stages", lambda t: {"name": "bad", "workdir": str(t / "wd"), "stages": []}, "stages",
         ("at least 1",)),
    Case("manifest_not_a_mapping", lambda t: "- name: read\n  type: read\n", "{manifest}", ("yaml mapping",)),
    Case("stage_name_dotdot", lambda t: _m(t, {**_read(t), "name": "../../etc"}), "stages[0].name", ("no '..'",)),
    Case("stage_name_absolute", lambda t: _m(t, {**_read(t), "name": "/tmp/x"}), "stages[0].name", ("no '/'",)),
    Case("run_name_escapes", lambda t: {**_m(t, _read(t)), "name": "a/../../b"}, "name", ("no '/'",)),
    Case("unknown_variable", lambda t: _m(t, _read(t, path="${corpus_dir}/c.tsv")), "stages[0].config.path",
         ("define it under `vars:`", "--var corpus_dir=")),
    Case("var_override_not_declared", lambda t: _m(t, _read(t)), "--var nope", ("no variable 'nope'",),
         args=("--var", "nope=1")),
    Case("var_override_malformed", lambda t: _m(t, _read(t), vars={"x": 1}), "--var x", ("name=value",),
         args=("--var", "x")),
    Case("only_unknown_stage", lambda t: _m(t, _read(t)), "--only", ("stages: read",), args=("--only", "raed")),
    Case("malformed_yaml", lambda t: "name: bad\nstages: [\n  - {name: read, type: read\n", "{manifest}:",
         ("malformed yaml",)),
    Case("manifest_not_utf8", lambda t: b"name: caf\xe9\nstages: []\n", "{manifest}", ("not utf-8",)),
    Case("manifest_file_missing", lambda t: None, "{manifest}", ("not found",)),
    Case("workdir_is_a_file", lambda t: _m(t, _read(t), workdir=str(_tsv(t, GOOD_ROWS, name="f.tsv"))),
         "workdir", ("choose another `workdir:`",)),
    Case("workdir_under_a_file", lambda t: _m(t, _read(t), workdir=str(_tsv(t, GOOD_ROWS, name="f.tsv") / "wd")),
         "workdir", ("choose another `workdir:`",)),
    # --- input data (read stage) ----------------------------------------------------------
    Case("missing_file", lambda t: _m(t, _read(t, path=str(t / "nope.tsv"))), "stages[0].config.path",
         ("file not found", "relative to the directory")),
    Case("empty_corpus", lambda t: _m(t, _read(t, path=str(_write(t, "empty.txt", "")), format="text",
                                             label_column=None, text_column="text")),
         "stages[0].config.path", ("empty",)),
    Case("empty_csv", lambda t: _m(t, _read(t, path=str(_write(t, "e.csv", "")))),
         "stages[0].config.path", ("expected a header line",)),
    Case("non_utf8_bytes", lambda t: _m(t, _read(t, path=str(_latin1(t)))), "stages[0].config.path",
         ("iconv",)),
    Case("missing_text_column", lambda t: _m(t, _read(t, text_column="text")), "stages[0].config.text_column",
         ("it has: label, sentence",)),
    Case("missing_label_column", lambda t: _m(t, _read(t, label_column="gold")), "stages[0].config.label_column",
         ("it has: label, sentence",)),
    Case("label_index_outside_label_names", lambda t: _m(t, _read(t, path=str(_tsv(t, [*GOOD_ROWS, ("meh", 2)], name="l.tsv")),
                                                                label_names=["neg", "pos"])),
         "stages[0].config.label_names", ("outside 0..1",)),
    Case("label_name_outside_label_names", lambda t: _m(t, _read(t, path=str(_tsv(
        t, [("good", "pos"), ("bad", "neg"), ("meh", "neutral")], name="s.tsv")), label_names=["neg", "pos"])),
         "stages[0].config.label_names", ("neutral",)),
    Case("row_without_label", lambda t: _m(t, _read(t, path=str(_tsv(t, [*GOOD_ROWS, ("meh", "")], name="l.tsv"))),),
         "stages[0].config.label_column", ("no label",)),
    Case("duplicate_ids", lambda t: _m(t, _read(t, path=str(_tsv(t, [("1", "a"), ("1", "b")], header="id\tsentence", name="d.tsv")),
                                                label_column=None, id_column="id")),
         "stages[0].config.id_column", ("must be unique",)),
    Case("invalid_jsonl_line", lambda t: _m(t, _read(t, path=str(_write(t, "c.jsonl", '{"text": "ok"}\n{oops\n')),
                                                      text_column="text", label_column=None)),
         "stages[0].config.path", ("invalid json",)),
    Case("parallel_files_not_aligned", lambda t: _m(t, _read(t, path=None, label_column=None, text_column="en",
                                                             files={"en": str(_write(t, "a.en", "a\nb\n")),
                                                                    "de": str(_write(t, "a.de", "a\n"))})),
         "stages[0].config.files", ("line-aligned",)),
    Case("format_needs_path", lambda t: _m(t, _read(t, path=None)), "stages[0].config", ("needs `path:`",)),
    # --- models and tools -----------------------------------------------------------------
    Case("spacy_model_not_installed", lambda t: _m(t, _read(t, text_column="sentence"),
                                                   {"name": "tag", "type": "pos_tag", "inputs": {"data": "read"},
                                                    "config": {"spacy_model": "xx_kdpipe_missing_sm"}}),
         "stages[1].config.spacy_model", ("not installed", "spacy download xx_kdpipe_missing_sm")),
    Case("remote_code_without_trust", lambda t: _m(t, _read(t), {
        "name": "teacher", "type": "finetune", "inputs": {"data": "read"},
        "config": {"base_model": str(_remote_code_model(t))}}), "stages[1].config", ("trust_remote_code",)),
    # --- teachers (label stage) -------------------------------------------------------------
    Case("teacher_path_missing", lambda t: _m(t, _read(t), _label(t / "no_teacher")), "stages[1].config.teacher",
         ("not found", "config.json")),
    Case("teacher_without_classification_head", lambda t: _m(t, _read(t), _label(tiny_bert_encoder(t / "enc"))),
         "stages[1].config.teacher", ("head", "finetune", "allow_new_head")),
    Case("teacher_tokenizer_missing", lambda t: _m(t, _read(t), _label(_without_tokenizer(t))),
         "stages[1].config.teacher", ("no tokenizer files", "tokenizer.save_pretrained")),
    Case("teacher_remote_code_without_trust", lambda t: _m(t, _read(t), _label(_remote_code_model(t))),
         "stages[1].config.teacher", ("custom code", "trust_remote_code: true")),
    Case("seq2seq_teacher_not_encoder_decoder", lambda t: _m(t, _read(t), _label(
        tiny_bert_classifier(t / "cls"), task="seq2seq")), "stages[1].config.teacher", ("encoder-decoder",)),
    Case("label_text_column_missing", lambda t: _m(t, _read(t), _label(tiny_bert_classifier(t / "cls"),
                                                                       text_column="sentence")),
         "stages[1].config.text_column", ("it has: id, text, label",)),
    Case("teacher_label_count_differs_from_data", lambda t: _m(
        t, _read(t, label_names=["neg", "pos"]), _label(tiny_bert_classifier(t / "cls3", num_labels=3))),
         "stages[1].config.teacher", ("3 labels", "use a teacher trained on these labels")),
    Case("mask_token_unknown_to_teacher", lambda t: _m(
        t, _read(t), _tag(), {"name": "uni", "type": "unigram", "inputs": {"data": "tag"}},
        {"name": "aug", "type": "augment", "inputs": {"data": "tag", "table": "uni"},
         "config": {"mask_token": "<mask>"}}, _label(tiny_bert_classifier(t / "cls"), data="aug")),
         "stages[3].config.mask_token", ("[mask]",)),
    Case("finetune_base_model_missing", lambda t: _m(t, _read(t), {
        "name": "teacher", "type": "finetune", "inputs": {"data": "read"},
        "config": {"base_model": str(t / "no_such_model")}}), "stages[1].config.base_model", ("does not exist",)),
]


def _write(tmp: Path, name: str, text: str) -> Path:
    path = tmp / name
    path.write_text(text, encoding="utf-8")
    return path


def _latin1(tmp: Path) -> Path:
    path = tmp / "latin1.tsv"
    path.write_bytes("sentence\tlabel\nun café très noir\t1\n".encode("latin-1"))
    return path


@pytest.fixture
def no_ray(monkeypatch):
    """Validation must finish before compute: starting Ray at all fails the test."""
    def refuse(**kwargs):
        raise AssertionError("Ray was started for a manifest that should fail validation")

    monkeypatch.setattr(pipeline.executor, "init_ray", refuse)


def _write_manifest(tmp: Path, raw: Any) -> Path:
    path = tmp / "manifest.yaml"
    if raw is None:
        return path  # the case is a missing manifest
    if isinstance(raw, bytes):
        path.write_bytes(raw)
    else:
        path.write_text(raw if isinstance(raw, str) else yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


@pytest.mark.parametrize("command", ["run", "plan"])
@pytest.mark.parametrize("case", [
    pytest.param(c, id=c.id, marks=[pytest.mark.xfail(strict=True, reason=c.missing)] if c.missing else [])
    for c in CASES])
def test_bad_input_exits_2_with_one_line_and_no_side_effects(case: Case, command, tmp_path, capsys, no_ray):
    # A store holding an earlier artifact, which must come out byte-identical.
    make_artifact(tmp_path / "wd" / "artifacts" / "read" / "0123456789abcdef0123",
                  pa.table({"id": ["x"], "text": ["earlier run"]}))
    manifest = _write_manifest(tmp_path, case.build(tmp_path))
    before = _tree_hash(tmp_path)
    capsys.readouterr()  # drop what building the inputs printed (model-saving progress bars)

    code = main([command, str(manifest), *case.args])

    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == case.problems, err
    assert all(line.startswith("error: ") for line in err), err
    first = err[0][len("error: "):]
    loc = case.loc.replace("{manifest}", str(manifest))
    assert first.startswith(loc), f"expected the problem at {loc!r}, got: {first}"
    advice = first[len(loc):].lower()
    for word in case.fix:
        assert word.lower() in advice, f"the message should say how to fix it ({word!r}): {first}"
    assert _tree_hash(tmp_path) == before, "a failed validation must not write anything"


def test_matrix_size():
    assert len(CASES) >= 25


def test_every_problem_of_a_manifest_is_reported_at_once(tmp_path, capsys, no_ray):
    raw = _m(tmp_path, _read(tmp_path, rows_per_shard=0), _split(fraction=2),
             {"name": "x", "type": "nope"})
    manifest = _write_manifest(tmp_path, raw)
    assert main(["run", str(manifest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert [line.split(":")[0] for line in err] == [
        "error", "error", "error"] and [line.split()[1] for line in err] == [
        "stages[0].config.rows_per_shard:", "stages[1].config.fraction:", "stages[2].type:"]


def test_python_yaml_tags_are_rejected_and_never_executed(tmp_path, capsys, no_ray):
    marker = tmp_path / "pwned"
    text = ("name: bad\nstages:\n  - name: read\n    type: read\n    config: !!python/object/apply:os.system\n"
            f"      [\"touch {marker}\"]\n")
    manifest = _write_manifest(tmp_path, text)
    assert main(["run", str(manifest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {manifest}:") and "python/object" in err[0]
    assert not marker.exists()


def test_disk_full_during_shard_write_leaves_no_marker_and_no_shard(tmp_path, monkeypatch):
    import pyarrow.parquet as pq

    from pipeline.artifact import completed_shards, write_shard

    table = pa.table({"id": ["a", "b"], "text": ["x", "y"]})
    write_shard(tmp_path, 0, table, {})
    real_write = pq.write_table

    def full_disk(tbl, where, **kwargs):
        real_write(tbl.slice(0, 1), where, **kwargs)  # a partial file hits the disk first
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pq, "write_table", full_disk)
    with pytest.raises(OSError) as exc:
        write_shard(tmp_path, 1, table, {})
    assert exc.value.errno == errno.ENOSPC
    assert sorted(p.name for p in (tmp_path / "shards").iterdir()) == ["00000.parquet"]  # no temp file either
    assert sorted(p.name for p in (tmp_path / "completions").iterdir()) == ["00000.json"]
    assert list(completed_shards(tmp_path)) == [0]
