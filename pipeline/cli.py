"""The `kdpipe` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import KdpipeError, ManifestError

# Hub look-ups without these retry for ~50 s before failing; kdpipe is offline unless told.
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _add_manifest_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("manifest", help="YAML manifest")
    p.add_argument("--var", action="append", metavar="NAME=VALUE", help="override a manifest variable")
    p.add_argument("--workdir", help="override the manifest's workdir")
    p.add_argument("--only", action="append", metavar="STAGE", help="run only these stages (repeatable)")
    p.add_argument("--from", dest="start", metavar="STAGE", help="run this stage and its descendants")
    p.add_argument("--to", dest="stop", metavar="STAGE", help="run this stage and its ancestors")


def _graph(args: argparse.Namespace):
    from pipeline.manifest import parse_var_overrides
    from pipeline.runner import load_graph

    return load_graph(args.manifest, overrides=parse_var_overrides(args.var), workdir=args.workdir)


def cmd_run(args: argparse.Namespace) -> int:
    from pipeline.runner import run_graph

    graph = _graph(args)
    summary = run_graph(graph, only=args.only, start=args.start, stop=args.stop, address=args.address,
                        progress=not args.no_progress, summary_json=args.summary_json, verify=args.verify)
    print(f"\n{'stage':<20} {'status':<8} {'shards':>9} {'rows':>9} {'seconds':>8}  artifact")
    for s in summary:
        rows = "-" if s["type"] in _task_types(graph) else s["rows"]  # task stages write files
        print(f"{s['name']:<20} {s['status']:<8} {s['shards_run']:>4}/{s['shards_total']:<4} "
              f"{rows:>9} {s['seconds']:>8.1f}  {s['path']}")
    from pipeline import storage

    runs = storage.join(graph.manifest.workdir, "runs", graph.manifest.name)
    print(f"\nartifacts by stage name: {runs}/<stage>  (`kdpipe ls --workdir {graph.manifest.workdir}`)")
    return 0


def _task_types(graph) -> set[str]:
    return {node.type for node in graph.nodes.values() if node.stage.kind == "task"}


def cmd_plan(args: argparse.Namespace) -> int:
    from pipeline.runner import plan_graph

    graph = _graph(args)
    if args.estimate:
        from pipeline.estimate import estimate_graph, format_estimates

        estimates = estimate_graph(graph, probe_rows=args.probe_rows, log=lambda m: print(m, file=sys.stderr))
        print(format_estimates(estimates, gpu_hour_cost=args.gpu_hour_cost))
        return 0
    for plan in plan_graph(graph, only=args.only, start=args.start, stop=args.stop, verify=args.verify):
        print(f"{plan.name:<20} {plan.status:<7} {plan.node.type:<10} {plan.key}  {plan.reason}")
    return 0


def resolve_target(target: str, workdir: str) -> Path:
    """A local folder holding an artifact's model files: from a path (the artifact, its shards/
    folder), an s3:// artifact URI or RUN/STAGE. Remote artifacts are copied locally (files/)."""
    from pipeline.artifact import Artifact

    return Artifact(resolve_artifact(target, workdir)).path


def resolve_artifact(target: str, workdir: str) -> str:
    """The location (path or URI) of one artifact named by path, URI or RUN/STAGE."""
    from pipeline import storage
    from pipeline.artifact import read_alias

    if storage.is_remote(target):
        return target.rstrip("/").removesuffix("/shards")
    path = Path(target)
    if path.exists():
        return str((path.parent if path.name == "shards" else path).resolve())
    run, _, stage = target.partition("/")
    art = read_alias(workdir, run, stage) if stage else None
    if art is None:
        raise KdpipeError(f"no artifact at {target!r} (nor an alias {target!r} in workdir {workdir!r}); "
                          "give a path or RUN/STAGE (`kdpipe ls` lists them)")
    return art.loc


def cmd_inspect(args: argparse.Namespace) -> int:
    from pipeline import storage
    from pipeline.artifact import Artifact

    art = Artifact(resolve_artifact(args.target, args.workdir))
    info: dict[str, Any] = art.manifest if art.is_complete() else {}
    print(f"artifact: {art.loc}")
    print(f"complete: {art.is_complete()}")
    if info:
        print(f"type: {info['type']}   key: {info['key']}   stage: {info.get('run')}/{info.get('stage_name')}")
        print(f"config: {json.dumps(info['config'], sort_keys=True)}")
        for role, ins in info.get("inputs", {}).items():
            print(f"input {role}: " + ", ".join(f"{i['stage']} ({i['key']})" for i in ins))
        if info.get("summary"):
            print(f"summary: {json.dumps(info['summary'], sort_keys=True)}")
        lm = (info.get("summary") or {}).get("lm")
        if lm:
            print(f"token distributions: mode {lm['mode']}, k {lm['k']}, {lm['tokens']} tokens, "
                  f"{lm['bytes_per_token']} bytes/token on disk, KL(full || rebuilt) {lm['kl_full_to_rebuilt']} nats")
    if art.num_shards():
        print(f"rows: {info.get('rows', '?')} in {art.num_shards()} shard(s)")
        print("schema:")
        for field in art.schema():
            print(f"  {field.name}: {field.type}")
        md = art.file_metadata()
        for k in sorted(md):
            if not k.startswith("kdpipe.config") and k.startswith("kdpipe."):
                print(f"  metadata {k}: {md[k][:200]}")
        import pandas as pd

        with pd.option_context("display.max_columns", 20, "display.width", 160, "display.max_colwidth", 60):
            print(art.read_shard(art.shard_indices()[0]).slice(0, args.rows).to_pandas())
        if art.remote:
            print(f"\nload it: fs, path = pyarrow.fs.FileSystem.from_uri({str(art.shards_dir)!r}); "
                  "pandas.read_parquet(path, filesystem=fs)")
        else:
            print(f"\nload it: pandas.read_parquet({str(art.shards_dir)!r})")
    elif info.get("files") or storage.list_files(art.sub("files")):
        print("files:")
        for rel, meta in sorted(info.get("files", {}).items()):
            print(f"  {rel}  ({meta['bytes']} bytes)")
    return 0


def cmd_ls(args: argparse.Namespace) -> int:
    from pipeline.artifact import list_aliases

    aliases = list_aliases(args.workdir)
    if not aliases:
        print(f"no runs under {args.workdir}")
        return 0
    for run, stages in aliases.items():
        print(run)
        for stage, art in stages.items():
            complete = art.is_complete()
            rows = art.manifest.get("rows", "") if complete else ""
            print(f"  {stage:<20} {art.type:<10} {art.key}  {'complete' if complete else 'incomplete':<10} {rows}")
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """Delete artifacts that no run alias points to and no live run uses (claims.py), then stored
    models that no remaining artifact loaded (pipeline/gc.py)."""
    from pipeline.gc import collect_garbage

    collect_garbage(args.workdir, dry_run=args.dry_run)
    return 0


def cmd_schema(args: argparse.Namespace) -> int:
    from pipeline.schema import manifest_json_schema

    print(json.dumps(manifest_json_schema(), indent=2))
    return 0


def cmd_stages(args: argparse.Namespace) -> int:
    from pipeline.code_identity import CodeIdentity
    from pipeline.registry import get_stage_class, stage_types
    from pipeline.stage import located_fields, throughput_fields, unkeyed_fields

    for type_key in [args.type] if args.type else stage_types():
        try:
            cls = get_stage_class(type_key)
        except KeyError:
            raise KdpipeError(f"unknown stage type {type_key!r}; known: {', '.join(stage_types())}") from None
        doc = (cls.__module__ and sys.modules[cls.__module__].__doc__ or cls.__doc__ or "").strip()
        print(f"{type_key} ({cls.kind} stage, code digest {CodeIdentity(type_key).digest})")
        if args.type:
            print("\n" + doc + "\n")
        else:
            print(f"  {doc.splitlines()[0] if doc else ''}")
        for role, spec in cls.inputs.items():
            need = "required" if spec.required else "optional"
            print(f"  input {role}: {spec.kind}, {need}{', many' if spec.many else ''}  {spec.doc}")
        if args.type:
            fast = throughput_fields(cls.Config)
            resolved = unkeyed_fields(cls.Config) - fast
            for name, field in cls.Config.model_fields.items():
                default = "required" if field.is_required() else repr(field.default)
                note = " [throughput: not in cache key]" if name in fast else \
                    " [resolved value in cache key]" if name in resolved else \
                    " [a local path enters the cache key by content]" if name in located_fields(cls.Config) else ""
                desc = f"  {field.description}" if field.description else ""
                print(f"  config.{name} = {default}{note}{desc}")
        print()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdpipe", description="Offline teacher labeling for knowledge distillation")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a manifest (cached stages are reused)")
    _add_manifest_args(p)
    p.add_argument("--address", help="Ray cluster address (default: embedded local Ray)")
    p.add_argument("--summary-json", metavar="PATH", help="write a per-stage summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--verify", action="store_true",
                   help="re-hash cached shards and files before trusting them (default: sizes and stored digests)")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("plan", help="show what would run and why")
    _add_manifest_args(p)
    p.add_argument("--verify", action="store_true", help="re-hash cached shards and files (default: trust stored digests)")
    p.add_argument("--estimate", action="store_true", help="probe each stage on a sample: rows, bytes, time, cost")
    p.add_argument("--probe-rows", type=int, default=256, help="sample rows per probed stage (--estimate)")
    p.add_argument("--gpu-hour-cost", type=float, help="price of one GPU (or machine) hour, for --estimate")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("inspect", help="schema, rows, metadata and first rows of an artifact")
    p.add_argument("target", help="artifact path, or RUN/STAGE")
    p.add_argument("--workdir", default="data")
    p.add_argument("-n", "--rows", type=int, default=5)
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("ls", help="list runs and their artifacts")
    p.add_argument("--workdir", default="data")
    p.set_defaults(func=cmd_ls)

    p = sub.add_parser("gc", help="delete artifacts no run alias points to and no running run uses, "
                                  "and stored models no remaining artifact loaded")
    p.add_argument("--workdir", default="data")
    p.add_argument("--dry-run", action="store_true")
    p.set_defaults(func=cmd_gc)

    p = sub.add_parser("stages", help="list stage types, or show one's inputs and config fields")
    p.add_argument("type", nargs="?")
    p.set_defaults(func=cmd_stages)

    p = sub.add_parser("schema", help="print the manifest JSON Schema (for editor completion)")
    p.set_defaults(func=cmd_schema)

    for extra in EXTRA_COMMANDS:
        extra(sub)
    return parser


def _extra_commands() -> list:
    """Commands that live beside the code they serve (report, predict, verify, keys, code-digest)."""
    import importlib

    out = []
    for module in ("pipeline.verify", "pipeline.report", "pipeline.predict", "pipeline.key_table",
                   "pipeline.code_identity"):
        try:
            out.append(importlib.import_module(module).add_parser)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise
    from pipeline.registry import library_commands

    return out + library_commands()


EXTRA_COMMANDS = _extra_commands()


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ManifestError as e:
        for problem in e.problems:
            print(f"error: {problem}", file=sys.stderr)
        return e.exit_code
    except KdpipeError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print("interrupted; finished shards are kept, rerun to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
