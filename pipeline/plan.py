"""Cache keys and the plan: which stages are cached, which resume, which run, and why.

key = sha256(stage type, code_version, engine format, canonical config minus throughput knobs,
             keys of every upstream artifact, content hashes of outside files and model weights,
             and for model stages the resolved device kind and dtype (pipeline.devices))
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline.artifact import Artifact, completed_shards
from pipeline.graph import Graph, Node, external_artifact
from pipeline.hashing import hash_obj
from pipeline.stage import unkeyed_fields

ENGINE_FORMAT = "1"
KEY_LENGTH = 20


@dataclasses.dataclass
class StagePlan:
    node: Node
    key: str
    key_parts: dict[str, Any]
    art_dir: Path
    status: str  # cached | resume | run
    reason: str
    # Shards already finished and verified when planning; execution (under the same workdir
    # lock) resumes from these instead of hashing every shard again.
    completed: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)

    @property
    def done_shards(self) -> int:
        return len(self.completed)

    @property
    def name(self) -> str:
        return self.node.name


def key_parts_for(node: Node, upstream_keys: dict[str, str], seed: int = 0) -> dict[str, Any]:
    config = node.stage.config
    semantic = config.model_dump(mode="json", exclude=unkeyed_fields(type(config)))
    parts = {
        "type": node.type,
        "code_version": type(node.stage).code_version,
        "engine_format": ENGINE_FORMAT,
        "config": semantic,
        "seed": seed,  # the manifest's global seed reaches every stage through ctx.seed
        "inputs": {role: [upstream_keys[n] for n in names] for role, names in sorted(node.inputs.items())},
        "fingerprint": node.stage.fingerprint(),
    }
    numerics = node.stage.numerics()
    if numerics is not None:  # resolved device kind and dtype: they change the numbers
        parts["numerics"] = numerics.as_dict()
    return parts


def artifacts_root(workdir: Path) -> Path:
    return workdir / "artifacts"


def artifact_dir(workdir: Path, type_key: str, key: str) -> Path:
    return artifacts_root(workdir) / type_key / key


def alias_path(workdir: Path, run_name: str, stage_name: str) -> Path:
    return workdir / "runs" / run_name / stage_name


def explain_change(old: dict[str, Any], new: dict[str, Any]) -> str:
    """Human account of why two key_parts differ, most specific first."""
    reasons: list[str] = []
    if old.get("type") != new.get("type"):
        reasons.append(f"stage type changed {old.get('type')} -> {new.get('type')}")
    if old.get("code_version") != new.get("code_version"):
        reasons.append(f"code version changed {old.get('code_version')} -> {new.get('code_version')}")
    if old.get("seed") != new.get("seed"):
        reasons.append(f"manifest seed changed {old.get('seed')} -> {new.get('seed')}")
    if old.get("numerics") != new.get("numerics"):
        reasons.append(f"device/dtype changed {_numerics(old)} -> {_numerics(new)}")
    if old.get("engine_format") != new.get("engine_format"):
        reasons.append("artifact format changed")
    oc, nc = old.get("config", {}), new.get("config", {})
    for k in sorted(set(oc) | set(nc)):
        if oc.get(k) != nc.get(k):
            reasons.append(f"config.{k} changed {json.dumps(oc.get(k))} -> {json.dumps(nc.get(k))}")
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    for role in sorted(set(oi) | set(ni)):
        if oi.get(role) != ni.get(role):
            reasons.append(f"input {role!r} changed (upstream artifact is new)")
    of, nf = old.get("fingerprint", {}), new.get("fingerprint", {})
    for k in sorted(set(of) | set(nf)):
        if of.get(k) != nf.get(k):
            reasons.append(f"{k} changed" if k in of and k in nf else f"{k} {'added' if k in nf else 'removed'}")
    return "; ".join(reasons) or "key changed"


def _numerics(parts: dict[str, Any]) -> str:
    n = parts.get("numerics")
    return f"{n['device']}/{n['dtype']}" if n else "unrecorded"


def _previous_key_parts(workdir: Path, run_name: str, stage_name: str) -> dict[str, Any] | None:
    alias = alias_path(workdir, run_name, stage_name)
    try:
        manifest = Artifact(alias.resolve()).manifest
    except (OSError, ValueError):
        return None
    return manifest.get("key_parts")


def make_plan(graph: Graph, *, selected: list[str] | None = None, verify: bool = True) -> list[StagePlan]:
    manifest = graph.manifest
    workdir = Path(manifest.workdir)
    keys: dict[str, str] = {}
    plans: list[StagePlan] = []
    for node in graph.nodes.values():
        for ref in node.upstream():
            if ref.startswith("@"):
                keys[ref] = external_artifact(manifest, ref).key
        parts = key_parts_for(node, keys, manifest.seed)
        key = hash_obj(parts)[:KEY_LENGTH]
        keys[node.name] = key
        art_dir = artifact_dir(workdir, node.type, key)
        art = Artifact(art_dir)
        done: dict[int, dict[str, Any]] = {}
        if art.is_complete() and _artifact_intact(art, node, verify):
            status, reason = "cached", f"cache hit: same config, code and inputs ({key})"
        else:
            if node.stage.kind != "task":
                done = completed_shards(art_dir, verify=verify)
            prev = _previous_key_parts(workdir, manifest.name, node.name)
            if art.is_complete():
                status, reason = "run", "cached artifact failed verification (altered or truncated); recomputing"
            elif done:
                status, reason = "resume", f"resuming: {len(done)} shard(s) already complete"
            elif (art_dir / "scratch").is_dir():
                status, reason = "resume", "resuming from scratch state of an interrupted run"
            elif prev is None:
                status, reason = "run", "not computed before"
            else:
                status, reason = "run", explain_change(prev, parts)
        plans.append(StagePlan(node, key, parts, art_dir, status, reason, done))
    if selected is not None:
        chosen = set(selected)
        plans = [p for p in plans if p.name in chosen or p.status == "cached" or _needed_by(p, chosen, graph)]
    return plans


def _needed_by(plan: StagePlan, chosen: set[str], graph: Graph) -> bool:
    """An uncached ancestor of a selected stage must run too."""
    return any(plan.name in graph.ancestors(name) for name in chosen)


def _artifact_intact(art: Artifact, node: Node, verify: bool) -> bool:
    manifest = art.manifest
    if node.stage.kind == "task":
        from pipeline.artifact import file_checksums

        if not verify:
            return True
        return file_checksums(art.files_dir) == manifest.get("files", {})
    shards = manifest.get("shards", [])
    done = completed_shards(art.path, verify=verify)
    return len(done) == len(shards) and all(
        done.get(s["index"], {}).get("sha256") == s["sha256"] for s in shards
    ) and art.num_shards() == len(shards)
