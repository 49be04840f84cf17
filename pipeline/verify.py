"""`kdpipe verify [ARTIFACT|RUN/STAGE|RUN] [--workdir W]`: check stored artifacts against their
manifest.json, without trusting anything the engine wrote except the manifest.

For each artifact:
* every shard listed in manifest.json exists, has the recorded size and sha256, is readable
  Parquet with the recorded row count, and has the same schema as the first shard;
* no stray `shards/*.parquet` that the manifest does not list (readers glob the folder, so a
  stray shard would silently add rows);
* files artifacts: every file under files/ matches its recorded size and sha256, none missing,
  none extra.

Without a target it also re-hashes the teachers stored under `models/` (pipeline/model_store.py).

Prints one line per bad shard or file (`BAD <path>: <reason>`) and exits 1 if any; exit 0 and a
one-line tally otherwise. Reading is all it does: `kdpipe run --verify` re-hashes like this and
recomputes what is bad (a plain `run` trusts the stored digests and checks sizes only, so that
planning a cached artifact of many shards costs one listing, not a read of every byte).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.artifact import MANIFEST, Artifact, file_checksums, list_aliases, read_alias
from pipeline.errors import KdpipeError
from pipeline.model_store import stored_models, verify_model


class TargetNotFound(KdpipeError):
    exit_code = 2


def verify_artifact(path) -> tuple[list[str], dict[str, int]]:
    """Problems (one line each) and counts of what was checked in one artifact (path or URI)."""
    art = Artifact(path)
    path = art.loc
    counts = {"artifacts": 1, "shards": 0, "files": 0, "rows": 0}
    if not art.is_complete():
        return [f"BAD {path}: no {MANIFEST} (an interrupted run; rerun `kdpipe run` to finish it)"], counts
    try:
        manifest = art.manifest
    except (OSError, ValueError) as e:
        return [f"BAD {art.manifest_path}: unreadable manifest ({e})"], counts
    problems = _verify_shards(art, manifest.get("shards", []), counts)
    problems += _verify_files(art, manifest.get("files", {}), counts)
    return problems, counts


def _verify_shards(art: Artifact, shards: list[dict[str, Any]], counts: dict[str, int]) -> list[str]:
    problems: list[str] = []
    first_schema = None
    listed = set()
    present = storage.list_files(art.sub("shards"), recursive=False)
    for entry in sorted(shards, key=lambda s: s["index"]):
        shard = art.shard_path(entry["index"])
        name = storage.basename(shard)
        listed.add(name)
        counts["shards"] += 1
        if name not in present:
            problems.append(f"BAD {shard}: missing")
            continue
        size = present[name]
        if size != entry.get("bytes"):
            problems.append(f"BAD {shard}: {size} bytes, manifest says {entry.get('bytes')} (truncated or altered)")
            continue
        if storage.sha256(shard) != entry.get("sha256"):
            problems.append(f"BAD {shard}: sha256 differs from manifest (altered)")
            continue
        try:
            meta = storage.parquet_file(shard).metadata
            schema = meta.schema.to_arrow_schema()
        except Exception as e:  # noqa: BLE001 - any reader failure means a bad shard
            problems.append(f"BAD {shard}: not readable Parquet ({type(e).__name__}: {e})")
            continue
        if meta.num_rows != entry.get("rows"):
            problems.append(f"BAD {shard}: {meta.num_rows} rows, manifest says {entry.get('rows')}")
            continue
        if first_schema is None:
            first_schema = schema
        elif not schema.equals(first_schema, check_metadata=False):
            problems.append(f"BAD {shard}: schema differs from the first shard's "
                            f"({_schema_diff(first_schema, schema)})")
            continue
        counts["rows"] += meta.num_rows
    for stray in sorted(n for n in present if n.endswith(".parquet") and n not in listed):
        problems.append(f"BAD {storage.join(art.sub('shards'), stray)}: not listed in {MANIFEST} "
                        "(stray shard; readers would include it)")
    return problems


def _schema_diff(first, other) -> str:
    a = {f.name: str(f.type) for f in first}
    b = {f.name: str(f.type) for f in other}
    parts = [f"{k}: {a.get(k, '-')} vs {b.get(k, '-')}" for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)]
    return "; ".join(parts) or "column order differs"


def _verify_files(art: Artifact, recorded: dict[str, dict[str, Any]], counts: dict[str, int]) -> list[str]:
    problems: list[str] = []
    actual = file_checksums(art.sub("files"))
    for rel in sorted(set(recorded) | set(actual)):
        path = storage.join(art.sub("files"), rel)
        counts["files"] += 1
        if rel not in actual:
            problems.append(f"BAD {path}: missing")
        elif rel not in recorded:
            problems.append(f"BAD {path}: not listed in {MANIFEST} (added after the stage finished)")
        elif actual[rel]["bytes"] != recorded[rel].get("bytes"):
            problems.append(f"BAD {path}: {actual[rel]['bytes']} bytes, manifest says "
                            f"{recorded[rel].get('bytes')} (truncated or altered)")
        elif actual[rel]["sha256"] != recorded[rel].get("sha256"):
            problems.append(f"BAD {path}: sha256 differs from manifest (altered)")
    return problems


def resolve_artifacts(target: str | None, workdir: str) -> list[str]:
    """ARTIFACT dir, RUN/STAGE alias, RUN (all its stages), or everything under the workdir;
    the workdir may be a local folder or an s3:// URI."""
    root = storage.normalize(workdir)
    if target is None:
        arts = storage.join(root, "artifacts")
        found = [storage.join(arts, t, k) for t, kind in storage.list_dir(arts).items() if kind == "dir"
                 for k, sub in storage.list_dir(storage.join(arts, t)).items() if sub == "dir"]
        if not found:
            raise TargetNotFound(f"no artifacts under {arts}; pass --workdir (default: data)")
        return sorted(found)
    if storage.is_remote(target):
        loc = target.rstrip("/").removesuffix("/shards")
        if storage.exists(storage.join(loc, MANIFEST)) or storage.is_dir(storage.join(loc, "completions")):
            return [loc]
    else:
        path = Path(target)
        if path.name == "shards" and path.is_dir():
            path = path.parent
        if (path / MANIFEST).exists() or (path / "completions").is_dir():
            return [str(path.resolve())]
    run, _, stage = target.partition("/")
    if stage:
        art = read_alias(root, run, stage)
        if art is not None:
            return [art.loc]
    elif run in list_aliases(root):
        return [art.loc for art in list_aliases(root)[run].values()]
    raise TargetNotFound(f"no artifact or run at {target!r} in workdir {workdir!r}; "
                         "give an artifact path, RUN/STAGE or RUN (`kdpipe ls --workdir W` lists them)")


def cmd_verify(args: argparse.Namespace) -> int:
    paths = resolve_artifacts(args.target, args.workdir)
    totals = {"artifacts": 0, "shards": 0, "files": 0, "rows": 0}
    bad = 0
    for path in paths:
        problems, counts = verify_artifact(path)
        for line in problems:
            print(line, file=sys.stderr)
        bad += len(problems)
        for k, v in counts.items():
            totals[k] += v
    if args.target is None:  # the whole workdir: also the teachers stored under models/
        for loc in stored_models(args.workdir):
            problems, n = verify_model(loc)
            for line in problems:
                print(line, file=sys.stderr)
            bad += len(problems)
            totals["files"] += n
    tally = (f"{totals['artifacts']} artifact(s), {totals['shards']} shard(s), {totals['files']} file(s), "
             f"{totals['rows']} row(s) checked")
    if args.json:
        print(json.dumps({**totals, "problems": bad}))
    if bad:
        print(f"verify: {bad} problem(s); {tally}. Rerun `kdpipe run --verify` to recompute what is bad.",
              file=sys.stderr)
        return 1
    if not args.json:
        print(f"ok: {tally}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("verify", help="check stored shards and files against their checksums and schema")
    p.add_argument("target", nargs="?", help="artifact path, RUN/STAGE, or RUN (default: every artifact)")
    p.add_argument("--workdir", default="data")
    p.add_argument("--json", action="store_true", help="print the tally as one JSON line")
    p.set_defaults(func=cmd_verify)
