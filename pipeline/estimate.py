"""`kdpipe plan M.yaml --estimate`: what a run will cost before it runs.

Each stage that would run is probed on a sample of its input (`--probe-rows`, spread over the
first input shard) in this process, without Ray: map stages run `setup` once and `process` on the
sample, on as many torch threads as one of their workers gets; task stages run on the sample and
are scaled linearly by rows (a rough guide: training time also depends on epochs and early
stopping). From the probe: output rows (input rows x the sample's growth), output bytes
(the sample written as zstd Parquet, per row), and the wall time at the configured concurrency:
worker start (its imports, timed now in a fresh process) + setup + rows x seconds-per-row /
workers, where workers = `concurrency` or the CPUs (GPUs) available over each worker's share,
capped by the shard count. Cached stages cost nothing and
report their real rows and bytes. Every probe writes only under a temporary folder: the artifact
store is left byte-identical."""
from __future__ import annotations

import dataclasses
import math
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from pipeline.artifact import Artifact
from pipeline.graph import Graph, external_artifact
from pipeline.plan import make_plan
from pipeline.stage import StageContext
from pipeline.testing import make_artifact

# What a new Ray worker imports before a model stage's setup; timed in a fresh process at estimate
# time, so the figure follows the machine's current load (ENVIRONMENT.md: 7-10 s per actor with
# the model load, which the probe measures itself).
WORKER_IMPORTS = ("ray", "pyarrow.parquet", "torch", "transformers")


def worker_start_seconds() -> float:
    import subprocess
    import sys

    start = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import " + ", ".join(WORKER_IMPORTS)], check=False,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=600)
    return time.perf_counter() - start


@dataclasses.dataclass
class StageEstimate:
    name: str
    type: str
    status: str  # cached | probed | not probed
    rows: int | None = None
    bytes: int | None = None
    seconds: float | None = None
    workers: int | None = None
    gpus: float = 0.0
    note: str = ""

    def cost(self, gpu_hour_cost: float | None) -> float | None:
        """Price of the machine-hours the stage holds: per GPU for GPU stages, else one machine."""
        if gpu_hour_cost is None or self.seconds is None:
            return None
        return self.seconds / 3600 * gpu_hour_cost * max(1.0, self.gpus * (self.workers or 1))


@dataclasses.dataclass
class _Probe:
    """What downstream probes read: a sample artifact (or the real one) and the full-size figures."""

    art: Artifact
    rows: int
    shards: int


def _sample(table, n: int):
    if table.num_rows <= n:
        return table
    step = table.num_rows / n
    return table.take([int(i * step) for i in range(n)])


def _set_threads(n: int) -> int:
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(max(1, n))
    return before


def _art_bytes(art: Artifact) -> int:
    return sum(p.stat().st_size for p in art.path.rglob("*") if p.is_file() and not p.name.startswith("."))


def _workers(stage, shards: int, cpus: float, gpus: float) -> int:
    res = stage.resources()
    configured = getattr(stage.config, "concurrency", None)
    n = configured or max(1, int(cpus // max(res.get("num_cpus", 1), 1e-6)))
    if res.get("num_gpus") and not configured:
        n = max(1, min(n, int(gpus // res["num_gpus"]))) if gpus else 1
    return max(1, min(n, shards))


def estimate_graph(graph: Graph, *, probe_rows: int = 256, cpus: float | None = None, gpus: float | None = None,
                   log=print) -> list[StageEstimate]:
    manifest = graph.manifest
    cpus = cpus or manifest.ray.num_cpus or os.cpu_count() or 1
    if gpus is None:
        gpus = float(_cuda_count())
    plans = {p.name: p for p in make_plan(graph)}
    actor_start: list[float] = []  # timed once, when the first map stage is probed
    probes: dict[str, _Probe] = {}
    out: list[StageEstimate] = []
    tmp = Path(tempfile.mkdtemp(prefix="kdpipe-estimate-"))
    try:
        for name, node in graph.nodes.items():
            for ref in node.upstream():
                if ref.startswith("@") and ref not in probes:
                    art = external_artifact(manifest, ref)
                    probes[ref] = _Probe(art, art.manifest.get("rows", 0), max(1, art.num_shards()))
            plan = plans[name]
            if plan.status == "cached":
                art = Artifact(plan.art_dir)
                probes[name] = _Probe(art, art.manifest.get("rows", 0), max(1, art.num_shards()))
                out.append(StageEstimate(name, node.type, "cached", art.manifest.get("rows"), _art_bytes(art), 0.0))
                continue
            missing = [u for u in node.upstream() if u not in probes]
            if missing:
                out.append(StageEstimate(name, node.type, "not probed", note=f"needs {', '.join(missing)} (not probed)"))
                continue
            log(f"[{name}] probing ...")
            try:
                if node.stage.kind == "map" and not actor_start:
                    actor_start.append(worker_start_seconds())
                est, probe = _probe_stage(node, manifest, probes, tmp / name, probe_rows=probe_rows, cpus=cpus,
                                          gpus=gpus, actor_start=actor_start[0] if actor_start else 0.0)
            except Exception as e:  # a probe on a sample may fail where the full run would not
                out.append(StageEstimate(name, node.type, "not probed", note=f"probe failed: {type(e).__name__}: {e}"[:300]))
                continue
            probes[name] = probe
            out.append(est)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _cuda_count() -> int:
    try:
        import torch
    except ImportError:
        return 0
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _probe_stage(node, manifest, probes: dict[str, _Probe], tmp: Path, *, probe_rows: int, cpus: float,
                 gpus: float, actor_start: float) -> tuple[StageEstimate, _Probe]:
    """Run the stage on a sample, in this process, with the threads its actors would get."""
    stage = type(node.stage)(config=node.stage.config)  # fresh: setup() loads models; keep them off the graph
    inputs = {role: [probes[n].art for n in names] for role, names in node.inputs.items()}
    threads = max(1, int(stage.resources().get("num_cpus", 1)))
    ctx = StageContext(stage_name=node.name, out_dir=tmp / "files", scratch_dir=tmp / "scratch", inputs=inputs,
                       seed=manifest.seed if stage.uses_seed() else None, num_cpus=threads, workdir=tmp)
    ctx.out_dir.mkdir(parents=True)
    ctx.scratch_dir.mkdir(parents=True)
    before = _set_threads(threads)
    try:
        if stage.kind == "source":
            return _probe_source(node, stage, ctx, tmp, probe_rows=probe_rows)
        data = probes[node.inputs["data"][0]] if "data" in node.inputs else None
        if stage.kind == "map":
            assert data is not None
            return _probe_map(node, stage, ctx, data, tmp, probe_rows=probe_rows, cpus=cpus, gpus=gpus,
                              actor_start=actor_start, threads=threads)
        return _probe_task(node, stage, ctx, data, probes, tmp, probe_rows=probe_rows)
    finally:
        _set_threads(before)


def _probe_source(node, stage, ctx: StageContext, tmp: Path, *, probe_rows: int) -> tuple[StageEstimate, _Probe]:
    start = time.perf_counter()
    table = stage.read(ctx)
    seconds = time.perf_counter() - start
    md = {f"kdpipe.{k}": v for k, v in stage.metadata().items()}
    sample = _sample(table, probe_rows)
    art = make_artifact(tmp / "sample", sample, metadata=md)
    per_row = art.shard_path(0).stat().st_size / max(sample.num_rows, 1)
    shards = max(1, math.ceil(table.num_rows / max(stage.rows_per_shard(), 1)))
    est = StageEstimate(node.name, node.type, "probed", table.num_rows, int(per_row * table.num_rows),
                        round(seconds, 2), 1)
    return est, _Probe(art, table.num_rows, shards)


def _probe_map(node, stage, ctx: StageContext, data: _Probe, tmp: Path, *, probe_rows: int, cpus: float,
               gpus: float, actor_start: float, threads: int) -> tuple[StageEstimate, _Probe]:
    sample_in = _sample(data.art.read_shard(0), probe_rows)
    start = time.perf_counter()
    stage.setup(ctx)
    setup_s = time.perf_counter() - start
    start = time.perf_counter()
    result = stage.process(sample_in, ctx, shard_index=0)
    per_row_s = (time.perf_counter() - start) / max(sample_in.num_rows, 1)
    md = {f"kdpipe.{k}": v for k, v in stage.metadata().items()}
    art = make_artifact(tmp / "sample", result, metadata=md)
    growth = result.num_rows / max(sample_in.num_rows, 1)
    rows = int(round(data.rows * growth))
    out_bytes = int(art.shard_path(0).stat().st_size / max(result.num_rows, 1) * rows)
    workers = _workers(stage, data.shards, cpus, gpus)
    # Shards go to workers whole: the busiest worker takes ceil(shards / workers) of them.
    busiest = math.ceil(data.shards / workers) / data.shards
    seconds = actor_start + setup_s + data.rows * busiest * per_row_s
    note = (f"{per_row_s * 1000:.2f} ms/row on {threads} thread(s), worker start {actor_start:.1f} s, "
            f"setup {setup_s:.1f} s, probe {sample_in.num_rows} rows")
    gpu_share = stage.resources().get("num_gpus", 0.0)
    return (StageEstimate(node.name, node.type, "probed", rows, out_bytes, round(seconds, 1), workers,
                          gpu_share, note), _Probe(art, rows, data.shards))


def _probe_task(node, stage, ctx: StageContext, data: _Probe | None, probes: dict[str, _Probe], tmp: Path, *,
                probe_rows: int) -> tuple[StageEstimate, _Probe]:
    """Run on sampled inputs, scale by the main input's rows."""
    sampled = {}
    for role, names in node.inputs.items():
        arts = []
        for i, n in enumerate(names):
            p = probes[n]
            if p.art.num_shards():
                part = _sample(p.art.read_shard(0), probe_rows)
                md = p.art.file_metadata()
                arts.append(make_artifact(tmp / f"in-{role}-{i}", part, metadata=md))
            else:
                arts.append(p.art)
        sampled[role] = arts
    ctx.inputs = sampled
    start = time.perf_counter()
    stage.run(ctx)
    seconds = time.perf_counter() - start
    scale = (data.rows / max(sampled["data"][0].manifest.get("rows", 1), 1)) if data and data.art.num_shards() else 1.0
    make_artifact(tmp, None)  # manifest.json over files/ so downstream probes can read it
    files_bytes = sum(p.stat().st_size for p in ctx.out_dir.rglob("*") if p.is_file())
    gpu_share = stage.resources().get("num_gpus", 0.0)
    est = StageEstimate(node.name, node.type, "probed", None, files_bytes, round(seconds * scale, 1), 1, gpu_share,
                        f"ran on a {probe_rows}-row sample in {seconds:.1f} s, scaled x{scale:.1f} by rows")
    return est, _Probe(Artifact(tmp), 0, 1)


def format_estimates(estimates: list[StageEstimate], *, gpu_hour_cost: float | None) -> str:
    lines = [f"{'stage':<18} {'type':<10} {'status':<10} {'rows':>10} {'bytes':>10} {'workers':>7} {'est. s':>8}"
             + (f" {'cost':>9}" if gpu_hour_cost is not None else "") + "  note"]
    total_s = total_cost = 0.0
    for e in estimates:
        cost = e.cost(gpu_hour_cost)
        total_s += e.seconds or 0.0
        total_cost += cost or 0.0
        lines.append(f"{e.name:<18} {e.type:<10} {e.status:<10} {_num(e.rows):>10} {_size(e.bytes):>10} "
                     f"{_num(e.workers):>7} {_num(e.seconds):>8}" + (f" {_num(cost, 2):>9}" if gpu_hour_cost is not None else "")
                     + f"  {e.note}")
    lines.append(f"{'total':<18} {'':<10} {'':<10} {'':>10} {'':>10} {'':>7} {total_s:>8.1f}"
                 + (f" {total_cost:>9.2f}" if gpu_hour_cost is not None else "")
                 + "  (stages in sequence; plus ~5 s to start Ray)")
    return "\n".join(lines)


def _num(v: Any, digits: int = 1) -> str:
    if v is None:
        return "?"
    return f"{v:.{digits}f}" if isinstance(v, float) else str(v)


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)
