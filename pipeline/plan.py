"""Cache keys and the plan: which stages are cached, which resume, which run, and why.

key = sha256(stage type, code digest, library versions, engine format, canonical config minus
             throughput knobs, the manifest seed (only for stages that use it), keys of every
             upstream artifact, content hashes of outside files and model weights, and for model
             stages the resolved device kind and dtype (pipeline/devices.py))

`pipeline/key_table.py` renders exactly this, per stage type, into RELIABILITY.md.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.artifact import Artifact, completed_shards, read_alias
from pipeline.code_identity import code_identity, describe_change
from pipeline.graph import Graph, Node, external_artifact
from pipeline.hashing import hash_obj
from pipeline.stage import key_config

ENGINE_FORMAT = "1"
KEY_LENGTH = 20


@dataclasses.dataclass
class StagePlan:
    node: Node
    key: str
    key_parts: dict[str, Any]
    art_dir: Any  # Path for a local workdir, URI string for an object store
    status: str  # cached | resume | run
    reason: str
    # Shards already finished and verified when planning; execution (under the same workdir
    # lock) resumes from these instead of hashing every shard again.
    completed: dict[int, dict[str, Any]] = dataclasses.field(default_factory=dict)
    # Per-module digests behind key_parts["code"]; recorded so a later plan can name the file.
    code_modules: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def done_shards(self) -> int:
        return len(self.completed)

    @property
    def name(self) -> str:
        return self.node.name


def key_parts_for(node: Node, upstream_keys: dict[str, str], seed: int = 0) -> dict[str, Any]:
    """Everything that can change the node's output. Each part is one named entry, so a new
    kind of part (e.g. resolved numerics) is one more line here and one more row in the table."""
    config = node.stage.config
    semantic = key_config(config)
    code = code_identity(node.type)
    parts = {
        "type": node.type,
        "code": code.digest,
        "libraries": code.libraries(),
        "engine_format": ENGINE_FORMAT,
        "config": semantic,
        "inputs": {role: [upstream_keys[n] for n in names] for role, names in sorted(node.inputs.items())},
        "fingerprint": node.stage.fingerprint(),
    }
    if node.stage.uses_seed():
        parts["seed"] = seed
    numerics = node.stage.numerics()
    if numerics is not None:  # resolved device kind and dtype: they change the numbers
        parts["numerics"] = numerics.as_dict()
    return parts


def code_modules_for(node: Node) -> dict[str, str]:
    """Per-module digests behind `key_parts["code"]`, kept beside the key to explain changes."""
    return code_identity(node.type).modules


def artifacts_root(workdir):
    return storage.join(workdir, "artifacts") if storage.is_remote(workdir) else Path(workdir) / "artifacts"


def artifact_dir(workdir, type_key: str, key: str):
    if storage.is_remote(workdir):
        return storage.join(storage.normalize(workdir), "artifacts", type_key, key)
    return artifacts_root(workdir) / type_key / key


def alias_path(workdir: Path, run_name: str, stage_name: str) -> Path:
    """The readable symlink of a local workdir (the pointer file is artifact.alias_loc)."""
    return Path(workdir) / "runs" / run_name / stage_name


def explain_change(old: dict[str, Any], new: dict[str, Any], *, old_modules: dict[str, str] | None = None,
                   new_modules: dict[str, str] | None = None) -> str:
    """Plain-words account of why two key_parts differ, most specific first."""
    reasons: list[str] = []
    if old.get("type") != new.get("type"):
        reasons.append(f"stage type changed {old.get('type')} -> {new.get('type')}")
    if "code" not in old:
        reasons.append("made before code digests existed (its code version was set by hand)")
    elif old.get("code") != new.get("code"):
        files = describe_change(old_modules or {}, new_modules or {}) if old_modules and new_modules else []
        reasons.append(f"code changed: {', '.join(files)}" if files else "code changed")
    ol, nl = old.get("libraries", {}), new.get("libraries", {})
    for lib in sorted(set(ol) | set(nl)):
        if ol.get(lib) != nl.get(lib):
            reasons.append(f"{lib} {ol.get(lib, 'not used')} -> {nl.get(lib, 'not used')}")
    if old.get("seed") != new.get("seed"):
        reasons.append(f"manifest seed changed {old.get('seed', 'unused')} -> {new.get('seed', 'unused')}")
    if old.get("engine_format") != new.get("engine_format"):
        reasons.append("artifact format changed")
    oc, nc = old.get("config", {}), new.get("config", {})
    for k in sorted(set(oc) | set(nc)):
        if oc.get(k) != nc.get(k):
            reasons.append(f"config.{k} changed {json.dumps(oc.get(k))} -> {json.dumps(nc.get(k))}")
    oi, ni = old.get("inputs", {}), new.get("inputs", {})
    for role in sorted(set(oi) | set(ni)):
        if oi.get(role) != ni.get(role):
            reasons.append(f"input data changed ({role!r}: the upstream artifact is new)")
    of, nf = old.get("fingerprint", {}), new.get("fingerprint", {})
    for k in sorted(set(of) | set(nf)):
        if of.get(k) != nf.get(k):
            reasons.append(f"{k} changed" if k in of and k in nf else f"{k} {'added' if k in nf else 'removed'}")
    known = {"type", "code", "code_version", "libraries", "seed", "engine_format", "config", "inputs", "fingerprint"}
    for part in sorted((set(old) | set(new)) - known):  # parts added later (e.g. numerics)
        if old.get(part) != new.get(part):
            reasons.append(f"{part} changed {json.dumps(old.get(part))} -> {json.dumps(new.get(part))}")
    return "; ".join(reasons) or "key changed"


def _previous_manifest(workdir, run_name: str, stage_name: str) -> dict[str, Any] | None:
    art = read_alias(workdir, run_name, stage_name)
    try:
        return art.manifest if art is not None else None
    except (OSError, ValueError):
        return None


def make_plan(graph: Graph, *, selected: list[str] | None = None, verify: bool = False) -> list[StagePlan]:
    """verify=False (the default) trusts the digests stored in completion markers and manifests
    and checks only that every listed shard is present with its recorded size (one listing per
    artifact); `kdpipe verify` re-hashes."""
    manifest = graph.manifest
    workdir = manifest.workdir if storage.is_remote(manifest.workdir) else Path(manifest.workdir)
    keys: dict[str, str] = {}
    plans: list[StagePlan] = []
    for node in graph.nodes.values():
        for ref in node.upstream():
            if ref.startswith("@"):
                keys[ref] = external_artifact(manifest, ref).key
        parts = key_parts_for(node, keys, manifest.seed)
        modules = code_modules_for(node)
        key = hash_obj(parts)[:KEY_LENGTH]
        keys[node.name] = key
        art_dir = artifact_dir(workdir, node.type, key)
        status, reason, done = _status(node, key, parts, art_dir, workdir, manifest.name, verify, modules)
        plans.append(StagePlan(node, key, parts, art_dir, status, reason, done, modules))
    if selected is not None:
        chosen = set(selected)
        plans = [p for p in plans if p.name in chosen or p.status == "cached" or _needed_by(p, chosen, graph)]
    return plans


def refresh(plan: StagePlan, graph: Graph, *, verify: bool = False) -> StagePlan:
    """The same stage planned again against the store as it is now (another run may have
    finished or advanced it meanwhile); keys are unchanged, nothing is re-fingerprinted."""
    manifest = graph.manifest
    workdir = manifest.workdir if storage.is_remote(manifest.workdir) else Path(manifest.workdir)
    status, reason, done = _status(plan.node, plan.key, plan.key_parts, plan.art_dir, workdir, manifest.name,
                                   verify, plan.code_modules)
    return dataclasses.replace(plan, status=status, reason=reason, completed=done)


def _status(node: Node, key: str, parts: dict[str, Any], art_dir, workdir, run_name: str,
            verify: bool, modules: dict[str, str]) -> tuple[str, str, dict[int, dict[str, Any]]]:
    art = Artifact(art_dir)
    done: dict[int, dict[str, Any]] = {}
    if art.is_complete() and _artifact_intact(art, node, verify):
        status, reason = "cached", f"cache hit: same config, code and inputs ({key})"
    else:
        if node.stage.kind != "task":
            done = completed_shards(art_dir, verify=verify)
        prev = _previous_manifest(workdir, run_name, node.name)
        if art.is_complete():
            status, reason = "run", "cached artifact failed verification (altered or truncated); recomputing"
        elif done:
            status, reason = "resume", f"resuming: {len(done)} shard(s) already complete"
        elif storage.is_dir(storage.join(art_dir, "scratch")):
            status, reason = "resume", "resuming from scratch state of an interrupted run"
        elif prev is None or "key_parts" not in prev:
            status, reason = "run", "not computed before"
        else:
            status, reason = "run", explain_change(prev["key_parts"], parts, old_modules=prev.get("code_modules"),
                                                   new_modules=modules)
    return status, reason, done


def _needed_by(plan: StagePlan, chosen: set[str], graph: Graph) -> bool:
    """An uncached ancestor of a selected stage must run too."""
    return any(plan.name in graph.ancestors(name) for name in chosen)


def _artifact_intact(art: Artifact, node: Node, verify: bool) -> bool:
    """Every file and shard the manifest lists is there with its recorded size (and sha256 if
    verify), and no stray shard: one listing per folder, no reads."""
    from pipeline.artifact import file_checksums

    try:
        manifest = art.manifest
    except (OSError, ValueError):
        return False
    if node.stage.kind == "task":
        recorded = manifest.get("files", {})
        if verify:
            return file_checksums(art.sub("files")) == recorded
        present = storage.list_files(art.sub("files"), hidden=True)
        return present == {rel: meta.get("bytes") for rel, meta in recorded.items()}
    shards = manifest.get("shards", [])
    if art.listed_shards() != {s["index"]: s["bytes"] for s in shards}:
        return False
    if verify:
        done = completed_shards(art.loc, verify=True)
        return all(done.get(s["index"], {}).get("sha256") == s["sha256"] for s in shards)
    return True
