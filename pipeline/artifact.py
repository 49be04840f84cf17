"""On-disk artifacts: atomic shard writes, completion markers, manifest.json, reading back.

Layout of one artifact (`<workdir>/artifacts/<type>/<key>/`):

    shards/00000.parquet      data (map and source stages); readable with pandas/datasets/DuckDB
    completions/00000.json    written after the shard's rename: rows, bytes, sha256, seconds
    files/...                 outputs of task stages (checkpoints, tables, plots)
    scratch/                  task-stage state kept across crashes (training checkpoints)
    manifest.json             written last: the artifact is complete iff it exists
"""
from __future__ import annotations

import json
import os
import time
import uuid
from pathlib import Path
from typing import Any, Iterator

from pipeline.hashing import sha256_file

SHARD_DIGITS = 5
MANIFEST = "manifest.json"


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


class Artifact:
    """Read-side handle on one artifact directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"Artifact({str(self.path)!r})"

    @property
    def key(self) -> str:
        return self.path.name

    @property
    def shards_dir(self) -> Path:
        return self.path / "shards"

    @property
    def files_dir(self) -> Path:
        return self.path / "files"

    @property
    def completions_dir(self) -> Path:
        return self.path / "completions"

    @property
    def manifest_path(self) -> Path:
        return self.path / MANIFEST

    def is_complete(self) -> bool:
        return self.manifest_path.is_file()

    @property
    def manifest(self) -> dict[str, Any]:
        return json.loads(self.manifest_path.read_text(encoding="utf-8"))

    def shard_paths(self) -> list[Path]:
        return sorted(self.shards_dir.glob("*.parquet"))

    def num_shards(self) -> int:
        return len(self.shard_paths())

    def shard_path(self, index: int) -> Path:
        return self.shards_dir / f"{shard_name(index)}.parquet"

    def read_shard(self, index: int, columns: list[str] | None = None):
        import pyarrow.parquet as pq

        return pq.read_table(self.shard_path(index), columns=columns)

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[Any]:
        import pyarrow.parquet as pq

        for path in self.shard_paths():
            yield pq.read_table(path, columns=columns)

    def read_table(self, columns: list[str] | None = None):
        import pyarrow as pa

        tables = list(self.iter_shards(columns))
        if not tables:
            raise FileNotFoundError(f"{self.path} has no shards")
        return pa.concat_tables(tables)

    def schema(self):
        import pyarrow.parquet as pq

        paths = self.shard_paths()
        return pq.read_schema(paths[0]) if paths else None

    def columns(self) -> list[str] | None:
        schema = self.schema()
        return None if schema is None else list(schema.names)

    def file_metadata(self) -> dict[str, str]:
        """Parquet key-value metadata of the first shard, decoded."""
        schema = self.schema()
        if schema is None or not schema.metadata:
            return {}
        return {k.decode(): v.decode() for k, v in schema.metadata.items()}


def write_shard(art_dir: Path, index: int, table, metadata: dict[str, str]) -> dict[str, Any]:
    """Write one shard atomically (temp name, fsync, rename) and then its completion marker.

    A crash at any point leaves either no shard, an ignored dot-file, or a shard without marker
    (rewritten next time): a shard is only trusted once its marker exists and matches it."""
    import pyarrow.parquet as pq

    start = time.perf_counter()
    shards = art_dir / "shards"
    completions = art_dir / "completions"
    shards.mkdir(parents=True, exist_ok=True)
    completions.mkdir(parents=True, exist_ok=True)
    name = shard_name(index)
    final = shards / f"{name}.parquet"
    tmp = shards / f".{name}.parquet.tmp-{uuid.uuid4().hex[:8]}"
    schema_md = dict(table.schema.metadata or {})
    schema_md.update({k.encode(): v.encode() for k, v in metadata.items()})
    table = table.replace_schema_metadata(schema_md)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    stats = {
        "index": index,
        "rows": table.num_rows,
        "bytes": final.stat().st_size,
        "sha256": sha256_file(final),
        "seconds": round(time.perf_counter() - start, 4),
    }
    write_json(completions / f"{name}.json", stats)
    return stats


def completed_shards(art_dir: Path, *, verify: bool = True) -> dict[int, dict[str, Any]]:
    """Shards whose marker exists and whose file matches it (size, and sha256 if verify)."""
    done: dict[int, dict[str, Any]] = {}
    completions = art_dir / "completions"
    if not completions.is_dir():
        return done
    for marker in sorted(completions.glob("*.json")):
        try:
            stats = json.loads(marker.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        shard = art_dir / "shards" / f"{marker.stem}.parquet"
        if not shard.is_file() or shard.stat().st_size != stats.get("bytes"):
            continue
        if verify and sha256_file(shard) != stats.get("sha256"):
            continue
        done[int(marker.stem)] = stats
    return done


def file_checksums(files_dir: Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    if files_dir.is_dir():
        for path in sorted(p for p in files_dir.rglob("*") if p.is_file()):
            out[path.relative_to(files_dir).as_posix()] = {
                "bytes": path.stat().st_size,
                "sha256": sha256_file(path),
            }
    return out
