"""Manifest -> validated stage graph. Everything here runs before Ray starts and touches nothing
on disk except reading inputs; every problem is collected and reported with its manifest path."""
from __future__ import annotations

import dataclasses
import difflib
import os
from pathlib import Path

from pydantic import ValidationError

from pipeline.errors import ManifestError
from pipeline.manifest import Manifest, pydantic_problems
from pipeline.registry import get_stage_class, stage_types
from pipeline.stage import Facts, Problem, Stage


@dataclasses.dataclass
class Node:
    index: int
    name: str
    type: str
    stage: Stage
    inputs: dict[str, list[str]]  # role -> upstream stage names

    @property
    def loc(self) -> str:
        return f"stages[{self.index}]"

    def upstream(self) -> list[str]:
        return [name for names in self.inputs.values() for name in names]


@dataclasses.dataclass
class Graph:
    manifest: Manifest
    nodes: dict[str, Node]  # in topological order

    def descendants(self, name: str) -> set[str]:
        out: set[str] = set()
        frontier = [name]
        while frontier:
            current = frontier.pop()
            for node in self.nodes.values():
                if current in node.upstream() and node.name not in out:
                    out.add(node.name)
                    frontier.append(node.name)
        return out

    def ancestors(self, name: str) -> set[str]:
        out: set[str] = set()
        frontier = [name]
        while frontier:
            for up in self.nodes[frontier.pop()].upstream():
                if up not in out and up in self.nodes:
                    out.add(up)
                    frontier.append(up)
        return out

    def select(self, *, only: list[str] | None = None, start: str | None = None,
               stop: str | None = None) -> list[str]:
        """Stage names to execute for --only/--from/--to; their ancestors must already be cached
        or are added by the runner."""
        names = list(self.nodes)
        for flag, value in (("--from", start), ("--to", stop), *(("--only", o) for o in only or [])):
            if value is not None and value not in self.nodes:
                raise ManifestError([Problem(flag, f"no stage named {value!r}; stages: {', '.join(names)}")])
        chosen = set(names)
        if only:
            chosen = set(only)
        if start:
            chosen &= {start} | self.descendants(start)
        if stop:
            chosen &= {stop} | self.ancestors(stop)
        return [n for n in names if n in chosen]


def _suggest(word: str, options: list[str]) -> str:
    close = difflib.get_close_matches(word, options, n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def build_graph(manifest: Manifest) -> Graph:
    problems: list[Problem] = []
    nodes: dict[str, Node] = {}
    seen: dict[str, int] = {}
    for i, spec in enumerate(manifest.stages):
        loc = f"stages[{i}]"
        if spec.name in seen:
            problems.append(Problem(f"{loc}.name", f"duplicate stage name {spec.name!r} "
                                    f"(also stages[{seen[spec.name]}]); names must be unique"))
            continue
        seen[spec.name] = i
        try:
            cls = get_stage_class(spec.type)
        except KeyError:
            problems.append(Problem(f"{loc}.type", f"unknown stage type {spec.type!r}"
                                    f"{_suggest(spec.type, stage_types())}; known: {', '.join(stage_types())}"))
            continue
        try:
            config = cls.Config.model_validate(spec.config)
        except ValidationError as e:
            problems.extend(pydantic_problems(e, prefix=f"{loc}.config"))
            continue
        inputs = {role: [v] if isinstance(v, str) else list(v) for role, v in spec.inputs.items()}
        nodes[spec.name] = Node(i, spec.name, spec.type, cls(config=config, input_refs=inputs), inputs)

    all_names = [s.name for s in manifest.stages]
    for node in nodes.values():
        roles = type(node.stage).inputs
        for role, names in node.inputs.items():
            if role not in roles:
                takes = ", ".join(roles) or "no inputs"
                problems.append(Problem(f"{node.loc}.inputs.{role}", f"stage type {node.type!r} has no input "
                                        f"{role!r}{_suggest(role, list(roles))}; it takes: {takes}"))
                continue
            if len(names) > 1 and not roles[role].many:
                problems.append(Problem(f"{node.loc}.inputs.{role}", "takes one stage name, not a list"))
            for up in names:
                if up.startswith("@"):
                    problem = _check_external(manifest, up)
                    if problem:
                        problems.append(Problem(f"{node.loc}.inputs.{role}", problem))
                    continue
                if up == node.name:
                    problems.append(Problem(f"{node.loc}.inputs.{role}", "a stage cannot read its own output"))
                elif up not in all_names:
                    problems.append(Problem(f"{node.loc}.inputs.{role}", f"no stage named {up!r}"
                                            f"{_suggest(up, all_names)}; inputs name stages of this manifest"))
        for role, spec in roles.items():
            if spec.required and not node.inputs.get(role):
                problems.append(Problem(f"{node.loc}.inputs", f"missing required input {role!r} "
                                        f"({spec.doc or spec.kind}); add `inputs: {{{role}: <stage name>}}`"))
    if problems:
        raise ManifestError(problems)

    order = _toposort(nodes, problems)
    if problems:
        raise ManifestError(problems)
    graph = Graph(manifest, {name: nodes[name] for name in order})
    _check_kinds_and_columns(graph, problems)
    _check_workdir(manifest, problems)
    if problems:
        raise ManifestError(problems)
    return graph


def external_artifact(manifest: Manifest, ref: str):
    """`@RUN/STAGE`: an artifact another manifest already produced in the same workdir."""
    from pipeline import storage
    from pipeline.artifact import Artifact, read_alias

    run, _, stage = ref[1:].partition("/")
    found = read_alias(manifest.workdir, run, stage)
    if found is not None:
        return found
    if storage.is_remote(manifest.workdir):
        return Artifact(storage.join(manifest.workdir, "runs", run, stage))  # absent: not complete
    return Artifact((Path(manifest.workdir) / "runs" / run / stage).resolve())


def _check_external(manifest: Manifest, ref: str) -> str | None:
    run, _, stage = ref[1:].partition("/")
    from pipeline.manifest import NAME_RE

    if not (NAME_RE.match(run) and NAME_RE.match(stage)) or ".." in ref:
        return f"{ref!r} is not a valid reference; use @RUN/STAGE (a run name and a stage name)"
    if not external_artifact(manifest, ref).is_complete():
        return (f"{ref!r}: no complete artifact for stage {stage!r} of run {run!r} in workdir "
                f"{manifest.workdir!r}; run that manifest first")
    return None


def _toposort(nodes: dict[str, Node], problems: list[Problem]) -> list[str]:
    order: list[str] = []
    state: dict[str, int] = {}  # 1 = visiting, 2 = done

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = path[path.index(name):] + [name]
            problems.append(Problem(f"{nodes[name].loc}.inputs", "cycle: " + " -> ".join(cycle)
                                    + "; a stage may only read stages that do not read it"))
            return
        state[name] = 1
        for up in nodes[name].upstream():
            if up in nodes:
                visit(up, path + [name])
        state[name] = 2
        order.append(name)

    for name in nodes:
        visit(name, [])
    return order


def _external_facts(art, ref: str) -> Facts:
    """Facts of another run's artifact, as the stage type that made it reads them from its metadata."""
    metadata = {k.removeprefix("kdpipe."): v for k, v in art.file_metadata().items()}
    try:
        made_by = get_stage_class(art.manifest.get("type"))
    except (KeyError, TypeError):
        made_by = Stage  # a stage type this checkout no longer has: the default reading
    facts = made_by.artifact_facts(metadata)
    values = dict(facts.values)
    summary = art.manifest.get("summary") or {}
    if "label_names" not in values and isinstance(summary.get("label_names"), list):
        # a files artifact (a fine-tuned teacher) names its labels in its summary
        values["label_names"] = [str(n) for n in summary["label_names"]]
    return Facts(values, {k: facts.origins.get(k) or f"inputs ({ref})" for k in values})


def _check_kinds_and_columns(graph: Graph, problems: list[Problem]) -> None:
    columns: dict[str, list[str] | None] = {}
    facts: dict[str, Facts] = {}
    for node in graph.nodes.values():
        roles = type(node.stage).inputs
        input_columns: dict[str, list[list[str] | None]] = {}
        input_facts: dict[str, list[Facts]] = {}
        for role, names in node.inputs.items():
            for up in names:
                if up.startswith("@"):
                    art = external_artifact(graph.manifest, up)
                    up_kind, up_type = ("map" if art.num_shards() else "task"), art.manifest.get("type")
                    columns.setdefault(up, art.columns())
                    facts.setdefault(up, _external_facts(art, up))
                else:
                    up_kind, up_type = graph.nodes[up].stage.kind, graph.nodes[up].type
                want = roles[role].kind
                if want == "shards" and up_kind == "task":
                    problems.append(Problem(f"{node.loc}.inputs.{role}", f"{up!r} is a {up_type!r} "
                                            "stage producing files, but this input needs table shards"))
                if want == "files" and up_kind != "task":
                    problems.append(Problem(f"{node.loc}.inputs.{role}", f"{up!r} produces table shards, "
                                            "but this input needs a files artifact (e.g. a checkpoint)"))
                input_columns.setdefault(role, []).append(columns.get(up))
                input_facts.setdefault(role, []).append(facts.get(up, Facts()))
        found = node.stage.validate(input_columns=input_columns)
        for p in found:
            problems.append(Problem(f"{node.loc}.{p.loc}", p.message))
        try:
            out = node.stage.output_facts(input_facts=input_facts)
        except Exception:  # a bad config already reported by validate
            out = Facts()
        facts[node.name] = Facts(out.values, {k: out.origins.get(k) or f"{node.loc}.config.{k}" for k in out.values})
        if not found:
            for p in node.stage.validate_facts(input_facts=input_facts):
                loc = p.loc if p.loc.startswith("stages[") else f"{node.loc}.{p.loc}"
                problems.append(Problem(loc, p.message))
        try:
            columns[node.name] = node.stage.output_columns(input_columns=input_columns)
        except Exception:  # a bad config already reported by validate
            columns[node.name] = None


def _check_workdir(manifest: Manifest, problems: list[Problem]) -> None:
    from pipeline import storage

    if storage.is_remote(manifest.workdir):
        return  # credentials and bucket are checked by the first write, with the store's own error
    workdir = Path(manifest.workdir)
    probe = workdir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if probe.exists() and (not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK)):
        problems.append(Problem("workdir", f"{str(workdir)!r} is not a writable directory "
                                f"({str(probe)!r} is not writable); choose another `workdir:`"))
