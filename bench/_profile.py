"""Where a map stage's time goes, measured on the stage's own code in this process (no Ray):
each step of `setup`, `process` and the shard write is wrapped in a timer for the run, then
restored. Used by `bench/label.py --profile` and `bench/augment.py --profile`; the Ray-side
costs (actor start-up, shard hand-off) come from the real run's manifest.json `timing`.
"""
from __future__ import annotations

import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator


class Timers:
    """Seconds and calls per named step."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.calls: dict[str, int] = {}

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] = self.seconds.get(name, 0.0) + seconds
        self.calls[name] = self.calls.get(name, 0) + 1

    def timed(self, name: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.add(name, time.perf_counter() - start)
        return wrapper

    @contextmanager
    def patched(self, targets: list[tuple[Any, str, str]]) -> Iterator["Timers"]:
        """Wrap `owner.attr` in a timer named `name` for each (owner, attr, name); restore after."""
        saved = [(owner, attr, getattr(owner, attr)) for owner, attr, _ in targets]
        try:
            for owner, attr, name in targets:
                setattr(owner, attr, self.timed(name, getattr(owner, attr)))
            yield self
        finally:
            for owner, attr, original in reversed(saved):
                setattr(owner, attr, original)

    @contextmanager
    def span(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - start)

    def as_dict(self) -> dict[str, dict[str, float]]:
        return {k: {"seconds": round(v, 4), "calls": self.calls[k]} for k, v in self.seconds.items()}


def write_targets() -> list[tuple[Any, str, str]]:
    """The steps of pipeline.artifact.write_shard: Parquet encode+write, hash, marker (the
    marker's own fsync included); the shard's fsync and rename are the rest. Whichever of the
    storage layer's functions this checkout has are wrapped."""
    import pyarrow.parquet as pq

    import pipeline.artifact as artifact
    import pipeline.hashing as hashing

    targets = [(pq, "write_table", "parquet_write"), (hashing, "sha256_file", "hash")]
    if hasattr(artifact, "sha256_file"):
        targets.append((artifact, "sha256_file", "hash"))
    try:
        import pipeline.storage as storage
    except ImportError:
        storage = None
    if storage is not None and hasattr(storage, "write_json"):
        targets.append((storage, "write_json", "marker"))
    else:
        targets.append((artifact, "write_json", "marker"))
    return targets


def run_shards(stage, ctx, in_art, out_dir: Path, timers: Timers, *, extra: list[tuple[Any, str, str]]) -> int:
    """setup + every shard (read, process, write_shard) as the Ray worker does, timed."""
    import pyarrow.parquet as pq

    from pipeline.artifact import write_shard

    with timers.span("setup (model load)"):
        stage.setup(ctx)
    metadata = {f"kdpipe.{k}": v for k, v in stage.metadata().items()}
    rows = 0
    with timers.patched(extra + write_targets()):
        for index, path in enumerate(in_art.shard_paths()):
            with timers.span("read input shard"):
                table = pq.read_table(path)
            with timers.span("process (total)"):
                out = stage.process(table, ctx, shard_index=index)
            with timers.span("write_shard (total)"):
                write_shard(out_dir, index, out, metadata)
            rows += table.num_rows
    return rows


def breakdown(t: dict[str, dict[str, float]], *, process_parts: list[str]) -> dict[str, float]:
    """Seconds per step, with the unattributed rest of `process` and of `write_shard` named."""
    sec = {k: v["seconds"] for k, v in t.items()}
    out = {k: sec[k] for k in ("setup (model load)", "read input shard") if k in sec}
    out.update({k: sec[k] for k in process_parts if k in sec})
    out["process: the rest (Arrow columns, Python glue)"] = sec.get("process (total)", 0.0) - sum(
        sec.get(k, 0.0) for k in process_parts)
    writes = ("parquet_write", "hash", "marker")
    out.update({f"write: {k}": sec[k] for k in writes if k in sec})
    out["write: the rest (fsync, rename)"] = sec.get("write_shard (total)", 0.0) - sum(sec.get(k, 0.0) for k in writes)
    return out
