"""`kdpipe run` as a function: validate, plan, execute on Ray, record aliases and a summary."""
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.artifact import write_json
from pipeline.graph import Graph, build_graph, external_artifact
from pipeline.errors import ManifestError
from pipeline.manifest import Manifest, check_ray_address, load_manifest
from pipeline.plan import StagePlan, make_plan, refresh
from pipeline.stage import Problem


def load_graph(manifest_path: str | Path, *, overrides: dict[str, str] | None = None,
               workdir: str | None = None) -> Graph:
    manifest = load_manifest(manifest_path, overrides=overrides)
    if workdir:
        manifest.workdir = workdir
    return build_graph(manifest)


def _progress_factory(enabled: bool):
    if not enabled:
        return None
    from tqdm import tqdm

    return tqdm


def run_graph(graph: Graph, *, only: list[str] | None = None, start: str | None = None,
              stop: str | None = None, address: str | None = None, progress: bool = True,
              summary_json: str | Path | None = None, log=print, verify: bool = False) -> list[dict[str, Any]]:
    """Plan and run. Concurrency with other runs on the same workdir goes through claims
    (pipeline/claims.py): this run declares every artifact it uses (gc keeps them), and takes a
    writer claim on each artifact it computes, so a concurrent run needing the same artifact
    waits for it and then reuses it, while runs needing different artifacts proceed in parallel."""
    from pipeline.claims import Claims
    from pipeline.executor import update_alias

    manifest: Manifest = graph.manifest
    _check_address(address)
    selected = graph.select(only=only, start=start, stop=stop) if (only or start or stop) else None
    workdir = manifest.workdir if storage.is_remote(manifest.workdir) else Path(manifest.workdir)
    if not storage.is_remote(workdir):
        workdir.mkdir(parents=True, exist_ok=True)
    summary: list[dict[str, Any]] = []
    dirs: dict[str, Any] = {ref: external_artifact(manifest, ref).loc
                            for node in graph.nodes.values() for ref in node.upstream() if ref.startswith("@")}
    with Claims(str(workdir), run=manifest.name, log=lambda msg: log(msg)) as claims:
        plans = make_plan(graph, selected=selected, verify=verify)
        claims.declare([*dirs.values(), *(str(p.art_dir) for p in plans)])
        if claims.wait_for_gc():
            plans = make_plan(graph, selected=selected, verify=verify)
        executor = None
        to_run = [p for p in plans if p.status != "cached"]
        if to_run:
            executor = _start_executor(graph, address=address, progress=progress)
            executor.check_placement(to_run)  # before any stage writes: an unplaceable run leaves nothing
        for plan in plans:
            dirs[plan.name] = plan.art_dir
            started = time.time()
            if plan.status != "cached":
                claims.acquire_writer(str(plan.art_dir))
                # Another run may have finished or advanced it while we planned or waited.
                plan = refresh(plan, graph, verify=verify)
            try:
                entry = {"name": plan.name, "type": plan.node.type, "key": plan.key,
                         "path": str(plan.art_dir), "reason": plan.reason}
                if plan.status == "cached":
                    entry.update(_cached_entry(plan, log))
                else:
                    executor = executor or _start_executor(graph, address=address, progress=progress)
                    started = time.time()
                    entry.update(_execute(executor, plan, dirs, log))
                update_alias(workdir, manifest.name, plan.name, plan.art_dir)
            finally:
                claims.release_writer(str(plan.art_dir))
            entry.update(started_at=round(started, 3), finished_at=round(time.time(), 3))
            summary.append(entry)
        storage.write_json(storage.join(str(workdir), "runs", manifest.name, "_last_run.json"),
                           {"manifest": manifest.source, "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                            "stages": summary})
    if summary_json:
        write_json(Path(summary_json), {"run": manifest.name, "stages": summary})
    return summary


def _start_executor(graph: Graph, *, address: str | None, progress: bool):
    from pipeline.executor import Executor, init_ray

    init_ray(address=address or graph.manifest.ray.address, num_cpus=graph.manifest.ray.num_cpus,
             temp_dir=_ray_temp_dir())
    return Executor(graph, progress=_progress_factory(progress))


def _cached_entry(plan: StagePlan, log) -> dict[str, Any]:
    art_manifest = storage.read_json(storage.join(str(plan.art_dir), "manifest.json"))
    n = len(art_manifest.get("shards", [])) or (1 if plan.node.stage.kind == "task" else 0)
    log(f"[{plan.name}] cached ({plan.key})")
    return dict(status="cached", shards_run=0, shards_total=n, rows=art_manifest.get("rows", 0), seconds=0.0)


def _execute(executor, plan: StagePlan, dirs: dict[str, Any], log) -> dict[str, Any]:
    log(f"[{plan.name}] {'resuming' if plan.status == 'resume' else 'running'}: {plan.reason}")
    result = executor.run_stage(plan, dirs)
    nodes = sorted({s.get("node_id") for s in result.pop("shards") if s.get("node_id")})
    made = "files" if plan.node.stage.kind == "task" else f"{result['rows']} rows, " \
        f"{result['shards_run']}/{result['shards_total']} shards run"
    log(f"[{plan.name}] done: {made} in {result['seconds']:.1f}s")
    return dict(status="resumed" if plan.status == "resume" else "ran", nodes=nodes, **result)


def _check_address(address: str | None) -> None:
    try:
        check_ray_address(address)
    except ValueError as e:
        raise ManifestError([Problem("--address", str(e))]) from None


def _ray_temp_dir() -> Path | None:
    # Unix socket paths are limited to ~107 bytes: keep Ray's session dir short.
    value = os.environ.get("KDPIPE_RAY_TMPDIR")
    return Path(value) if value else None


def plan_graph(graph: Graph, *, only: list[str] | None = None, start: str | None = None,
               stop: str | None = None, verify: bool = False) -> list[StagePlan]:
    selected = graph.select(only=only, start=start, stop=stop) if (only or start or stop) else None
    return make_plan(graph, selected=selected, verify=verify)
