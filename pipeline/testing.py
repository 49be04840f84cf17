"""Helpers to exercise stage logic without Ray: build input artifacts from tables and a context.

    art = make_artifact(tmp_path / "in", table)
    ctx = make_context(tmp_path, inputs={"data": [art]})
    stage = AugmentStage(config=AugmentStage.Config(...))
    stage.setup(ctx); out = stage.process(table, ctx, shard_index=0)
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.artifact import Artifact, file_checksums, write_json, write_shard
from pipeline.stage import StageContext


def make_artifact(path: Path, table=None, *, rows_per_shard: int | None = None,
                  metadata: dict[str, str] | None = None, files: dict[str, bytes] | None = None,
                  type_key: str = "test") -> Artifact:
    """A complete artifact directory holding `table` in shards, and/or `files` under files/."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    shards = []
    if table is not None:
        per = rows_per_shard or max(1, table.num_rows)
        for i, start in enumerate(range(0, max(table.num_rows, 1), per)):
            shards.append(write_shard(path, i, table.slice(start, per), metadata or {}))
    for rel, data in (files or {}).items():
        target = path / "files" / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    manifest: dict[str, Any] = {"type": type_key, "key": path.name, "config": {}, "key_parts": {},
                                "rows": sum(s["rows"] for s in shards), "shards": shards,
                                "files": file_checksums(path / "files"), "summary": {}}
    write_json(path / "manifest.json", manifest)
    return Artifact(path)


def make_context(tmp_path: Path, *, inputs: dict[str, list[Artifact]] | None = None,
                 name: str = "stage", seed: int = 0, num_cpus: int = 1) -> StageContext:
    out = Path(tmp_path) / f"{name}-out"
    return StageContext(stage_name=name, out_dir=out / "files", scratch_dir=out / "scratch",
                        inputs=inputs or {}, seed=seed, num_cpus=num_cpus, workdir=Path(tmp_path))
