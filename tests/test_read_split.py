"""`read_tasks: N` on text, jsonl and tsv files: N tasks read byte ranges and write exactly the
shards one task writes; each part parses only its own lines; resume re-reads only missing shards."""
from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifact import Artifact
from pipeline.errors import ManifestError, StageFailed
from pipeline.executor import Executor
from pipeline.graph import build_graph
from pipeline.manifest import parse_manifest
from pipeline.plan import make_plan
from pipeline.runner import run_graph
from pipeline.testing import make_context
from stages.read import ReadError, ReadStage

# Multi-byte UTF-8, and characters str.splitlines() would split at (U+2028, U+0085, form feed).
TEXTS = ["plain ascii", "café crème brûlée", "日本語の文です", "emoji 🙂 ok", "line\u2028separator",
         "next\u0085line", "form\x0cfeed"]
ROWS, PER = 23, 4  # 6 shards, the last one short


def corpus(tmp_path: Path, fmt: str, *, rows: int = ROWS, label=lambda i: i % 3) -> Path:
    """A file with a BOM, mixed LF/CRLF line ends, blank lines (rows in text format, skipped in
    jsonl and tsv), whitespace-only lines, and no newline after its last line."""
    lines = ["sentence\tlabel"] if fmt == "tsv" else []
    for i in range(rows):
        text = f"row {i} {TEXTS[i % len(TEXTS)]}"
        lines.append({"text": text, "jsonl": json.dumps({"sentence": text, "label": label(i)}, ensure_ascii=False),
                      "tsv": f"{text}\t{label(i)}"}[fmt])
        if i % 5 == 1:
            lines.append("")
        if i % 7 == 3 and fmt == "jsonl":
            lines.append("  \t ")
        if i == 9 and fmt != "text":  # one of them ends "\r\r\n": csv.DictReader skips it too
            lines += ["\r", "\r"]
    body = "".join(line + ("\r\n" if k % 2 else "\n") for k, line in enumerate(lines[:-1])) + lines[-1]
    path = tmp_path / f"corpus.{'txt' if fmt == 'text' else fmt}"
    path.write_bytes(b"\xef\xbb\xbf" + body.encode("utf-8"))
    return path


def config(path: Path, fmt: str, **extra) -> dict:
    columns = {} if fmt == "text" else {"text_column": "sentence", "label_column": "label"}
    return {"path": str(path), "format": fmt, "rows_per_shard": PER, **columns, **extra}


def manifest(tmp_path: Path, cfg: dict, *, workdir: str) -> dict:
    return {"name": "split", "workdir": str(tmp_path / workdir),
            "stages": [{"name": "read", "type": "read", "config": cfg}]}


def run(m: dict) -> dict:
    return run_graph(build_graph(parse_manifest(m)), progress=False, log=lambda *a: None)[0]


def shards(path: str) -> list[pa.Table]:
    art = Artifact(path)
    return [art.read_shard(i) for i in art.check_shards()]


def assert_same_shards(a: list[pa.Table], b: list[pa.Table]) -> None:
    assert len(a) == len(b)
    for i, (x, y) in enumerate(zip(a, b)):
        assert x.schema.remove_metadata() == y.schema.remove_metadata(), f"shard {i}: schema differs"
        assert x.equals(y), f"shard {i} differs"
        # Provenance metadata is the same but for the config, which records read_tasks itself.
        mx, my = (dict(t.schema.metadata) for t in (x, y))
        assert {k: v for k, v in mx.items() if k != b"kdpipe.config"} == \
            {k: v for k, v in my.items() if k != b"kdpipe.config"}


@pytest.mark.parametrize("fmt", ["text", "jsonl", "tsv"])
def test_byte_ranges_give_the_shards_one_task_writes(tmp_path, ray_session, fmt):
    path = corpus(tmp_path, fmt)
    one = run(manifest(tmp_path, config(path, fmt, read_tasks=1), workdir="wd1"))
    three = run(manifest(tmp_path, config(path, fmt, read_tasks=3), workdir="wd3"))
    assert (one["read_tasks"], three["read_tasks"]) == (1, 3)
    assert one["key"] == three["key"]
    expected_rows = ROWS + (ROWS // 5 + 1 if fmt == "text" else 0)  # blank lines are rows of a text file
    assert one["rows"] == three["rows"] == expected_rows
    a, b = shards(one["path"]), shards(three["path"])
    assert_same_shards(a, b)
    texts = pa.concat_tables(b).column("text").to_pylist()
    assert texts[0] == "row 0 plain ascii"  # the BOM is not part of the first row
    assert "row 4 line\u2028separator" in texts and "row 5 next\u0085line" in texts
    assert not any(t.endswith("\r") for t in texts)
    if fmt != "text":
        assert pa.concat_tables(b).column("label").to_pylist() == [i % 3 for i in range(ROWS)]
        assert b[0].schema.field("label").type == pa.int64()


@pytest.mark.parametrize("fmt", ["text", "jsonl", "tsv"])
def test_a_part_reads_only_its_own_bytes(tmp_path, fmt):
    """read_rows of a middle range equals that slice of the whole read and never parses a byte
    before its offset (a byte broken there goes unnoticed, while the whole read stumbles on
    it); it checks the bytes it parses against the driver's index, not the file's mtime."""
    path = corpus(tmp_path, fmt)
    original = path.read_bytes()
    stage = ReadStage(config=ReadStage.Config(**config(path, fmt, read_tasks=3)))
    ctx = make_context(tmp_path)
    whole = stage.read(ctx)
    index = stage.index_rows(rows_per_shard=PER)
    assert index.rows == whole.num_rows and len(index.starts) == -(-index.rows // PER)
    assert index.fingerprint == stage.fingerprint()
    middle = stage.read_rows(ctx, start=2 * PER, stop=4 * PER, at=index.starts[2:4])
    assert middle.equals(whole.slice(2 * PER, 2 * PER))
    assert stage.read_rows(ctx, start=2 * PER, stop=4 * PER).equals(middle)  # no index: it finds the offset
    last = stage.read_rows(ctx, start=5 * PER, stop=index.rows, at=index.starts[5:])
    assert last.equals(whole.slice(5 * PER))

    data = bytearray(original)
    data[index.starts[1].offset] = 0xFF  # first byte of row 4, before the middle range
    path.write_bytes(bytes(data))
    assert stage.read_rows(ctx, start=2 * PER, stop=4 * PER, at=index.starts[2:4]).equals(middle)
    with pytest.raises(ReadError, match=f"not UTF-8 \\(byte 0xff at line {index.starts[1].line}\\)"):
        stage.read(ctx)
    with pytest.raises(ReadError, match=f"not UTF-8 \\(byte 0xff at line {index.starts[1].line}\\)"):
        stage.index_rows(rows_per_shard=PER)  # the driver's scan names the same line

    path.write_bytes(original)
    os.utime(path, ns=(10**18, 10**18))  # another node's copy: same bytes, another mtime
    assert stage.read_rows(ctx, start=2 * PER, stop=4 * PER, at=index.starts[2:4]).equals(middle)
    row = next(i for i, t in enumerate(whole.column("text").to_pylist()) if t.startswith("row 10 "))
    shard = row // PER  # 2 or 3: in the middle range
    path.write_bytes(original.replace(b"row 10 ", b"row 01 "))  # same size, other text
    with pytest.raises(ReadError, match=f"rows from line {index.starts[shard].line} \\(row {shard * PER}\\) differ "
                                        "from those the read stage indexed"):
        stage.read_rows(ctx, start=2 * PER, stop=4 * PER, at=index.starts[2:4])
    if fmt == "tsv":  # the header is part of what each shard is parsed from
        path.write_bytes(original.replace(b"sentence\tlabel", b"sentence\tLabel"))
        with pytest.raises(ReadError, match=f"rows from line {index.starts[2].line} \\(row 8\\) differ"):
            stage.read_rows(ctx, start=2 * PER, stop=4 * PER, at=index.starts[2:4])
    path.write_bytes(original[:index.starts[3].offset + 3])  # cut short
    with pytest.raises(ReadError, match="expected 8 rows .* found 5; the file changed after the read stage indexed"):
        stage.read_rows(ctx, start=2 * PER, stop=4 * PER, at=index.starts[2:4])


def test_a_source_changed_between_plan_and_read_is_refused(tmp_path):
    path = corpus(tmp_path, "jsonl")
    graph = build_graph(parse_manifest(manifest(tmp_path, config(path, "jsonl", read_tasks=3), workdir="wd")))
    plan = make_plan(graph)[0]
    path.write_bytes(path.read_bytes().replace(b"row 3", b"row 9"))
    with pytest.raises(StageFailed, match="source changed since it was planned"):
        Executor(graph).run_stage(plan, {})
    assert not list(Path(plan.art_dir).rglob("*.parquet"))  # nothing written under the planned key


@pytest.mark.parametrize("fmt", ["parquet", "jsonl"])
def test_resume_rereads_only_missing_shards(tmp_path, ray_session, fmt):
    """Shards deleted (or never written by a killed run): the rerun reads only those, and the
    artifact equals an uninterrupted run's."""
    if fmt == "parquet":
        path = tmp_path / "corpus.parquet"
        pq.write_table(pa.table({"sentence": [f"sentence {i}" for i in range(ROWS)],
                                 "label": pa.array([i % 3 for i in range(ROWS)], pa.int64())}), path, row_group_size=5)
    else:
        path = corpus(tmp_path, fmt)
    clean = run(manifest(tmp_path, config(path, fmt, read_tasks=1), workdir="clean"))
    m = manifest(tmp_path, config(path, fmt, read_tasks=3), workdir="wd")
    first = run(m)
    art = Artifact(first["path"])
    kept = {i: os.stat(art.shard_path(i)).st_mtime_ns for i in (0, 2, 3, 5)}
    for i in (1, 4):  # a middle shard of two different parts
        Path(art.shard_path(i)).unlink()
        (Path(first["path"]) / "completions" / f"{Path(art.shard_path(i)).stem}.json").unlink()
    (Path(first["path"]) / "manifest.json").unlink()  # as a run killed before it finished leaves it
    again = run(m)
    assert again["status"] == "resumed" and again["shards_run"] == 2 and again["read_tasks"] == 2
    assert {i: os.stat(art.shard_path(i)).st_mtime_ns for i in kept} == kept
    assert_same_shards(shards(clean["path"]), shards(again["path"]))
    assert run(m)["status"] == "cached"


def test_csv_in_parts_is_refused_at_plan(tmp_path):
    path = tmp_path / "c.csv"
    path.write_text("sentence,label\n" + "".join(f'"row {i}",{i % 2}\n' for i in range(10)))
    with pytest.raises(ManifestError, match=r"read_tasks.*format 'csv' \(quoted fields may span lines"):
        build_graph(parse_manifest(manifest(tmp_path, config(path, "csv", read_tasks=3), workdir="wd")))


def test_tsv_string_labels_in_parts_need_label_names(tmp_path, ray_session, monkeypatch):
    """A part's labels must be integers (or names in label_names): their type cannot depend on
    which rows a part holds. Plan catches it in the head it checks; a task in the rows past it."""
    names = {0: "neg", 1: "pos"}
    path = corpus(tmp_path, "tsv", label=lambda i: names[i % 2])
    with pytest.raises(ManifestError, match="read_tasks > 1 needs integer labels or label_names "
                                            r"\(row 0 has label 'neg'\); set label_names or read_tasks: 1"):
        build_graph(parse_manifest(manifest(tmp_path, config(path, "tsv", read_tasks=3), workdir="wd")))
    named = run(manifest(tmp_path, config(path, "tsv", read_tasks=3, label_names=["neg", "pos"]), workdir="wd"))
    assert pa.concat_tables(shards(named["path"])).column("label").to_pylist() == [i % 2 for i in range(ROWS)]

    import stages.read as read_mod

    monkeypatch.setattr(read_mod, "VALIDATE_BYTES", 10)  # plan checks the first 5 rows only
    monkeypatch.setattr(read_mod, "VALIDATE_ROWS", 5)
    late = corpus(tmp_path, "tsv", label=lambda i: "x" if i == 17 else i % 2)
    with pytest.raises(ReadError, match=r"row 17 has label 'x'\); set label_names or read_tasks: 1"):
        run(manifest(tmp_path, config(late, "tsv", read_tasks=3), workdir="wd2"))
