"""Benchmark: one manifest run under several global seeds, each model's held-out metric as
mean ± sd over the seeds (the figures of BENCHMARKS.md's seed-method rows: zero-shot FR->DE,
born-again, multi-task, adversarial KD).

Every seed is a full run of the manifest through the engine (artifacts cached by key, so the
seed-independent stages — reads, splits — run once). The metric of each model comes from the
manifest's evaluate stages (`files/metrics.json`); the scale is whatever `--var`s say, and the
JSON output records them with the seeds and the wall time.

    .venv/bin/python bench/seeds.py manifests/zeroshot-fr-de.yaml --seeds 0 1 2 \
        --var pairs=4000 --var teacher_epochs=3 ... --json bench-zeroshot.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _env import write_json  # first: _env sets the offline environment


def evaluate_metrics(summary: list[dict]) -> dict[str, dict[str, float]]:
    """model name -> metrics, from every evaluate stage of a finished run, from every
    train_multitask stage (its per-task dev accuracy as STAGE[TASK], discriminator accuracy), and
    from every train stage with domain_adversarial (STAGE[discriminator])."""
    out: dict[str, dict[str, float]] = {}
    for stage in summary:
        if stage["type"] == "train_multitask":
            metrics = json.loads((Path(stage["path"]) / "files" / "metrics.json").read_text())
            for task, entry in metrics["tasks"].items():
                if entry.get("dev_accuracy") is not None:
                    out[f"{stage['name']}[{task}]"] = {"accuracy": entry["dev_accuracy"]}
            for key in ("discriminator_accuracy_first", "discriminator_accuracy_last"):
                if key in metrics:
                    out.setdefault(f"{stage['name']}[discriminator]", {})[key.rsplit("_", 1)[1]] = metrics[key]
            continue
        if stage["type"] == "train":  # a domain_adversarial student's discriminator, first and last epoch
            metrics = json.loads((Path(stage["path"]) / "files" / "metrics.json").read_text())
            if "discriminator_accuracy_last" in metrics:
                out[f"{stage['name']}[discriminator]"] = {
                    "first": metrics["discriminator_accuracy_first"], "last": metrics["discriminator_accuracy_last"]}
            continue
        if stage["type"] != "evaluate":
            continue
        metrics = json.loads((Path(stage["path"]) / "files" / "metrics.json").read_text())
        for model in metrics["models"]:
            out[model["name"]] = {k: v for k, v in model["metrics"].items() if isinstance(v, (int, float))}
    return out


def mean_sd(values: list[float]) -> dict[str, float]:
    return {"mean": round(statistics.fmean(values), 3),
            "sd": round(statistics.stdev(values), 3) if len(values) > 1 else 0.0, "n": len(values)}


def main() -> None:
    from pipeline.graph import build_graph
    from pipeline.manifest import load_manifest, parse_var_overrides
    from pipeline.runner import run_graph

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("manifest", type=Path)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--seed-var", default=None, metavar="NAME",
                        help="vary this manifest variable instead of the manifest seed (e.g. student_seed: "
                             "students of several seeds over teachers trained once)")
    parser.add_argument("--var", action="append", default=[], metavar="NAME=VALUE")
    parser.add_argument("--workdir", type=Path, default=None, help="artifact store (default: a temp dir)")
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    overrides = parse_var_overrides(args.var)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="kdpipe-seeds-"))
    per_seed: dict[int, dict[str, dict[str, float]]] = {}
    start = time.perf_counter()
    for seed in args.seeds:
        if args.seed_var:
            manifest = load_manifest(args.manifest, overrides={**overrides, args.seed_var: str(seed)})
        else:
            manifest = load_manifest(args.manifest, overrides=overrides)
            manifest.seed = seed
        manifest.workdir = str(workdir)
        summary = run_graph(build_graph(manifest), progress=False, log=lambda *a: None)
        per_seed[seed] = evaluate_metrics(summary)
        print(f"seed {seed}: {json.dumps(per_seed[seed])}", flush=True)
    models = sorted({m for result in per_seed.values() for m in result})
    table = {}
    for model in models:
        metrics = sorted({k for r in per_seed.values() for k in r.get(model, {})})
        table[model] = {k: mean_sd([r[model][k] for r in per_seed.values() if k in r.get(model, {})])
                        for k in metrics}
    result = {"manifest": str(args.manifest), "vars": overrides, "seeds": args.seeds, "seed_var": args.seed_var,
              "seconds": round(time.perf_counter() - start, 1), "per_seed": per_seed, "mean_sd": table}
    for model, metrics in table.items():
        shown = ", ".join(f"{k} {v['mean']} ± {v['sd']}" for k, v in metrics.items())
        print(f"{model:<24} {shown}")
    if args.json:
        write_json(args.json, result)


if __name__ == "__main__":
    main()
