"""`read`: ingest a corpus into shards with columns `id`, `text`, optional `text_pair`, `label`,
and pass-through columns.

Formats: jsonl, csv, tsv, parquet, text (one example per line), parallel (line-aligned text
files, one per column, e.g. Multi30k `train.en` + `train.de`), and hf (a `datasets` dataset by
hub name/config/split/revision, or a local directory). Ids come from `id_column`, else a stable
hash of (source file name, row number, text), so they survive re-sharding and reordering.
Lines end at "\n" only (see `_lines`). With `read_tasks: N`, N tasks read a Parquet corpus by row
groups, a text/jsonl/tsv file by byte ranges (the driver indexes where each shard's first row
starts); either way the shards are those one task writes.
"""
from __future__ import annotations

import codecs
import csv
import hashlib
import io
import itertools
import json
from pathlib import Path
from typing import IO, Any, Iterable, Iterator, Literal, NamedTuple

from pydantic import Field, model_validator

from pipeline.errors import KdpipeError
from pipeline.hashing import hash_tree
from pipeline.stage import (Facts, Problem, ResourceConfig, RowIndex, SourceStage, StageConfig, StageContext,
                            located, throughput)

FORMATS = ("jsonl", "csv", "tsv", "parquet", "text", "parallel", "hf")
# Branch names whose content changes over time; a revision must be a commit sha or a tag.
MOVING_REVISIONS = ("main", "master")
# Formats whose rows are lines of one file, so a part of the corpus is a byte range of it.
TEXT_SPLIT_FORMATS = ("text", "jsonl", "tsv")
_SUFFIX_FORMAT = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv",
                  ".parquet": "parquet", ".txt": "text"}


class ReadError(KdpipeError, ValueError):
    """Bad input found while reading; `loc` is relative to the stage config. A KdpipeError, so one
    raised in a read task reaches the user as this message (exit 2), not as a traceback."""

    exit_code = 2

    def __init__(self, loc: str, message: str):
        super().__init__(f"{loc}: {message}")
        self.loc, self.message = loc, message

    def __reduce__(self):  # rebuilt from (loc, message) when Ray ships it back from a task
        return type(self), (self.loc, self.message)


class HFSource(StageConfig):
    name: str = Field(description="hub dataset id (e.g. 'glue') or a local dataset directory")
    config: str | None = None
    split: str = "train"
    revision: str | None = None
    trust_remote_code: bool = False


class ReadConfig(ResourceConfig):
    format: Literal["auto", "jsonl", "csv", "tsv", "parquet", "text", "parallel", "hf"] = "auto"
    path: str | None = located(None, description="input file (all formats but parallel and hf)")
    files: dict[str, str] | None = located(None, description="parallel: column name -> line-aligned file")
    hf: HFSource | None = None
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str | None = None
    id_column: str | None = None
    columns: list[str] = Field(default_factory=list, description="extra columns passed through")
    label_names: list[str] | None = Field(None, description="names of integer labels 0..n-1, in order")
    limit: int | None = Field(None, gt=0, description="keep the first N rows (after shuffle)")
    shuffle: bool = False
    shuffle_seed: int = 0
    rows_per_shard: int = Field(10_000, gt=0)
    read_tasks: int = throughput(1, ge=1, description="tasks reading the corpus side by side (parquet: by row "
                                 "groups; text, jsonl, tsv: by byte ranges), each writing whole shards, the "
                                 "same shards one task writes; not for csv, parallel, hf; see README")

    @model_validator(mode="after")
    def _source_given(self) -> "ReadConfig":
        fmt = self.resolved_format()
        if fmt == "hf" and self.hf is None:
            raise ValueError("format 'hf' needs `hf: {name: ..., split: ...}`")
        if fmt == "parallel" and not self.files:
            raise ValueError("format 'parallel' needs `files: {text: a.en, target: a.de}`")
        if fmt not in ("hf", "parallel") and not self.path:
            raise ValueError(f"format {fmt!r} needs `path:`")
        return self

    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        if self.hf is not None:
            return "hf"
        if self.files:
            return "parallel"
        suffix = Path(self.path or "").suffix.lower()
        return _SUFFIX_FORMAT.get(suffix, "text")


def stable_id(source: str, row: int, text: str) -> str:
    return hashlib.sha256(f"{source}\0{row}\0{text}".encode()).hexdigest()[:16]


# Validation at plan time reads a corpus whole only up to this size; a larger one is checked on its
# first VALIDATE_ROWS rows (columns, labels, ids), the rest when the stage reads it, so `plan`
# never loads a large corpus on the driver.
VALIDATE_BYTES = 64 << 20
VALIDATE_ROWS = 10_000


def _head_bytes(path: Path, lines: int) -> bytes:
    """The first `lines` lines of a file (with their line ends)."""
    out = []
    with path.open("rb") as f:
        for _ in range(lines):
            line = f.readline()
            if not line:
                break
            out.append(line)
    return b"".join(out)


def _not_utf8(path: Path, loc: str, byte: int, line: int) -> ReadError:
    return ReadError(loc, f"{path} is not UTF-8 (byte {byte:#04x} at line {line}); "
                     "re-encode it, e.g. `iconv -f latin1 -t utf-8`")


def _decode(path: Path, loc: str, *, head: int | None = None) -> str:
    data = path.read_bytes() if head is None else _head_bytes(path, head)
    # The BOM is cut off here, not by the "utf-8-sig" codec, whose error offsets would not count it.
    data = data[len(codecs.BOM_UTF8):] if data.startswith(codecs.BOM_UTF8) else data
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _not_utf8(path, loc, data[e.start], data[: e.start].count(b"\n") + 1) from None


# A line ends at "\n" only (one "\r" before it is dropped), never at U+2028, U+2029, U+0085, \x0b,
# \x0c or \x1c-\x1e as str.splitlines() would: those occur inside JSON strings written with
# ensure_ascii=False and inside sentences. Reading a whole file and reading a byte range of it
# (binary file iteration also splits at b"\n" only) follow this one rule.
def _lines(text: str) -> list[str]:
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [line[:-1] if line.endswith("\r") else line for line in lines]


def _is_row(fmt: str, line: str) -> bool:
    """Whether a line (a tsv's past its header) holds a row: text keeps blank lines, jsonl skips
    whitespace-only ones, tsv skips empty ones (csv.DictReader skips those and "\r"-only ones)."""
    return fmt == "text" or bool(line.strip() if fmt == "jsonl" else line.strip("\r"))


def _records_from_lines(fmt: str, lines: Iterable[tuple[int, str]], path: Path, *,
                        header: str | None = None) -> list[dict[str, Any]]:
    """Rows of a text, jsonl or tsv file from its (line number, line) pairs; a tsv's `header` is
    its first line, `lines` the lines after it (or some of them)."""
    if fmt == "text":
        return [{"text": line} for _, line in lines]
    if fmt == "jsonl":
        rows = []
        for i, line in lines:
            if not _is_row(fmt, line):
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ReadError("config.path", f"{path}:{i}: invalid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise ReadError("config.path", f"{path}:{i}: each line must be a JSON object")
            rows.append(obj)
        return rows
    # GLUE TSVs carry unbalanced quotes: tab files are read without quote handling, so a row is
    # one line and a part of the file parses as its header plus its lines.
    at = [1]

    def numbered() -> Iterator[str]:
        for at[0], line in lines:
            yield line

    reader = csv.DictReader(itertools.chain([header], numbered()), delimiter="\t", quoting=csv.QUOTE_NONE)
    try:
        return [dict(r) for r in reader]
    except csv.Error as e:  # e.g. a lone "\r" inside a line
        raise ReadError("config.path", f"{path}:{at[0]}: not a tab-separated line ({e})") from None


def _read_records(cfg: ReadConfig, *, head: int | None = None) -> tuple[list[dict[str, Any]], str]:
    """All rows as dicts (or about the first `head` rows), plus the source name used for stable ids."""
    fmt = cfg.resolved_format()
    if fmt == "hf":
        rows = _read_hf(cfg.hf)
        return (rows if head is None else rows[:head]), cfg.hf.name.rstrip("/").split("/")[-1]
    if fmt == "parallel":
        columns: dict[str, list[str]] = {}
        for col, file in cfg.files.items():
            path = Path(file)
            if not path.is_file():
                raise ReadError(f"config.files.{col}", f"file not found: {file}")
            columns[col] = _lines(_decode(path, f"config.files.{col}", head=head))
        lengths = {col: len(lines) for col, lines in columns.items()}
        if head is not None:  # line alignment of the whole files is checked when the stage reads them
            n = min(lengths.values())
            columns = {col: lines[:n] for col, lines in columns.items()}
            lengths = {col: n for col in columns}
        if len(set(lengths.values())) > 1:
            raise ReadError("config.files", f"files are not line-aligned: line counts {lengths}")
        n = next(iter(lengths.values()))
        rows = [{col: columns[col][i] for col in columns} for i in range(n)]
        return rows, "+".join(Path(f).name for f in cfg.files.values())
    path = Path(cfg.path)
    if not path.is_file():
        raise ReadError("config.path", f"file not found: {cfg.path} (paths are relative to the "
                        "directory you run kdpipe from)")
    if fmt == "parquet":
        import pyarrow.parquet as pq

        if head is not None:
            first = next(pq.ParquetFile(path).iter_batches(batch_size=head), None)
            return ([] if first is None else first.to_pylist()), path.name
        return pq.read_table(path).to_pylist(), path.name
    # csv/tsv: one more line for the header (a quoted field spanning lines only shortens the head)
    text = _decode(path, "config.path", head=None if head is None else head + 1)
    if fmt == "csv":
        reader = csv.DictReader(io.StringIO(text), delimiter=",", quoting=csv.QUOTE_MINIMAL)
        rows = [dict(r) for r in reader]
        if reader.fieldnames is None:
            raise ReadError("config.path", f"{path} is empty: expected a header line and rows")
        return rows, path.name
    lines = list(enumerate(_lines(text), 1))
    if fmt != "tsv":
        return _records_from_lines(fmt, lines, path), path.name
    if not lines:
        raise ReadError("config.path", f"{path} is empty: expected a header line and rows")
    return _records_from_lines(fmt, lines[1:], path, header=lines[0][1]), path.name


class _LineStart(NamedTuple):
    """Where a shard's first row lies in a text file, and the digest of what the shard's rows are
    parsed from (a tsv's header line, then the raw lines of its rows), taken by the driver's scan:
    a task checks the bytes it parsed against it, so a node's copy of the file may have another
    mtime but not other content (None: not checked)."""

    offset: int
    line: int
    digest: str | None = None


def _shard_digest(header: bytes) -> Any:
    return hashlib.sha256(b"%d:" % len(header) + header)


def _scan_lines(f: IO[bytes], path: Path, *, offset: int, line: int) -> Iterator[tuple[int, int, bytes, str]]:
    """(byte offset, line number, raw bytes, text) of each line of `f` from `offset`, the start of
    line number `line`; the text without its line end, a BOM dropped at the start of the file."""
    for raw in f:
        body = raw[len(codecs.BOM_UTF8):] if offset == 0 and raw.startswith(codecs.BOM_UTF8) else raw
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError as e:
            raise _not_utf8(path, "config.path", body[e.start], line) from None
        text = text[:-1] if text.endswith("\n") else text
        yield offset, line, raw, text[:-1] if text.endswith("\r") else text
        offset, line = offset + len(raw), line + 1


def _row_lines(fmt: str, scanned: Iterator[tuple[int, int, bytes, str]]) -> Iterator[tuple[int, int, bytes, str]]:
    """The scanned lines that hold rows (not a tsv's header, not lines the format skips)."""
    return (s for s in scanned if not (fmt == "tsv" and s[1] == 1) and _is_row(fmt, s[3]))


def _read_hf(src: HFSource) -> list[dict[str, Any]]:
    import datasets

    local = Path(src.name)
    if local.is_dir() and (local / "dataset_info.json").exists() and (local / "state.json").exists():
        ds = datasets.load_from_disk(str(local))
    elif local.is_dir() and (local / "dataset_dict.json").exists():
        ds = datasets.load_from_disk(str(local))[src.split]
    else:
        kwargs: dict[str, Any] = {"split": src.split, "revision": src.revision}
        ds = datasets.load_dataset(src.name, src.config, **kwargs)
    return ds.to_list()


def _is_integer(value: Any) -> bool:
    try:
        int(value)
    except (TypeError, ValueError):
        return False
    return True


def _coerce_labels(values: list[Any]) -> list[Any]:
    """TSV/CSV labels arrive as strings: make them ints when they all are."""
    try:
        return [int(v) for v in values]
    except (TypeError, ValueError):
        return [str(v) for v in values]


class ReadStage(SourceStage):
    type = "read"
    Config = ReadConfig

    config: ReadConfig

    def fingerprint(self) -> dict[str, str]:
        """The source files' bytes (a hub dataset enters through its pinned `hf.revision`)."""
        cfg = self.config
        fmt = cfg.resolved_format()
        if fmt == "parallel":
            return {f"source file of {col}": hash_tree(f) for col, f in cfg.files.items() if Path(f).is_file()}
        if fmt == "hf":
            local = Path(cfg.hf.name)
            return {f"dataset {cfg.hf.name}": hash_tree(local)} if local.exists() else {}
        return {"source file": hash_tree(cfg.path)} if Path(cfg.path).is_file() else {}

    def output_facts(self, *, input_facts) -> Facts:
        return Facts({"label_names": list(self.config.label_names)} if self.config.label_names else {})

    def output_columns(self, *, input_columns) -> list[str]:
        cfg = self.config
        cols = ["id", "text"]
        if cfg.text_pair_column:
            cols.append("text_pair")
        if cfg.label_column:
            cols.append("label")
        extra = list(cfg.columns)
        if cfg.resolved_format() == "parallel":
            extra += [c for c in cfg.files if c != cfg.text_column]
        return cols + [c for c in extra if c not in cols]

    def validate(self, *, input_columns) -> list[Problem]:
        hf = self.config.hf
        if self.config.resolved_format() == "hf" and not Path(hf.name).exists():
            # A hub dataset is checked when it is loaded; its content enters the key only through
            # a revision that cannot move.
            if hf.revision is None or hf.revision in MOVING_REVISIONS:
                given = "has no `revision`" if hf.revision is None else f"names branch {hf.revision!r}, which moves"
                return [Problem("config.hf.revision", f"hub dataset {hf.name!r} {given}, so a cached "
                                "artifact could hide a changed dataset; pin it: `revision: <commit sha or "
                                "tag>` (the sha is on the dataset page under 'Files and versions', or "
                                f"`huggingface_hub.HfApi().dataset_info({hf.name!r}).sha`)")]
            return []
        blocker = self._split_blocker() if self.config.read_tasks > 1 else None
        problems = [Problem("config.read_tasks", f"read_tasks > 1 cannot give the same shards here: {blocker}; "
                            "set read_tasks: 1 (one task reads the corpus)")] if blocker else []
        try:
            self.build_table(head=None if self._source_bytes() <= VALIDATE_BYTES else VALIDATE_ROWS,
                             integer_labels=self.config.read_tasks > 1 and blocker is None)
        except ReadError as e:
            problems.append(Problem(e.loc, e.message))
        return problems

    def _source_bytes(self) -> int:
        cfg = self.config
        paths = list(cfg.files.values()) if cfg.resolved_format() == "parallel" else [cfg.path or cfg.hf.name]
        return sum(Path(p).stat().st_size for p in paths if Path(p).is_file())

    def metadata(self) -> dict[str, str]:
        md = {"source_format": self.config.resolved_format()}
        if self.config.label_names:
            md["label_names"] = json.dumps(self.config.label_names)
        return md

    def read(self, ctx: StageContext):
        return self.build_table()

    # --- a corpus read by several tasks (SourceStage.read_tasks) ------------------------------
    def _split_blocker(self) -> str | None:
        """Why this source cannot be read in parts giving the same shards, or None. Parts must not
        need the whole corpus: no shuffle/limit (they reorder or cut it globally), no id_column
        (uniqueness is global), no pass-through columns and integer labels (their types are
        inferred from all rows: a text file's labels are checked in each part as it is read)."""
        cfg = self.config
        fmt = cfg.resolved_format()
        if fmt not in TEXT_SPLIT_FORMATS + ("parquet",):
            why = {"csv": "quoted fields may span lines, so a byte offset is not a row boundary"}.get(
                fmt, "it is not one file")
            return f"format {fmt!r} ({why}; parquet, text, jsonl and tsv are read in parts)"
        for field in ("shuffle", "limit", "id_column", "columns"):
            if getattr(cfg, field):
                return f"`{field}` is set"
        if fmt == "parquet" and cfg.label_column and Path(cfg.path).is_file():
            import pyarrow as pa
            import pyarrow.parquet as pq

            schema = pq.read_schema(cfg.path)
            if cfg.label_column in schema.names and not pa.types.is_integer(schema.field(cfg.label_column).type):
                return f"label column {cfg.label_column!r} is {schema.field(cfg.label_column).type}, not an integer"
        return None

    def read_tasks(self) -> int:
        return self.config.read_tasks if self.config.read_tasks > 1 and self._split_blocker() is None else 1

    def index_rows(self, *, rows_per_shard: int) -> RowIndex:
        """Parquet: the row count from its metadata. A text file: one pass over its lines by the
        parser's rules, recording where every rows_per_shard-th row starts and hashing the bytes."""
        path = Path(self.config.path)
        fmt = self.config.resolved_format()
        if fmt == "parquet":
            import pyarrow.parquet as pq

            return RowIndex(rows=pq.ParquetFile(path).metadata.num_rows)
        before = path.stat()
        digest, header, marks, shard_digests, rows = hashlib.sha256(), b"", [], [], 0
        with path.open("rb") as f:
            for offset, line, raw, text in _scan_lines(f, path, offset=0, line=1):
                digest.update(raw)
                if fmt == "tsv" and line == 1:
                    header = raw
                    continue
                if not _is_row(fmt, text):
                    continue
                if rows % rows_per_shard == 0:
                    marks.append((offset, line))
                    shard_digests.append(_shard_digest(header))
                shard_digests[-1].update(raw)
                rows += 1
        after = path.stat()
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise ReadError("config.path", f"{path} changed while it was indexed; run again once it is complete")
        starts = tuple(_LineStart(o, n, h.hexdigest()) for (o, n), h in zip(marks, shard_digests))
        return RowIndex(rows=rows, starts=starts, fingerprint={"source file": digest.hexdigest()})

    def read_rows(self, ctx: StageContext, *, start: int, stop: int, at: Any = None):
        """Rows [start, stop) of the corpus: Parquet from the row groups that hold them only; a
        text file from the byte offset of `at[0]` (a tsv also reads its header line), parsing
        nothing before it, each shard's bytes checked against its digest in `at`. Labels must
        come out as integers (see `_table_from_records`)."""
        path = Path(self.config.path)
        fmt = self.config.resolved_format()
        if fmt == "parquet":
            return self._parquet_rows(path, start, stop)
        at = tuple(at) if at else (self._locate(path, fmt, start),)
        per = self.rows_per_shard()
        lines: list[tuple[int, str]] = []
        digests: list[Any] = []
        with path.open("rb") as f:
            header = next(_scan_lines(f, path, offset=0, line=1), (0, 1, b"", "")) if fmt == "tsv" else None
            f.seek(at[0].offset)
            for _, line, raw, text in _row_lines(fmt, _scan_lines(f, path, offset=at[0].offset, line=at[0].line)):
                if len(lines) % per == 0:
                    digests.append(_shard_digest(header[2] if header else b""))
                digests[-1].update(raw)
                lines.append((line, text))
                if len(lines) == stop - start:
                    break
        if len(lines) != stop - start:
            raise ReadError("config.path", f"{path}: expected {stop - start} rows from line {at[0].line}, found "
                            f"{len(lines)}; the file changed after the read stage indexed it: run again")
        for k, (entry, digest) in enumerate(zip(at, digests)):
            if entry.digest is not None and entry.digest != digest.hexdigest():
                raise ReadError("config.path", f"{path}: the rows from line {entry.line} (row {start + k * per}) "
                                "differ from those the read stage indexed (the file changed, or this node's "
                                "copy differs from the driver's); run again with the same file everywhere")
        records = _records_from_lines(fmt, lines, path, header=header[3] if header else None)
        if len(records) != len(lines):  # _is_row and the parser disagree on what a row is: a bug
            raise RuntimeError(f"{path}: {len(lines)} row lines from line {at[0].line} parsed as {len(records)} rows")
        return self._table_from_records(records, path.name, row_offset=start, integer_labels=True)

    def _locate(self, path: Path, fmt: str, row: int) -> _LineStart:
        """Where row `row` starts, found by scanning from the top (for a caller without an index)."""
        with path.open("rb") as f:
            scanned = _row_lines(fmt, _scan_lines(f, path, offset=0, line=1))
            offset, line, _, _ = next(itertools.islice(scanned, row, None), (path.stat().st_size, 0, b"", ""))
        return _LineStart(offset, line)

    def _parquet_rows(self, path: Path, start: int, stop: int):
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        groups, first, offset = [], None, 0
        for g in range(pf.metadata.num_row_groups):
            n = pf.metadata.row_group(g).num_rows
            if offset < stop and offset + n > start:
                groups.append(g)
                first = offset if first is None else first
            offset += n
        table = pf.read_row_groups(groups).slice(start - (first or 0), stop - start)
        return self._table_from_records(table.to_pylist(), path.name, row_offset=start)

    def build_table(self, *, head: int | None = None, integer_labels: bool = False):
        """The whole corpus as one table; with `head`, about its first `head` rows (for checks)."""
        records, source = _read_records(self.config, head=head)
        if not records:
            raise ReadError("config.path", "the corpus is empty: no rows to read")
        return self._table_from_records(records, source, row_offset=0, integer_labels=integer_labels)

    def _table_from_records(self, records: list[dict[str, Any]], source: str, *, row_offset: int,
                            integer_labels: bool = False):
        """Rows (the corpus's from row `row_offset` on) as the stage's table; ids by global row.
        `integer_labels`: the rows are one part of the corpus, whose label type must not depend on
        which rows the part holds, so labels must be integers or names in label_names."""
        import pyarrow as pa

        cfg = self.config
        available = set(records[0])
        wanted = {"config.text_column": cfg.text_column, "config.text_pair_column": cfg.text_pair_column,
                  "config.label_column": cfg.label_column, "config.id_column": cfg.id_column}
        wanted.update({f"config.columns[{i}]": c for i, c in enumerate(cfg.columns)})
        for loc, col in wanted.items():
            if col is not None and col not in available:
                raise ReadError(loc, f"column {col!r} not in the input; it has: {', '.join(sorted(map(str, available)))}")
        if cfg.shuffle:
            import random

            random.Random(cfg.shuffle_seed).shuffle(records)
        if cfg.limit:
            records = records[: cfg.limit]
        texts = ["" if r.get(cfg.text_column) is None else str(r[cfg.text_column]) for r in records]
        if cfg.id_column:
            ids = [str(r[cfg.id_column]) for r in records]
            if len(set(ids)) != len(ids):
                dup = next(i for i in ids if ids.count(i) > 1)
                raise ReadError("config.id_column", f"ids must be unique; {dup!r} repeats")
        else:
            ids = [stable_id(source, row_offset + i, t) for i, t in enumerate(texts)]
        columns: dict[str, Any] = {"id": pa.array(ids, pa.string()), "text": pa.array(texts, pa.string())}
        if cfg.text_pair_column:
            columns["text_pair"] = pa.array([str(r[cfg.text_pair_column] or "") for r in records], pa.string())
        if cfg.label_column:
            labels = [r[cfg.label_column] for r in records]
            if any(v is None or v == "" for v in labels):
                row = next(i for i, v in enumerate(labels) if v is None or v == "")
                raise ReadError("config.label_column", f"row {row_offset + row} has no label")
            labels = _coerce_labels(labels)
            if cfg.label_names and isinstance(labels[0], str):
                # Named labels are stored as their index in label_names, the order teachers use.
                index = {name: i for i, name in enumerate(cfg.label_names)}
                unseen = sorted({v for v in labels if v not in index})
                if unseen:
                    raise ReadError("config.label_names", f"labels {unseen[:5]} are not in label_names "
                                    f"{cfg.label_names}; add them there or fix the data")
                labels = [index[v] for v in labels]
            if integer_labels and isinstance(labels[0], str):
                row = next(i for i, v in enumerate(labels) if not _is_integer(v))
                raise ReadError("config.label_column", f"read_tasks > 1 needs integer labels or label_names (row "
                                f"{row_offset + row} has label {labels[row]!r}); set label_names or read_tasks: 1")
            if cfg.label_names and isinstance(labels[0], int):
                bad = sorted({v for v in labels if not 0 <= v < len(cfg.label_names)})
                if bad:
                    raise ReadError("config.label_names", f"labels {bad[:5]} are outside 0..{len(cfg.label_names) - 1}")
            columns["label"] = pa.array(labels)
        extra = [c for c in self.output_columns(input_columns={}) if c not in columns]
        for col in extra:
            columns[col] = pa.array([r.get(col) for r in records])
        return pa.table(columns)
