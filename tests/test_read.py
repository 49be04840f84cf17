"""The read stage on every input format, without Ray: same rows, stable ids, clear errors."""
from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.testing import make_context
from stages.read import ReadError, ReadStage

ROWS = [("a warm , funny film", "pos"), ("a dull mess", "neg"), ("the cast is terrific", "pos")]


def read(tmp_path, **config) -> pa.Table:
    stage = ReadStage(config=ReadStage.Config(**config))
    assert stage.validate(input_columns={}) == []
    return stage.read(make_context(tmp_path))


@pytest.fixture
def files(tmp_path):
    (tmp_path / "c.jsonl").write_text("".join(json.dumps({"sentence": t, "y": y, "src": "web"}) + "\n" for t, y in ROWS))
    (tmp_path / "c.csv").write_text("sentence,y,src\n" + "".join(f'"{t}",{y},web\n' for t, y in ROWS))
    (tmp_path / "c.tsv").write_text("sentence\ty\tsrc\n" + "".join(f"{t}\t{y}\tweb\n" for t, y in ROWS))
    pq.write_table(pa.table({"sentence": [t for t, _ in ROWS], "y": [y for _, y in ROWS], "src": ["web"] * 3}),
                   tmp_path / "c.parquet")
    return tmp_path


@pytest.mark.parametrize("suffix", ["jsonl", "csv", "tsv", "parquet"])
def test_tabular_formats_give_the_same_table(files, suffix):
    table = read(files, path=str(files / f"c.{suffix}"), text_column="sentence", label_column="y",
                 columns=["src"], label_names=["neg", "pos"])
    assert table.column_names == ["id", "text", "label", "src"]
    assert table.column("text").to_pylist() == [t for t, _ in ROWS]
    assert table.column("label").to_pylist() == [1, 0, 1]  # named labels -> index in label_names
    assert table.column("src").to_pylist() == ["web"] * 3
    ids = table.column("id").to_pylist()
    assert len(set(ids)) == 3
    # ids depend on the file name, row and text, not on the format's parsing path
    other = read(files, path=str(files / f"c.{suffix}"), text_column="sentence", label_column="y",
                 columns=["src"], label_names=["neg", "pos"])
    assert other.column("id").to_pylist() == ids


def test_plain_text_and_parallel_files(tmp_path):
    (tmp_path / "a.en").write_text("Two dogs play.\nA man reads.\n")
    (tmp_path / "a.de").write_text("Zwei Hunde spielen.\nEin Mann liest.\n")
    text = read(tmp_path, path=str(tmp_path / "a.en"), format="text")
    assert text.column("text").to_pylist() == ["Two dogs play.", "A man reads."]
    pairs = read(tmp_path, files={"en": str(tmp_path / "a.en"), "de": str(tmp_path / "a.de")}, text_column="en")
    assert pairs.column_names == ["id", "text", "de"]
    assert pairs.column("de").to_pylist() == ["Zwei Hunde spielen.", "Ein Mann liest."]
    (tmp_path / "b.de").write_text("nur eine Zeile\n")
    with pytest.raises(ReadError, match="not line-aligned"):
        ReadStage(config=ReadStage.Config(files={"en": str(tmp_path / "a.en"), "de": str(tmp_path / "b.de")},
                                          text_column="en")).build_table()


def test_lines_end_at_newline_only(tmp_path):
    """U+2028, U+2029, U+0085, form feed and \\x1c-\\x1e inside a line are text, not line ends (as
    str.splitlines() made them): a JSON string holding one is one row, a sentence is one row."""
    odd = "one\u2028two\u2029three\x85four\x0cfive\x1csix"
    (tmp_path / "u.jsonl").write_text(json.dumps({"text": odd}, ensure_ascii=False) + "\n"
                                      + json.dumps({"text": "next"}) + "\r\n", encoding="utf-8")
    assert read(tmp_path, path=str(tmp_path / "u.jsonl")).column("text").to_pylist() == [odd, "next"]
    (tmp_path / "u.txt").write_text(f"{odd}\nnext\r\n", encoding="utf-8", newline="")
    assert read(tmp_path, path=str(tmp_path / "u.txt")).column("text").to_pylist() == [odd, "next"]
    (tmp_path / "u.de").write_text("eins\nzwei\n", encoding="utf-8")
    pairs = read(tmp_path, files={"en": str(tmp_path / "u.txt"), "de": str(tmp_path / "u.de")}, text_column="en")
    assert pairs.column("de").to_pylist() == ["eins", "zwei"]


def test_hf_datasets_from_a_saved_dataset_and_a_local_data_dir(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"sentence": [t for t, _ in ROWS], "label": [1, 0, 1], "idx": [10, 11, 12]})
    ds.save_to_disk(str(tmp_path / "saved"))
    table = read(tmp_path, hf={"name": str(tmp_path / "saved")}, text_column="sentence", label_column="label",
                 id_column="idx")
    assert table.column("id").to_pylist() == ["10", "11", "12"]
    assert table.column("label").to_pylist() == [1, 0, 1]

    folder = tmp_path / "csvdata"
    folder.mkdir()
    (folder / "train.csv").write_text("sentence,label\n" + "".join(f'"{t}",{i % 2}\n' for i, (t, _) in enumerate(ROWS)))
    table = read(tmp_path, hf={"name": str(folder), "split": "train"}, text_column="sentence", label_column="label")
    assert table.column("text").to_pylist() == [t for t, _ in ROWS]


def test_shuffle_and_limit_are_deterministic(files):
    kwargs = dict(path=str(files / "c.tsv"), text_column="sentence", shuffle=True, shuffle_seed=3, limit=2)
    a, b = read(files, **kwargs), read(files, **kwargs)
    assert a.equals(b) and a.num_rows == 2


@pytest.mark.parametrize("content,fix", [
    (b"sentence\tlabel\ncaf\xe9\t1\n", "not UTF-8"),
    (b"", "empty"),
    (b"sentence\tlabel\nok\t1\na\rb\t1\n", "bad.tsv:3: not a tab-separated line"),
])
def test_bad_files_are_reported_before_compute(tmp_path, content, fix):
    (tmp_path / "bad.tsv").write_bytes(content)
    problems = ReadStage(config=ReadStage.Config(path=str(tmp_path / "bad.tsv"), text_column="sentence",
                                                 label_column="label")).validate(input_columns={})
    assert len(problems) == 1 and problems[0].loc == "config.path" and fix in problems[0].message


def test_a_non_utf8_byte_after_a_bom_is_named_where_it_is(tmp_path):
    """The byte and line named are the file's own, not shifted by the 3-byte BOM."""
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfone\ntwo \xc3\xa9\nthr\xe9e\n")
    with pytest.raises(ReadError, match=r"not UTF-8 \(byte 0xe9 at line 3\)"):
        ReadStage(config=ReadStage.Config(path=str(tmp_path / "bom.txt"))).build_table()


def test_duplicate_ids_are_an_error(tmp_path):
    (tmp_path / "d.jsonl").write_text('{"id": 1, "text": "a"}\n{"id": 1, "text": "b"}\n')
    problems = ReadStage(config=ReadStage.Config(path=str(tmp_path / "d.jsonl"), id_column="id")).validate(input_columns={})
    assert problems and problems[0].loc == "config.id_column" and "unique" in problems[0].message


def test_plan_checks_only_the_head_of_a_large_corpus(tmp_path, monkeypatch):
    """`plan` must not load a large corpus on the driver: past VALIDATE_BYTES it checks the first
    VALIDATE_ROWS rows (columns, labels), and the read stage itself reports what lies further on."""
    import stages.read as read_mod

    monkeypatch.setattr(read_mod, "VALIDATE_BYTES", 100)
    monkeypatch.setattr(read_mod, "VALIDATE_ROWS", 5)
    path = tmp_path / "big.tsv"
    path.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{'' if i == 40 else i % 2}\n" for i in range(50)))
    stage = ReadStage(config=ReadStage.Config(path=str(path), text_column="sentence", label_column="label"))
    assert stage.validate(input_columns={}) == []
    with pytest.raises(read_mod.ReadError, match="row 40 has no label"):
        stage.build_table()
    wrong = ReadStage(config=ReadStage.Config(path=str(path), text_column="text", label_column="label"))
    assert [p.loc for p in wrong.validate(input_columns={})] == ["config.text_column"]


def test_read_tasks_on_a_source_that_cannot_be_split_is_refused(files):
    stage = ReadStage(config=ReadStage.Config(path=str(files / "c.csv"), text_column="sentence", read_tasks=2))
    problems = stage.validate(input_columns={})
    assert [p.loc for p in problems] == ["config.read_tasks"] and "format 'csv'" in problems[0].message
    for field, value in (("shuffle", True), ("limit", 2), ("id_column", "src"), ("columns", ["src"])):
        stage = ReadStage(config=ReadStage.Config(path=str(files / "c.jsonl"), text_column="sentence",
                                                  read_tasks=2, **{field: value}))
        problems = stage.validate(input_columns={})
        assert problems[0].loc == "config.read_tasks" and f"`{field}` is set" in problems[0].message
    (files / "p.en").write_text("one\ntwo\n")
    (files / "p.de").write_text("eins\nzwei\n")
    parallel = ReadStage(config=ReadStage.Config(files={"en": str(files / "p.en"), "de": str(files / "p.de")},
                                                 text_column="en", read_tasks=2))
    assert "format 'parallel' (it is not one file" in parallel.validate(input_columns={})[0].message
    parquet = ReadStage(config=ReadStage.Config(path=str(files / "c.parquet"), text_column="sentence",
                                                label_column="y", read_tasks=2))
    assert "not an integer" in parquet.validate(input_columns={})[0].message  # string labels: typed by all rows
