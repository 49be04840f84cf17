"""Benchmark: `kdpipe plan --estimate` against the run it predicts, on the quickstart manifest.

Runs the quickstart up to `augment` and `teacher`, probes the remaining stages (nothing written
into the store: checked byte for byte), then runs the label stage and compares its estimated and
actual wall time, rows and bytes. Goal: label-stage time within 2x.

    .venv/bin/python bench/estimate.py [--teacher-epochs 1 --n-iter 2] [--probe-rows 256] [--json out.json]
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import tempfile
from pathlib import Path

from _env import REPO


def store_state(workdir: Path) -> dict[str, str]:
    out = {}
    for p in sorted(workdir.rglob("*")):
        key = str(p.relative_to(workdir))
        out[key] = ("-> " + os.readlink(p)) if p.is_symlink() else \
            hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--teacher-epochs", default="1")
    ap.add_argument("--n-iter", default="2")
    ap.add_argument("--probe-rows", type=int, default=256)
    ap.add_argument("--workdir", help="default: a fresh temporary folder")
    ap.add_argument("--json")
    args = ap.parse_args()
    import yaml

    from pipeline.estimate import estimate_graph
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="kdpipe-bench-estimate-"))
    raw = yaml.safe_load((REPO / "manifests" / "quickstart.yaml").read_text(encoding="utf-8"))
    raw["workdir"] = str(workdir)
    overrides = {"data": str(REPO / "data" / "quickstart"), "teacher_epochs": args.teacher_epochs,
                 "n_iter": args.n_iter, "student_epochs": "1"}
    graph = build_graph(parse_manifest(raw, source="manifests/quickstart.yaml", overrides=overrides))
    run_graph(graph, only=["augment", "teacher"], progress=False, log=lambda *a: None)
    before = store_state(workdir)
    label = {e.name: e for e in estimate_graph(graph, probe_rows=args.probe_rows, log=lambda *a: None)}["label"]
    unchanged = store_state(workdir) == before
    actual = {s["name"]: s for s in run_graph(graph, only=["label"], progress=False, log=lambda *a: None)}["label"]
    real_bytes = sum(p.stat().st_size for p in Path(actual["path"]).glob("shards/*.parquet"))
    result = {"estimated_s": label.seconds, "actual_s": actual["seconds"],
              "time_ratio": round(label.seconds / actual["seconds"], 3),
              "estimated_rows": label.rows, "actual_rows": actual["rows"],
              "estimated_bytes": label.bytes, "actual_bytes": real_bytes, "workers": label.workers,
              "store_unchanged_by_probe": unchanged, "load_average": os.getloadavg()}
    print(json.dumps(result, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
