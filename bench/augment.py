"""Benchmark: SST-2 transfer-set generation through kdpipe vs bare spaCy tagging.

Reports, from one run on the same sentences:
  * raw `nlp.pipe` tagging sentences/s (one process, the pos_tag stage's components and batch);
  * kdpipe end-to-end sentences/s (read -> pos_tag -> unigram -> augment on Ray, fresh workdir,
    Ray start-up excluded and reported apart) with 1 and with 2 workers per map stage;
  * their ratio (goal >= 0.8) and the speed-up from 1 to 2 workers.

    .venv/bin/python bench/augment.py --data ../shared/data/sst2/train.tsv --scale 0.1
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import tempfile
import time
from pathlib import Path

from _env import REPO


def parse_scale(value: str, total: int) -> int:
    """A fraction of the corpus (0 < x <= 1) or a row count (> 1)."""
    x = float(value)
    return max(1, min(total, round(x * total) if x <= 1 else int(x)))


def load_rows(data: Path, scale: str):
    from stages.read import ReadStage

    full = ReadStage(config=ReadStage.Config(path=str(data), format="tsv", text_column="sentence",
                                             label_column="label")).build_table()
    n = parse_scale(scale, full.num_rows)
    return full.slice(0, n), n


def raw_tagging(texts: list[str], *, model: str, batch_size: int) -> float:
    import spacy

    from stages.pos_tag import EXCLUDE, resolve_spacy_model, tag_texts

    nlp = spacy.load(resolve_spacy_model(model), exclude=EXCLUDE)
    tag_texts(nlp, texts[:64], batch_size=batch_size)  # warm-up, as an actor's first batch would be
    start = time.perf_counter()
    tag_texts(nlp, texts, batch_size=batch_size)
    return time.perf_counter() - start


def kdpipe_run(workdir: Path, data: Path, n: int, *, workers: int, shards: int, model: str,
               batch_size: int) -> dict:
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    par = {"concurrency": workers}
    manifest = parse_manifest({"name": "bench-augment", "workdir": str(workdir), "stages": [
        {"name": "read", "type": "read", "config": {
            "path": str(data), "format": "tsv", "text_column": "sentence", "label_column": "label",
            "limit": n, "rows_per_shard": max(1, math.ceil(n / shards))}},
        {"name": "pos_tag", "type": "pos_tag", "inputs": {"data": "read"},
         "config": {"spacy_model": model, "batch_size": batch_size, **par}},
        {"name": "unigram", "type": "unigram", "inputs": {"data": "pos_tag"}},
        {"name": "augment", "type": "augment", "inputs": {"data": "pos_tag", "table": "unigram"}, "config": par},
    ]})
    start = time.perf_counter()
    summary = run_graph(build_graph(manifest), progress=False, log=lambda *a: None)
    seconds = time.perf_counter() - start
    stages = {s["name"]: s["seconds"] for s in summary}
    aug = json.loads((workdir / "runs" / "bench-augment" / "augment" / "manifest.json").read_text())["summary"]
    return {"seconds": seconds, "stages": stages, "augment": aug}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=REPO.parent / "shared" / "data" / "sst2" / "train.tsv",
                    help="SST-2 train.tsv (GLUE layout: sentence<TAB>label)")
    ap.add_argument("--scale", default="0.1", help="fraction of the corpus (<= 1) or a row count")
    ap.add_argument("--model", default="en_core_web_sm")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8, help="input shards (same for every worker count)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare")
    args = ap.parse_args(argv)
    if not args.data.is_file():
        ap.error(f"--data {args.data} not found")
    t0 = time.perf_counter()
    table, n = load_rows(args.data, args.scale)
    texts = table.column("text").to_pylist()
    raw_s = raw_tagging(texts, model=args.model, batch_size=args.batch_size)
    raw_rate = n / raw_s

    from pipeline.executor import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="kdab", dir="/tmp"))
    ray_start = time.perf_counter()
    init_ray(address=None, num_cpus=None, temp_dir=tmp / "ray")
    ray_s = time.perf_counter() - ray_start
    runs = {}
    try:
        for w in [int(x) for x in args.workers.split(",")]:
            runs[w] = kdpipe_run(tmp / f"w{w}", args.data, n, workers=w, shards=args.shards,
                                 model=args.model, batch_size=args.batch_size)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)

    print(f"SST-2 sentences: {n} (scale {args.scale}); CPUs: {os.cpu_count()}; spaCy model {args.model}, "
          f"batch {args.batch_size}; {args.shards} shards")
    print(f"raw nlp.pipe tagging (1 process):        {raw_rate:8.1f} sentences/s ({raw_s:.1f}s)")
    print(f"ray.init (excluded below):                {ray_s:8.1f} s")
    for w, r in runs.items():
        rate = n / r["seconds"]
        stages = ", ".join(f"{k} {v:.1f}s" for k, v in r["stages"].items())
        print(f"kdpipe end to end, {w} worker(s):          {rate:8.1f} sentences/s ({r['seconds']:.1f}s: {stages}); "
              f"ratio to raw tagging {rate / raw_rate:.2f} (goal >= 0.8)")
    if 1 in runs and 2 in runs:
        print(f"speed-up 1 -> 2 workers:                  {runs[1]['seconds'] / runs[2]['seconds']:8.2f}x")
    aug = next(iter(runs.values()))["augment"]
    print(f"transfer set: {aug['rows']} rows from {aug['input_rows']} ({aug['growth']}x), "
          f"{aug['samples']} samples, op rates {aug['op_rates']}, empty inputs {aug['empty_inputs']}")
    print(f"benchmark ran {time.perf_counter() - t0:.1f}s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
