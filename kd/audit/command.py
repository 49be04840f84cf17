"""`kdpipe audit RUN/STAGE [--workdir W] [--out DIR] [--top N] [--data ARTIFACT]`."""
from __future__ import annotations

import argparse
from pathlib import Path


def default_out(target: str, workdir: str, art_dir: Path) -> Path:
    """<workdir>/runs/RUN/audit/STAGE for RUN/STAGE targets (beside `report/`, outside the
    artifact store), else ./audit-<key>."""
    parts = Path(target).parts
    if len(parts) == 2 and (Path(workdir) / "runs" / target).exists():
        return Path(workdir) / "runs" / parts[0] / "audit" / parts[1]
    return Path(f"audit-{art_dir.name}")


def cmd_audit(args: argparse.Namespace) -> int:
    import importlib.util

    from pipeline.errors import KdpipeError

    missing = [m for m in ("torchmetrics", "cleanlab", "scipy") if importlib.util.find_spec(m) is None]
    if missing:
        raise KdpipeError(f"`kdpipe audit` needs {', '.join(missing)}: pip install 'kdpipe[audit]'")
    from kd.audit.audit import audit_label_artifact
    from kd.audit.render import write_audit
    from pipeline.cli import resolve_target

    art_dir = resolve_target(args.target, args.workdir)
    data = resolve_target(args.data, args.workdir) if args.data else None
    report = audit_label_artifact(art_dir, data_dir=data, top=args.top)
    out = Path(args.out) if args.out else default_out(args.target, args.workdir, art_dir)
    paths = write_audit(report, out)
    for key in ("ece", "temperature"):
        if report.get(key) is not None:
            print(f"{key}: {report[key]}")
    if report.get("gold"):
        print(f"teacher accuracy on gold: {report['gold']['accuracy']} ({report['gold']['rows']} rows)")
    if "label_issues" in report:
        print(f"likely gold-label errors: {report['label_issues']['count']}")
    if report.get("augmentation"):
        print(f"augmentation agreement: {report['augmentation']['agreement']}")
    for note in report.get("notes", []):
        print(f"note: {note}")
    print(f"audit: {paths['md']} (and audit.html, audit.json)")
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("audit", help="what a label artifact is worth: calibration, gold, agreement, label issues")
    p.add_argument("target", help="label artifact path, or RUN/STAGE")
    p.add_argument("--workdir", default="data")
    p.add_argument("--out", help="output folder (default: <workdir>/runs/RUN/audit/STAGE)")
    p.add_argument("--top", type=int, default=10, help="rows listed per finding")
    p.add_argument("--data", help="the labelled data artifact, if not the one recorded in the label manifest")
    p.set_defaults(func=cmd_audit)
