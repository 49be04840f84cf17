"""On-disk artifacts: atomic shard writes, completion markers, manifest.json, reading back.

Layout of one artifact (`<workdir>/artifacts/<type>/<key>/`):

    shards/00000.parquet      data (map and source stages); readable with pandas/datasets/DuckDB
    completions/00000.json    written after the shard's rename: rows, bytes, sha256, seconds
    files/...                 outputs of task stages (checkpoints, tables, plots)
    scratch/                  task-stage state kept across crashes (training checkpoints)
    manifest.json             written last: the artifact is complete iff it exists

The workdir may be a local folder or an object-store URI (s3://bucket/prefix): all I/O goes
through `pipeline.storage`, and nothing relies on rename or symlinks there.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Iterator

from pipeline import storage

SHARD_DIGITS = 5
MANIFEST = "manifest.json"
_MIRRORED = ".kdpipe-mirrored"


def shard_name(index: int) -> str:
    return f"{index:0{SHARD_DIGITS}d}"


def atomic_write_text(path: str | Path, text: str) -> None:
    storage.write_text(path, text)


def write_json(path: str | Path, obj: Any) -> None:
    storage.write_json(path, obj)


class MissingShard(FileNotFoundError):
    """A shard the artifact's manifest lists is not in the store."""


class Artifact:
    """Read-side handle on one artifact, local (`Path`) or in an object store (URI string).

    `loc` is the artifact's location. For local artifacts `path`, `shards_dir` and `files_dir`
    are the folders themselves; for remote ones `path` and `files_dir` are a local mirror of
    files/ and manifest.json (downloaded once: complete artifacts never change), so model loaders
    that need a folder work on any worker."""

    def __init__(self, path: str | Path):
        self.loc = storage.normalize(path)
        self.remote = storage.is_remote(self.loc)
        self._manifest: dict[str, Any] | None = None

    def __repr__(self) -> str:
        return f"Artifact({self.loc!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Artifact) and other.loc == self.loc

    def __hash__(self) -> int:
        return hash(self.loc)

    @property
    def key(self) -> str:
        return storage.basename(self.loc)

    @property
    def type(self) -> str:
        return storage.basename(storage.parent(self.loc))

    def sub(self, *parts: str) -> str:
        return storage.join(self.loc, *parts)

    @property
    def path(self) -> Path:
        return self.local_copy() if self.remote else Path(self.loc)

    @property
    def shards_dir(self):
        return self.sub("shards") if self.remote else Path(self.loc) / "shards"

    @property
    def files_dir(self) -> Path:
        return self.local_copy() / "files" if self.remote else Path(self.loc) / "files"

    @property
    def completions_dir(self):
        return self.sub("completions") if self.remote else Path(self.loc) / "completions"

    @property
    def manifest_path(self):
        return self.sub(MANIFEST) if self.remote else Path(self.loc) / MANIFEST

    def is_complete(self) -> bool:
        return storage.is_file(self.sub(MANIFEST))

    @property
    def manifest(self) -> dict[str, Any]:
        if self._manifest is None:
            manifest = json.loads(storage.read_bytes(self.sub(MANIFEST)))
            if not self.remote:
                return manifest  # local reads stay fresh (tests rewrite manifests in place)
            self._manifest = manifest
        return self._manifest

    def local_copy(self) -> Path:
        """Local folder holding this remote artifact's manifest.json and files/ (not its shards)."""
        target = storage.local_mirror(self.loc)
        if (target / _MIRRORED).is_file():
            return target
        if not self.is_complete():
            raise FileNotFoundError(f"{self.loc} is not complete: nothing to copy locally")
        storage.download_tree(self.sub("files"), target / "files")
        storage.get_file(self.sub(MANIFEST), target / MANIFEST)
        (target / _MIRRORED).write_text("")
        return target

    def listed_shards(self) -> dict[int, int]:
        """Shards in the store now (index -> bytes), from one listing."""
        out = {}
        for name, nbytes in storage.list_files(self.sub("shards"), recursive=False).items():
            stem, _, ext = name.partition(".")
            if ext == "parquet" and stem.isdigit():
                out[int(stem)] = nbytes
        return out

    def shard_indices(self) -> list[int]:
        """The manifest's shard indices for a complete artifact, else whatever shards exist."""
        if self.is_complete():
            return sorted(s["index"] for s in self.manifest.get("shards", []))
        return sorted(self.listed_shards())

    def check_shards(self) -> list[int]:
        """The manifest's shard indices, after checking each one is in the store (one listing);
        a missing shard raises MissingShard naming it."""
        indices = self.shard_indices()
        present = self.listed_shards()
        for i in indices:
            if i not in present:
                raise MissingShard(f"shard {self.shard_path(i)} listed in {self.sub(MANIFEST)} is missing; "
                                   "rerun the stage that made this artifact (or `kdpipe verify` it)")
        return indices

    def shard_paths(self) -> list:
        return [self.shard_path(i) for i in self.shard_indices()]

    def num_shards(self) -> int:
        return len(self.shard_indices())

    def shard_path(self, index: int):
        name = f"{shard_name(index)}.parquet"
        return self.sub("shards", name) if self.remote else Path(self.loc) / "shards" / name

    def has_shard(self, index: int) -> bool:
        return storage.is_file(self.shard_path(index))

    def read_shard(self, index: int, columns: list[str] | None = None):
        return storage.read_parquet(self.shard_path(index), columns=columns)

    def iter_shards(self, columns: list[str] | None = None) -> Iterator[Any]:
        for index in self.check_shards():
            yield self.read_shard(index, columns)

    def read_table(self, columns: list[str] | None = None):
        import pyarrow as pa

        tables = list(self.iter_shards(columns))
        if not tables:
            raise FileNotFoundError(f"{self.loc} has no shards")
        return pa.concat_tables(tables)

    def schema(self):
        indices = self.shard_indices()
        return storage.parquet_file(self.shard_path(indices[0])).schema_arrow if indices else None

    def columns(self) -> list[str] | None:
        schema = self.schema()
        return None if schema is None else list(schema.names)

    def file_metadata(self) -> dict[str, str]:
        """Parquet key-value metadata of the first shard, decoded."""
        schema = self.schema()
        if schema is None or not schema.metadata:
            return {}
        return {k.decode(): v.decode() for k, v in schema.metadata.items()}


def write_shard(art_dir: str | Path, index: int, table, metadata: dict[str, str]) -> dict[str, Any]:
    """Write one shard (atomically: temp + rename locally, one object remotely) and then its
    completion marker.

    A crash at any point leaves either no shard, an ignored dot-file, or a shard without marker
    (rewritten next time): a shard is only trusted once its marker exists and matches it."""
    from pipeline.hashing import sha256_file

    start = time.perf_counter()
    name = shard_name(index)
    final = storage.join(art_dir, "shards", f"{name}.parquet")
    schema_md = dict(table.schema.metadata or {})
    schema_md.update({k.encode(): v.encode() for k, v in metadata.items()})
    table = table.replace_schema_metadata(schema_md)
    if storage.is_remote(final):
        import pyarrow as pa
        import pyarrow.parquet as pq

        import hashlib

        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        data = sink.getvalue().to_pybytes()
        storage.write_bytes(final, data)
        nbytes, digest = len(data), hashlib.sha256(data).hexdigest()
    else:
        nbytes = storage.write_parquet(table, final, compression="zstd")
        digest = sha256_file(final)
    stats = {
        "index": index,
        "rows": table.num_rows,
        "bytes": nbytes,
        "sha256": digest,
        "seconds": round(time.perf_counter() - start, 4),
    }
    storage.write_json(storage.join(art_dir, "completions", f"{name}.json"), stats)
    return stats


def completed_shards(art_dir: str | Path, *, verify: bool = True) -> dict[int, dict[str, Any]]:
    """Shards whose marker exists and whose file matches it: size always, sha256 if verify
    (planning trusts the marker's digest; `kdpipe verify` re-hashes)."""
    done: dict[int, dict[str, Any]] = {}
    markers = storage.list_files(storage.join(art_dir, "completions"), recursive=False)
    if not markers:
        return done
    present = storage.list_files(storage.join(art_dir, "shards"), recursive=False)
    for marker in sorted(markers):
        stem, _, ext = marker.partition(".")
        if ext != "json" or not stem.isdigit():
            continue
        try:
            stats = storage.read_json(storage.join(art_dir, "completions", marker))
        except (OSError, ValueError):
            continue
        shard = f"{stem}.parquet"
        if present.get(shard) != stats.get("bytes"):
            continue
        if verify and storage.sha256(storage.join(art_dir, "shards", shard)) != stats.get("sha256"):
            continue
        done[int(stem)] = stats
    return done


def file_checksums(files_dir: str | Path) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for rel, nbytes in storage.list_files(files_dir, hidden=True).items():
        out[rel] = {"bytes": nbytes, "sha256": storage.sha256(storage.join(files_dir, rel))}
    return out


# --- run aliases: <workdir>/runs/<run>/<stage>.alias.json point at an artifact ----------------

def alias_loc(workdir: str | Path, run_name: str, stage_name: str) -> str:
    return storage.join(storage.normalize(workdir), "runs", run_name, f"{stage_name}{ALIAS_SUFFIX}")


ALIAS_SUFFIX = ".alias.json"


def write_alias(workdir: str | Path, run_name: str, stage_name: str, art: Artifact) -> None:
    """A small pointer file (works on any store); locally also the readable symlink
    `runs/<run>/<stage>` -> ../../artifacts/<type>/<key>."""
    root = storage.normalize(workdir)
    storage.write_json(alias_loc(root, run_name, stage_name),
                       {"artifact": f"artifacts/{art.type}/{art.key}", "type": art.type, "key": art.key})
    if not art.remote:
        link = Path(root) / "runs" / run_name / stage_name
        target = os.path.relpath(Path(art.loc), link.parent)
        tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
        tmp.unlink(missing_ok=True)
        os.symlink(target, tmp)
        os.replace(tmp, link)


def read_alias(workdir: str | Path, run_name: str, stage_name: str) -> Artifact | None:
    root = storage.normalize(workdir)
    try:
        pointer = storage.read_json(alias_loc(root, run_name, stage_name))
    except (OSError, ValueError):
        pointer = None
    if pointer and isinstance(pointer.get("artifact"), str):
        return Artifact(storage.join(root, *pointer["artifact"].split("/")))
    link = Path(root) / "runs" / run_name / stage_name
    if not storage.is_remote(root) and link.is_symlink():  # workdirs from before pointer files
        return Artifact(link.resolve())
    return None


def list_aliases(workdir: str | Path) -> dict[str, dict[str, Artifact]]:
    """run -> stage -> artifact, for every alias under the workdir."""
    root = storage.normalize(workdir)
    out: dict[str, dict[str, Artifact]] = {}
    for run, kind in storage.list_dir(storage.join(root, "runs")).items():
        if kind != "dir":
            continue
        stages: dict[str, Artifact] = {}
        for name, sub in storage.list_dir(storage.join(root, "runs", run)).items():
            stage = name[:-len(ALIAS_SUFFIX)] if name.endswith(ALIAS_SUFFIX) else None
            if stage is None and not storage.is_remote(root) and (Path(root) / "runs" / run / name).is_symlink():
                stage = name
            if stage is not None and stage not in stages:
                art = read_alias(root, run, stage)
                if art is not None:
                    stages[stage] = art
        if stages:
            out[run] = dict(sorted(stages.items()))
    return dict(sorted(out.items()))
