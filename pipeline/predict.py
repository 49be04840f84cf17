"""`kdpipe predict ARTIFACT_OR_RUN/STAGE --text ... | --file F`: run a trained student (or an HF
teacher checkpoint artifact) on texts; prints `prediction<TAB>text`, one line per input."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from pipeline.artifact import MANIFEST
from pipeline.errors import KdpipeError
from pipeline.registry import get_stage_class, load_model


def resolve_model_dir(target: str, workdir: str) -> Path:
    """A student/HF directory from an artifact path, RUN/STAGE alias, or the directory itself."""
    from pipeline.cli import resolve_target

    path = resolve_target(target, workdir)
    if _is_model(path):
        return path
    found = _artifact_model_folder(path)
    if found is None or not _is_model(found):
        raise KdpipeError(f"{path} holds no trained model (no files/student or files/model); point at a "
                          "train or finetune stage")
    return found


def _is_model(path: Path) -> bool:
    return (path / "student.json").is_file() or (path / "config.json").is_file()


def _artifact_model_folder(art_dir: Path) -> Path | None:
    """Where the stage type that made this artifact keeps its model (`Stage.model_folder`)."""
    try:
        stage_cls = get_stage_class(json.loads((art_dir / MANIFEST).read_text(encoding="utf-8"))["type"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # not a finished artifact, or of a stage type this checkout no longer has
    return art_dir / "files" / stage_cls.model_folder if stage_cls.model_folder else None


def cmd_predict(args: argparse.Namespace) -> int:
    texts = list(args.text or [])
    if args.file:
        source = sys.stdin if args.file == "-" else open(args.file, encoding="utf-8")
        with source:
            texts += [line.rstrip("\n") for line in source if line.strip()]
    if not texts:
        raise KdpipeError("nothing to predict: give --text TEXT (repeatable) or --file FILE ('-' = stdin)")
    pairs = list(args.pair or []) or None
    if pairs is not None and len(pairs) != len(texts):
        raise KdpipeError(f"{len(pairs)} --pair values for {len(texts)} texts; give one --pair per --text")
    model = load_model(resolve_model_dir(args.target, args.workdir))
    kwargs = {"batch_size": args.batch_size}
    if pairs is not None:
        kwargs["pairs"] = pairs
    for text, pred in zip(texts, model.predict(texts, **kwargs)):
        shown = " ".join(pred) if isinstance(pred, list) else pred
        print(f"{shown}\t{text}")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("predict", help="predict with a trained student or teacher artifact")
    p.add_argument("target", help="artifact path, RUN/STAGE, or a student directory")
    p.add_argument("--text", action="append", help="an input text (repeatable)")
    p.add_argument("--pair", action="append", help="second sentence for pair students (one per --text)")
    p.add_argument("--file", help="one input text per line ('-' = stdin)")
    p.add_argument("--workdir", default="data")
    p.add_argument("--batch-size", type=int, default=64)
    p.set_defaults(func=cmd_predict)
