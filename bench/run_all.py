"""Run every benchmark at one --scale, write one results JSON, and optionally render the tables
of BENCHMARKS.md from it.

The JSON holds the commit, the machine (CPUs, load average before and after: the tables say how
busy the machine was), library versions, and per bench its command, exit code, seconds and the
figures the bench wrote with --json (seeds included). A failing bench is recorded and the rest
still run; the exit code is 1 if any failed.

    .venv/bin/python bench/run_all.py --scale 0.05 --out results.json --render
    .venv/bin/python bench/run_all.py --scale 0.05 --out r.json --only label,augment
    .venv/bin/python bench/run_all.py --from results.json --render      # render only, run nothing
    .venv/bin/python bench/run_all.py --from all.json rerun.json --render   # later files win per bench

Each bench's entry carries the commit, scale, start time and machine of the run that made it, so
a bench rerun alone (--only) at another commit is merged with --from and each table still names
its own commit and scale.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _env import REPO, scale_fraction, scaled, write_json
from _render import render_into

# name -> (script, extra arguments at every scale). Order: the quick ones first.
BENCHES: dict[str, tuple[str, list[str]]] = {
    "train": ("train.py", []),
    "label": ("label.py", []),
    "augment": ("augment.py", []),
    "sst2_kd": ("sst2_kd.py", []),
    "multi30k_seqkd": ("multi30k_seqkd.py", []),
    "storage": ("storage.py", ["--rounds", "2"]),
    "lm_distill": ("lm_distill.py", []),
}
SEEDED = ("sst2_kd", "multi30k_seqkd", "lm_distill")
FULL_SEEDS, SMALL_SEEDS, SMALL_SCALE = 3, 2, 0.1  # below --scale 0.1: 2 seeds (a spread at 2/3 of the time)
STORAGE_PLAN = (1_000_000, 1000)  # storage.py's plan part at --scale 1: rows, shards
LIBRARIES = ("torch", "transformers", "tokenizers", "ray", "pyarrow", "spacy", "numpy", "sacrebleu")


def select(only: str | None, skip: str | None) -> list[str]:
    """Bench names in run order; unknown names are an error that lists the known ones."""
    def names(value: str | None) -> list[str]:
        given = [n.strip() for n in (value or "").split(",") if n.strip()]
        unknown = [n for n in given if n not in BENCHES]
        if unknown:
            raise SystemExit(f"unknown bench(es) {unknown}; known: {', '.join(BENCHES)}")
        return given

    keep, drop = names(only), names(skip)
    return [n for n in BENCHES if (not keep or n in keep) and n not in drop]


def scaled_arguments(name: str, scale: float) -> list[str]:
    """Arguments that follow --scale (the command line the tables name): seeds, storage's plan size."""
    out = list(BENCHES[name][1])
    if name in SEEDED:
        out += ["--seeds", str(FULL_SEEDS if scale >= SMALL_SCALE else SMALL_SEEDS)]
    if name == "storage":
        rows, shards = STORAGE_PLAN
        out += ["--plan-rows", str(scaled(rows, scale)), "--plan-shards", str(scaled(shards, scale))]
    return out


def command(name: str, scale: float, json_path: Path, workdir: Path) -> list[str]:
    script = BENCHES[name][0]
    cmd = [sys.executable, str(REPO / "bench" / script), "--scale", f"{scale:g}", "--json", str(json_path),
           *scaled_arguments(name, scale)]
    if name in SEEDED:  # artifacts in run_all's temporary folder, removed at the end
        cmd += ["--workdir", str(workdir / name)]
    return cmd


def git_state() -> tuple[str, bool]:
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=REPO, capture_output=True, text=True).stdout.strip()

    return git("rev-parse", "HEAD") or "unknown", bool(git("status", "--porcelain", "--untracked-files=no"))


def machine() -> dict[str, Any]:
    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() \
        else platform.processor()
    return {"cpus": os.cpu_count(), "cpu_model": model, "system": platform.platform(),
            "python": platform.python_version(), "loadavg_start": round(os.getloadavg()[0], 2)}


def versions() -> dict[str, str | None]:
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            out[lib] = version(lib)
        except PackageNotFoundError:
            out[lib] = None
    return out


def run_benches(names: list[str], scale: float, out: Path) -> dict[str, Any]:
    """Run the benches in turn; `out` is rewritten after each one, so a stopped run keeps what finished."""
    commit, dirty = git_state()
    results: dict[str, Any] = {"commit": commit, "dirty": dirty, "scale": scale,
                               "started_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                               "machine": machine(), "versions": versions(), "benches": {}}
    with tempfile.TemporaryDirectory(prefix="kdrunall") as tmp_name:
        tmp = Path(tmp_name)
        for name in names:
            json_path = tmp / f"{name}.json"
            cmd = command(name, scale, json_path, tmp)
            print(f"== {name}: {' '.join(cmd)}", flush=True)
            load_start, started_at = round(os.getloadavg()[0], 2), time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            start = time.perf_counter()
            proc = subprocess.run(cmd, cwd=REPO)
            seconds = time.perf_counter() - start
            result = json.loads(json_path.read_text()) if proc.returncode == 0 and json_path.is_file() else None
            results["benches"][name] = {
                "commit": commit, "dirty": dirty, "scale": scale, "started_at": started_at,
                "machine": {**results["machine"], "loadavg_start": load_start,
                            "loadavg_end": round(os.getloadavg()[0], 2)},
                "command": [f"bench/{BENCHES[name][0]}", "--scale", f"{scale:g}", *scaled_arguments(name, scale)],
                "returncode": proc.returncode, "seconds": round(seconds, 1), "result": result}
            print(f"== {name}: exit {proc.returncode} after {seconds:.0f} s", flush=True)
            write_json(out, results)
    results["machine"]["loadavg_end"] = round(os.getloadavg()[0], 2)
    return results


RUN_FIELDS = ("commit", "dirty", "scale", "started_at", "machine")


def merge(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One results dict from several run_all outputs; per bench, the last file that has it wins."""
    merged: dict[str, Any] = {**runs[-1], "benches": {}}
    for run in runs:
        for name, bench in run["benches"].items():
            merged["benches"][name] = {**{k: run[k] for k in RUN_FIELDS if k in run}, **bench}
    return merged


def render(results: dict[str, Any], target: Path) -> None:
    text, done, missing = render_into(target.read_text(encoding="utf-8"), results)
    target.write_text(text, encoding="utf-8")
    print(f"rendered into {target}: {', '.join(done) or 'nothing'}")
    if missing:
        print(f"no `<!-- run_all:NAME begin/end -->` block in {target} for: {', '.join(missing)}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=scale_fraction, help="fraction in (0, 1] of every bench's full-size run")
    p.add_argument("--out", type=Path, help="results JSON to write")
    p.add_argument("--from", dest="source", type=Path, nargs="+",
                   help="render existing results JSON(s) (runs nothing); with several, the last one per bench wins")
    p.add_argument("--render", action="store_true", help="rewrite the marked tables in --benchmarks")
    p.add_argument("--benchmarks", type=Path, default=REPO / "BENCHMARKS.md")
    p.add_argument("--only", help="comma-separated benches to run (" + ", ".join(BENCHES) + ")")
    p.add_argument("--skip", help="comma-separated benches not to run")
    args = p.parse_args(argv)
    if args.source is None and (args.scale is None or args.out is None):
        p.error("give --scale and --out to run the benches, or --from results.json --render to render only")
    if args.source is not None and not args.render:
        p.error("--from only makes sense with --render")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.source is not None:
        results = merge([json.loads(path.read_text(encoding="utf-8")) for path in args.source])
    else:
        results = run_benches(select(args.only, args.skip), args.scale, args.out)
        write_json(args.out, results)
        print(f"results in {args.out}")
    if args.render:
        render(results, args.benchmarks)
    failed = [n for n, b in results["benches"].items() if b["returncode"] != 0]
    if failed:
        print(f"failed: {', '.join(failed)}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
