"""Runs a plan on Ray. The only module that imports Ray.

Why Ray tasks and actors rather than Ray Data: the engine owns shard identity (deterministic
names derived from the input's shards, not from worker count), per-shard completion markers and
resume; Ray Data's writers pick their own file names and blocks. Model stages still follow the
Ray Data shape: a callable class whose `setup` loads the model once per actor.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from pathlib import Path
from typing import Any, Callable

from pipeline import storage
from pipeline.artifact import MANIFEST, Artifact, MissingShard, file_checksums, write_alias, write_shard
from pipeline.errors import KdpipeError, StageFailed
from pipeline.graph import Graph
from pipeline.model_store import store_model
from pipeline.placement import PlacementError, timed_out, unplaceable
from pipeline.plan import StagePlan
from pipeline.stage import Stage, StageContext

MAX_SHARD_ATTEMPTS = 3
# The first ready actor waits this long for its peers before taking work alone, so that actors
# set up at different speeds (other nodes, model loads) all share a stage's shards.
STARTUP_GRACE_S = 30.0
# Shards handed to one map actor at a time. A GPU actor gets two: the second one's read and the
# first one's write overlap the device's work (see _ShardWorkerImpl). A CPU actor gets one: there
# read and write would run on the model's own cores, and measured (bench/label.py --rounds, BENCHMARKS.md)
# the second shard in flight slowed the forward passes 5-8% while saving ~0.1% in I/O.
GPU_SHARDS_PER_ACTOR = 2
CPU_SHARDS_PER_ACTOR = 1


def shards_per_actor(res: dict[str, float]) -> int:
    """How many shards one actor of a map stage with these Ray resources holds at once."""
    return GPU_SHARDS_PER_ACTOR if res.get("num_gpus", 0) > 0 else CPU_SHARDS_PER_ACTOR


def _enter_worker(cwd: str, num_cpus: float) -> None:
    """Relative paths in configs mean the driver's working directory; give threads their CPUs."""
    if os.path.isdir(cwd):
        os.chdir(cwd)
    threads = max(1, int(num_cpus))
    os.environ["OMP_NUM_THREADS"] = str(threads)
    try:
        import torch

        torch.set_num_threads(threads)
    except ImportError:
        pass


def init_ray(*, address: str | None, num_cpus: int | None, temp_dir: Path | None = None) -> bool:
    """Connect to a cluster, or start embedded local Ray. Returns True if this call started it."""
    import ray

    if ray.is_initialized():
        return False
    kwargs: dict[str, Any] = {"include_dashboard": False, "log_to_driver": True,
                              "logging_level": "WARNING"}
    if address:
        kwargs["address"] = address
    else:
        # An embedded session is reachable only from this machine: no token auth needed.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        kwargs["num_cpus"] = num_cpus or os.cpu_count()
        # Ray starts workers at niceness +15: on a busy machine everything else, the driver and
        # Ray's daemons included, preempts the model (label model time 0.55x a bare loop under load).
        kwargs["_system_config"] = {"worker_niceness": 0}
        if temp_dir is not None:
            kwargs["_temp_dir"] = str(temp_dir)
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    ray.init(**kwargs)
    return True


def _provenance(plan: StagePlan, graph: Graph) -> dict[str, str]:
    return {
        "kdpipe.stage": plan.node.type,
        "kdpipe.stage_name": plan.name,
        "kdpipe.run": graph.manifest.name,
        "kdpipe.key": plan.key,
        "kdpipe.code": plan.key_parts["code"],
        "kdpipe.config": json.dumps(plan.node.stage.config.model_dump(mode="json"), sort_keys=True),
        "kdpipe.inputs": json.dumps(plan.key_parts["inputs"], sort_keys=True),
        **({"kdpipe.numerics": json.dumps(plan.key_parts["numerics"])} if "numerics" in plan.key_parts else {}),
    }


def _resolved(loc) -> str:
    return storage.normalize(loc) if storage.is_remote(loc) else str(Path(loc).resolve())


def make_context(plan: StagePlan, graph: Graph, upstream_dirs: dict[str, Any]) -> StageContext:
    inputs = {role: [Artifact(_resolved(upstream_dirs[name])) for name in names]
              for role, names in plan.node.inputs.items()}
    art_loc = _resolved(plan.art_dir)
    # A remote artifact's task stage works in a local folder that is uploaded when it finishes
    # (see _run_task_impl); these local paths are placeholders replaced on the worker.
    local = storage.local_mirror(art_loc + "#work") if storage.is_remote(art_loc) else Path(art_loc)
    res = plan.node.stage.resources()
    workdir = graph.manifest.workdir
    return StageContext(
        stage_name=plan.name,
        out_dir=local / "files",
        scratch_dir=local / "scratch",
        inputs=inputs,
        seed=graph.manifest.seed if plan.node.stage.uses_seed() else None,
        num_cpus=max(1, int(res.get("num_cpus", 1))),
        workdir=storage.normalize(workdir) if storage.is_remote(workdir) else Path(workdir).resolve(),
        artifact_loc=art_loc,
    )


class _ShardWorkerImpl:
    """Ray actor body for map stages: setup once, then one shard per call.

    A GPU actor runs shards_per_actor() calls at once (a threaded actor), but the stage's
    `process` one at a time: while the device works on one shard, the next shard's input is read
    and the previous one's Parquet written, so neither read nor write stalls it. Each call returns
    only after its own shard's marker is written. Each shard reports how many shards its actor
    held when it arrived (the timing's most_shards_held_by_an_actor)."""

    def __init__(self, stage: Stage, ctx: StageContext, provenance: dict[str, str], cwd: str):
        import threading

        # Cheap on purpose: the actor's creation is the signal that Ray placed it; the model
        # loads in setup(), which the placement deadline does not cover.
        _enter_worker(cwd, ctx.num_cpus)
        self.stage, self.ctx, self.provenance = stage, ctx, provenance
        self.setup_seconds: float | None = None
        self.compute_lock = threading.Lock()
        self.count_lock = threading.Lock()
        self.held = 0

    def setup(self) -> None:
        start = time.perf_counter()
        self.stage.setup(self.ctx)
        self.metadata = {**self.provenance, **{f"kdpipe.{k}": v for k, v in self.stage.metadata().items()}}
        self.setup_seconds = round(time.perf_counter() - start, 4)  # reported with the first shard

    def process(self, index: int, input_path: str, art_dir: str) -> dict[str, Any]:
        import ray

        with self.count_lock:
            self.held += 1
            held = self.held
        try:
            table = storage.read_parquet(input_path)
            with self.compute_lock:
                start = time.perf_counter()
                out = self.stage.process(table, self.ctx, shard_index=index)
                compute = time.perf_counter() - start
                setup_seconds, self.setup_seconds = self.setup_seconds, None
            stats = write_shard(art_dir, index, out, self.metadata)
        finally:
            with self.count_lock:
                self.held -= 1
        stats.update(input_rows=table.num_rows, compute_seconds=round(compute, 4), shards_held=held,
                     node_id=ray.get_runtime_context().get_node_id())
        if setup_seconds is not None:
            stats["setup_seconds"] = setup_seconds
        return stats


def _run_source_impl(stage: Stage, ctx: StageContext, provenance: dict[str, str], cwd: str,
                     art_dir: str, done: list[int]) -> list[dict[str, Any]]:
    import ray

    _enter_worker(cwd, ctx.num_cpus)
    table = stage.read(ctx)
    per = max(1, stage.rows_per_shard())
    metadata = {**provenance, **{f"kdpipe.{k}": v for k, v in stage.metadata().items()}}
    stats = []
    n_shards = max(1, -(-table.num_rows // per))
    for index in range(n_shards):
        if index in done:
            continue
        part = table.slice(index * per, per)
        s = write_shard(art_dir, index, part, metadata)
        s["node_id"] = ray.get_runtime_context().get_node_id()
        stats.append(s)
    return stats


def _read_rows_impl(stage: Stage, ctx: StageContext, provenance: dict[str, str], cwd: str, art_dir: str,
                    shards: list[int], per: int, total_rows: int, at: Any) -> list[dict[str, Any]]:
    """One part of a source read by several tasks: the rows of `shards` (consecutive indices);
    `at`, the row index's entries for them."""
    import ray

    _enter_worker(cwd, ctx.num_cpus)
    first = shards[0]
    table = stage.read_rows(ctx, start=first * per, stop=min(total_rows, (shards[-1] + 1) * per), at=at)
    metadata = {**provenance, **{f"kdpipe.{k}": v for k, v in stage.metadata().items()}}
    stats = []
    for index in shards:
        s = write_shard(art_dir, index, table.slice((index - first) * per, per), metadata)
        s["node_id"] = ray.get_runtime_context().get_node_id()
        stats.append(s)
    return stats


def _run_task_impl(stage: Stage, ctx: StageContext, cwd: str) -> dict[str, Any]:
    """Run a task stage; returns its summary and the checksums of the files it wrote.

    With a remote workdir the stage works in a local folder of this worker: scratch/ is pulled
    from the store first (resume), mirrored back while the stage runs, and files/ is uploaded
    once it returns (before the driver writes manifest.json, which commits the artifact)."""
    import shutil

    _enter_worker(cwd, ctx.num_cpus)
    art_loc = ctx.artifact_loc
    if art_loc is None or not storage.is_remote(art_loc):
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        ctx.scratch_dir.mkdir(parents=True, exist_ok=True)
        summary = stage.run(ctx) or {}
        return {"summary": summary, "files": file_checksums(ctx.out_dir)}
    local = storage.local_mirror(art_loc + "#work")
    shutil.rmtree(local, ignore_errors=True)
    ctx = dataclasses.replace(ctx, out_dir=local / "files", scratch_dir=local / "scratch")
    ctx.out_dir.mkdir(parents=True, exist_ok=True)
    ctx.scratch_dir.mkdir(parents=True, exist_ok=True)
    scratch = storage.FolderSync(ctx.scratch_dir, storage.join(art_loc, "scratch"))
    scratch.pull()
    try:
        with scratch:
            summary = stage.run(ctx) or {}
        storage.delete_tree(storage.join(art_loc, "files"))  # leftovers of an interrupted upload
        storage.upload_tree(ctx.out_dir, storage.join(art_loc, "files"))
        return {"summary": summary, "files": file_checksums(ctx.out_dir)}
    finally:
        shutil.rmtree(local, ignore_errors=True)


def _consecutive(indices: list[int]) -> list[list[int]]:
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs


def _user_error(e: Exception) -> KdpipeError | None:
    """The kdpipe error inside a Ray task error (e.g. DeviceUnavailable), if that is what it is."""
    cause = getattr(e, "cause", None)
    return cause if isinstance(cause, KdpipeError) else None


class _MapRun:
    """One map stage's pending shards on a pool of actors. The story, in `run`: start the actors;
    then until every shard is written: replace lost capacity, give up on placement after
    placement_timeout, hand shards to actors that finished setup, and take the next event (an
    actor's setup finished, or a shard came back).

    No Ray-level restarts or retries: a dead actor's shard goes back on the queue for any live
    actor. A Ray restart would retry it on the restarted actor, which may never be placed again
    (its node gone, the remaining CPUs held by this stage's other actors): the stage would wait
    forever. Shards go only to actors that finished setup, for the same reason; an actor that
    cannot be placed simply never gets work (after STARTUP_GRACE_S)."""

    def __init__(self, *, plan: StagePlan, stage: Stage, ctx: StageContext, provenance: dict[str, str],
                 res: dict[str, float], cwd: str, placement_timeout: float, bar: Any = None):
        import ray

        self.plan, self.stage, self.ctx, self.provenance, self.res = plan, stage, ctx, provenance, res
        self.cwd, self.placement_timeout, self.bar = cwd, placement_timeout, bar
        self.data = ctx.input("data")
        self.worker_cls = ray.remote(_ShardWorkerImpl).options(max_restarts=0, max_task_retries=0,
                                                               max_concurrency=shards_per_actor(res), **res)
        self.actors: list[Any] = []
        self.starting: dict[Any, Any] = {}  # setup ref -> actor still running setup
        self.placing: dict[Any, Any] = {}  # ready ref -> actor not yet known to be placed
        self.placed: set[Any] = set()
        self.idle: list[Any] = []  # a free shard slot of an actor that finished setup, per entry
        self.in_flight: dict[Any, tuple[int, Any]] = {}  # process ref -> (shard index, actor)
        self.queue: list[int] = []
        self.attempts: dict[int, int] = {}
        self.setup_failures = 0
        self.lost: set[Any] = set()  # actors that died with shards in flight
        self.results: list[dict[str, Any]] = []
        self.initial: set[Any] = set()  # setup refs of the first actors (the start-up barrier)
        self.barrier_until: float | None = None  # set when the first actor is ready
        self.unplaced_since: float | None = None  # since when no live actor of this stage is placed
        self.rows = 0
        self.t0 = time.perf_counter()

    def run(self, pending: list[int]) -> list[dict[str, Any]]:
        import ray

        self.queue = list(pending)
        try:
            for _ in range(self._concurrency(len(pending))):
                self._start_actor()
            self.initial = set(self.starting)
            while self.in_flight or self.queue:
                if not self.in_flight and not self.starting:
                    self._start_actor()  # every actor died with work left: replace one
                self._check_placement()
                if not self._barrier_up():
                    self._hand_out()
                ref = self._next_event()
                if ref is None:
                    continue
                if ref in self.starting:
                    self._on_setup_done(ref)
                else:
                    self._on_shard_done(ref)
        except ray.exceptions.RayTaskError as e:
            if _user_error(e) is not None:
                raise _user_error(e) from None
            raise StageFailed(f"stage {self.plan.name!r} failed on a shard: {e.cause!r}") from e
        finally:
            self._close()
        return self.results

    def _concurrency(self, pending: int) -> int:
        """config.concurrency, else as many actors as the cluster's CPUs (and GPUs) hold."""
        import ray

        res = self.res
        concurrency = getattr(self.stage.config, "concurrency", None)
        if not concurrency:
            total_cpus = ray.cluster_resources().get("CPU", 1)
            concurrency = max(1, int(total_cpus // max(res.get("num_cpus", 1), 1e-6)))
            if res.get("num_gpus"):  # actors waiting for a GPU that never frees up would hang the stage
                total_gpus = ray.cluster_resources().get("GPU", 0)
                concurrency = max(1, min(concurrency, int(total_gpus // res["num_gpus"])))
        return max(1, min(int(concurrency), pending))

    def _start_actor(self) -> None:
        actor = self.worker_cls.remote(self.stage, self.ctx, self.provenance, self.cwd)
        self.actors.append(actor)
        self.placing[actor.__ray_ready__.remote()] = actor  # resolves once placed (before setup)
        self.starting[actor.setup.remote()] = actor

    def _submit(self, actor: Any) -> None:
        index = self.queue.pop(0)
        ref = actor.process.remote(index, str(self.data.shard_path(index)), self.ctx.artifact_loc)
        self.in_flight[ref] = (index, actor)

    def _hand_out(self) -> None:
        """Queued shards to free slots: every actor's first slot before any second one, and a
        second one only while the queue outlasts the actors (at the tail a shard waiting behind
        another in a busy actor would leave an idle actor without work)."""
        while self.idle and self.queue:
            busy = {a: 0 for a in self.idle}
            for _, a in self.in_flight.values():
                busy[a] = busy.get(a, 0) + 1
            actor = min(self.idle, key=busy.__getitem__)
            if busy[actor] and len(self.queue) <= len(busy):
                return
            self.idle.remove(actor)
            self._submit(actor)

    def _barrier_up(self) -> bool:
        """The first actors are still setting up and the grace period has not run out."""
        return bool(self.initial & self.starting.keys()) and (
            self.barrier_until is None or time.monotonic() < self.barrier_until)

    def _any_placed(self) -> bool:
        import ray

        if self.placing:
            now_placed, _ = ray.wait(list(self.placing), num_returns=len(self.placing), timeout=0)
            self.placed.update(self.placing.pop(ref) for ref in now_placed)
        live = [*self.starting.values(), *self.idle, *(a for _, a in self.in_flight.values())]
        return any(a in self.placed for a in live)

    def _check_placement(self) -> None:
        """Nothing placed (yet, or any more): wait for Ray, but not forever."""
        import ray

        if self._any_placed():
            self.unplaced_since = None
            return
        self.unplaced_since = self.unplaced_since or time.monotonic()
        if time.monotonic() - self.unplaced_since > self.placement_timeout:
            raise PlacementError(timed_out(self.plan.name, self.res, kind="map", timeout=self.placement_timeout,
                                           available=ray.available_resources()))

    def _next_event(self) -> Any:
        """The next finished setup or shard; None after a 1 s tick while a deadline is pending."""
        import ray

        pending_deadline = self._barrier_up() or self.unplaced_since is not None
        ready, _ = ray.wait([*self.in_flight, *self.starting], num_returns=1,
                            timeout=1.0 if pending_deadline else None)
        return ready[0] if ready else None

    def _on_setup_done(self, ref: Any) -> None:
        import ray

        actor = self.starting.pop(ref)
        try:
            ray.get(ref)
        except (ray.exceptions.RayTaskError, ray.exceptions.RayActorError) as e:
            self._on_setup_failed(actor, e)
            return
        if self.barrier_until is None:
            self.barrier_until = time.monotonic() + STARTUP_GRACE_S
        self.idle += [actor] * shards_per_actor(self.res)
        if not self._barrier_up():
            self._hand_out()

    def _on_setup_failed(self, actor: Any, e: Exception) -> None:
        import ray

        if _user_error(e) is not None:  # e.g. DeviceUnavailable: retrying cannot help
            raise _user_error(e) from None
        ray.kill(actor)
        self.setup_failures += 1
        if self.in_flight or self.idle or self.starting:
            return  # other actors carry on (e.g. this one's node died)
        if self.setup_failures >= MAX_SHARD_ATTEMPTS:
            raise StageFailed(f"stage {self.plan.name!r}: workers failed to start "
                              f"{self.setup_failures} times: {e}") from e
        self._start_actor()

    def _on_shard_done(self, ref: Any) -> None:
        import ray

        index, actor = self.in_flight.pop(ref)
        try:
            stats = ray.get(ref)
        except ray.exceptions.RayActorError:
            if not self._requeue_lost(index, actor):
                raise
            return
        self.results.append(stats)
        self.rows += stats["rows"]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(rows_per_s=f"{self.rows / max(time.perf_counter() - self.t0, 1e-9):.0f}")
        self.idle.append(actor)
        self._hand_out()

    def _requeue_lost(self, index: int, actor: Any) -> bool:
        """The actor died with shard `index`: back on the queue, unless that happened
        MAX_SHARD_ATTEMPTS times (then False)."""
        self.attempts[index] = self.attempts.get(index, 0) + 1
        if self.attempts[index] >= MAX_SHARD_ATTEMPTS:
            return False
        self.queue.insert(0, index)
        if actor in self.lost:
            return True  # its other shard: capacity already replaced
        self.lost.add(actor)
        self.idle = [a for a in self.idle if a is not actor]
        self._hand_out()
        self._start_actor()  # replace the lost capacity; harmless if it cannot be placed
        return True

    def _close(self) -> None:
        import ray

        if self.bar is not None:
            self.bar.close()
        for actor in self.actors:
            ray.kill(actor)


class Executor:
    def __init__(self, graph: Graph, *, progress: Callable[..., Any] | None = None):
        self.graph = graph
        self.progress = progress
        self.cwd = os.getcwd()
        self.placement_timeout = graph.manifest.ray.placement_timeout

    def check_placement(self, plans: list[StagePlan]) -> None:
        """Before anything is written: every stage to run must fit on some alive node (unless an
        autoscaler may add one). Fails with one message per stage that never could."""
        import ray

        if self.graph.manifest.ray.autoscaler:
            return
        nodes = [n["Resources"] for n in ray.nodes() if n.get("Alive")]
        problems = [unplaceable(p.name, p.node.stage.resources(), nodes, kind=p.node.stage.kind) for p in plans]
        problems = [m for m in problems if m]
        if problems:
            raise PlacementError("\n".join(problems))

    def _run_placed(self, plan: StagePlan, fn: Any, res: dict[str, float], *args: Any) -> Any:
        """One Ray task for a source/task stage, in a placement group reserved first: waiting for
        the reservation is bounded by placement_timeout; the work itself is not."""
        import ray
        from ray.util.placement_group import remove_placement_group

        pg, strategy = self._reserve(plan, res)
        try:
            task = ray.remote(fn).options(max_retries=MAX_SHARD_ATTEMPTS, scheduling_strategy=strategy, **res)
            try:
                return ray.get(task.remote(*args))
            except ray.exceptions.RayTaskError as e:
                if _user_error(e) is not None:
                    raise _user_error(e) from None
                raise
        finally:
            remove_placement_group(pg)

    def _reserve(self, plan: StagePlan, res: dict[str, float]) -> tuple[Any, Any]:
        """A one-bundle placement group for the stage's (first) task, ready within placement_timeout,
        and the scheduling strategy that puts a task in it; PlacementError naming what is missing."""
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        bundle = {{"num_cpus": "CPU", "num_gpus": "GPU"}.get(k, k): v for k, v in res.items() if v}
        pg = placement_group([bundle])
        ready, _ = ray.wait([pg.ready()], timeout=self.placement_timeout)
        if not ready:
            remove_placement_group(pg)
            raise PlacementError(timed_out(plan.name, res, kind=plan.node.stage.kind,
                                           timeout=self.placement_timeout, available=ray.available_resources()))
        return pg, PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=0)

    def run_stage(self, plan: StagePlan, upstream_dirs: dict[str, Any]) -> dict[str, Any]:
        stage = plan.node.stage
        ctx = make_context(plan, self.graph, upstream_dirs)
        # Workers load outside models from the workdir, never from the driver's paths or the hub.
        ctx = dataclasses.replace(ctx, models={name: store_model(folder, ctx.workdir)
                                               for name, folder in stage.external_models().items()})
        if not storage.is_remote(plan.art_dir):
            Path(plan.art_dir).mkdir(parents=True, exist_ok=True)
        provenance = _provenance(plan, self.graph)
        res = stage.resources()
        start = time.perf_counter()
        files: dict[str, Any] = {}
        if stage.kind == "source":
            done = plan.completed
            if stage.read_tasks() > 1:
                stats, tasks = self._run_source_parts(plan, stage, ctx, provenance, res, done)
            else:
                tasks = 1
                stats = self._run_placed(plan, _run_source_impl, res, stage, ctx, provenance, self.cwd,
                                         ctx.artifact_loc, list(done))
            shards, extra = self._merge(done, stats), {}
            ran = len(stats)
        elif stage.kind == "map":
            shards, ran = self._run_map(plan, stage, ctx, provenance, res)
            shards = stage.finalize(shards, ctx)
            extra = stage.summarize(shards, ctx)
        else:
            result = self._run_placed(plan, _run_task_impl, res, stage, ctx, self.cwd)
            extra, files = result["summary"], result["files"]
            shards, ran = [], 1
        seconds = time.perf_counter() - start
        self._write_manifest(plan, shards, extra, files, seconds, upstream_dirs, timing=_timing(shards),
                             models=ctx.models)
        return {"shards_run": ran, "shards_total": len(shards) if shards else (1 if stage.kind == "task" else 0),
                "rows": sum(s["rows"] for s in shards), "seconds": round(seconds, 3), "shards": shards,
                **({"read_tasks": tasks} if stage.kind == "source" else {})}

    def _run_source_parts(self, plan: StagePlan, stage: Stage, ctx: StageContext, provenance: dict[str, str],
                          res: dict[str, float], done: dict[int, Any]) -> tuple[list[dict[str, Any]], int]:
        """A source read by read_tasks() tasks, each writing a run of consecutive missing shards
        (check_placement has made sure one task fits a node; the others queue behind it)."""
        import ray
        from ray.util.placement_group import remove_placement_group

        per = max(1, stage.rows_per_shard())
        index = stage.index_rows(rows_per_shard=per)
        if index.fingerprint is not None and index.fingerprint != plan.key_parts.get("fingerprint"):
            raise StageFailed(f"stage {plan.name!r}: its source changed since it was planned "
                              f"({', '.join(sorted(index.fingerprint))}); run again to plan it anew")
        total = index.rows
        pending = [i for i in range(max(1, -(-total // per))) if i not in done]
        if not pending:
            return [], 0
        n = min(stage.read_tasks(), len(pending))
        parts = [pending[len(pending) * k // n: len(pending) * (k + 1) // n] for k in range(n)]
        # A part's shards may be non-consecutive after a resume: split it at the gaps.
        runs = [run for part in parts for run in _consecutive(part)]
        # The first task runs in a reservation (bounded by placement_timeout); the others queue
        # behind it and start as CPUs free up.
        pg, first = self._reserve(plan, res)
        task = ray.remote(_read_rows_impl)
        refs = [task.options(max_retries=MAX_SHARD_ATTEMPTS, **res, **({"scheduling_strategy": first} if i == 0 else {}))
                .remote(stage, ctx, provenance, self.cwd, ctx.artifact_loc, run, per, total,
                        index.starts[run[0]:run[-1] + 1] or None) for i, run in enumerate(runs)]
        try:
            return [s for stats in ray.get(refs) for s in stats], len(runs)
        except ray.exceptions.RayTaskError as e:
            if _user_error(e) is not None:
                raise _user_error(e) from None
            raise
        finally:
            remove_placement_group(pg)

    @staticmethod
    def _merge(done: dict[int, dict[str, Any]], new: list[dict[str, Any]]) -> list[dict[str, Any]]:
        merged = dict(done)
        merged.update({s["index"]: s for s in new})
        return [merged[i] for i in sorted(merged)]

    def _run_map(self, plan: StagePlan, stage: Stage, ctx: StageContext, provenance: dict[str, str],
                 res: dict[str, float]) -> tuple[list[dict[str, Any]], int]:
        data = ctx.input("data")
        try:
            # By the upstream manifest's shard index, never by position in a listing: a missing
            # input shard is an error here, not a silent shift of every later index.
            indices = data.check_shards()
        except MissingShard as e:
            raise StageFailed(f"stage {plan.name!r}: input {data.loc}: {e}") from None
        done = plan.completed
        pending = [i for i in indices if i not in done]
        if not pending:
            return self._merge(done, []), 0
        bar = self.progress(total=len(indices), initial=len(done), desc=plan.name, unit="shard") \
            if self.progress else None
        run = _MapRun(plan=plan, stage=stage, ctx=ctx, provenance=provenance, res=res, cwd=self.cwd,
                      placement_timeout=self.placement_timeout, bar=bar)
        results = run.run(pending)
        return self._merge(done, results), len(results)

    def _write_manifest(self, plan: StagePlan, shards: list[dict[str, Any]], extra: dict[str, Any],
                        files: dict[str, Any], seconds: float, upstream_dirs: dict[str, Any],
                        timing: dict[str, Any] | None = None, models: dict[str, str] | None = None) -> None:
        manifest = {
            "type": plan.node.type,
            "key": plan.key,
            "run": self.graph.manifest.name,
            "stage_name": plan.name,
            "config": plan.node.stage.config.model_dump(mode="json"),
            "key_parts": plan.key_parts,
            "numerics": plan.key_parts.get("numerics"),  # resolved device kind and dtype, if a model stage
            "resources": plan.node.stage.resources(),
            "code_modules": plan.code_modules,  # lets a later plan name the changed file
            # name -> digest of each stored model (models/<digest>) the stage loaded: gc keeps those
            "models": {name: storage.basename(loc) for name, loc in (models or {}).items()},
            "inputs": {role: [{"stage": n, "key": storage.basename(upstream_dirs[n]), "path": str(upstream_dirs[n])}
                              for n in names] for role, names in plan.node.inputs.items()},
            "rows": sum(s["rows"] for s in shards),
            "shards": [{k: s[k] for k in ("index", "rows", "bytes", "sha256")} for s in shards],
            "files": files,
            "summary": extra,
            "seconds": round(seconds, 3),
            "timing": timing or {},
            "finished_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        storage.write_json(storage.join(_resolved(plan.art_dir), MANIFEST), manifest)


def _timing(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """Where the stage's time went, summed over the shards this call ran (resumed shards carry
    no compute time): the stage's own work, the Parquet write + marker, and each actor's setup
    (model load); the rest of the wall time is process start-up, hand-off and scheduling."""
    timed = [s for s in shards if "compute_seconds" in s]
    if not timed:
        return {}
    setups = [s["setup_seconds"] for s in timed if "setup_seconds" in s]
    return {"shards_timed": len(timed), "compute_seconds": round(sum(s["compute_seconds"] for s in timed), 3),
            "write_seconds": round(sum(s["seconds"] for s in timed), 3),
            "actors": len(setups), "slowest_setup_seconds": max(setups, default=0.0),
            "most_shards_held_by_an_actor": max((s.get("shards_held", 1) for s in timed), default=1)}


def update_alias(workdir, run_name: str, stage_name: str, art_dir) -> None:
    write_alias(workdir, run_name, stage_name, Artifact(_resolved(art_dir)))
