"""`kdpipe report RUN [--workdir data]`: one Markdown and one HTML page per run, under
<workdir>/runs/<RUN>/report/, comparing the teacher and the students: parameters, size on disk,
dev metric, speed-up vs the teacher, labels used; each student's training curves; and an
accuracy-vs-speed plot. The table is also printed with the report's location.

Each finished stage of the run contributes its own section through `Stage.report_section` (today
`train`: its student's dev metric and training curves; `evaluate`: every model's metric, speed
and speed-up, replacing train's rows). Without an evaluate stage the speed columns stay empty."""
from __future__ import annotations

import argparse
import html
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from pipeline.errors import KdpipeError
from pipeline.registry import get_stage_class

COLUMNS = ["model", "role", "type", "params", "size MB", "metric", "value", "sent/s", "speed-up", "labels"]


def _artifacts(run_dir: Path) -> list[tuple[str, Path, dict[str, Any]]]:
    out = []
    for alias in sorted(p for p in run_dir.iterdir() if p.is_symlink()):
        art = alias.resolve()
        try:
            manifest = json.loads((art / "manifest.json").read_text())
        except (OSError, ValueError):
            continue  # an incomplete artifact: nothing to report
        out.append((alias.name, art, manifest))
    return out


def collect_rows(run_dir: Path) -> tuple[list[dict[str, Any]], list[tuple[str, str, Path]]]:
    """Rows of the model table (teacher first) and figures as (title, file name in the report, png)."""
    sections = []
    for name, art, manifest in _artifacts(run_dir):
        try:
            stage_cls = get_stage_class(manifest.get("type"))
        except (KeyError, TypeError):
            continue  # a stage type this checkout no longer has
        section = stage_cls.report_section(name=name, files_dir=art / "files", manifest=manifest)
        if section is not None:
            sections.append((stage_cls.report_order, name, section))
    rows: dict[str, dict[str, Any]] = {}
    figures = []
    for _, name, section in sorted(sections, key=lambda s: s[:2]):
        rows.update((row["model"], row) for row in section.rows)
        figures += [(title, f"{png.stem}-{name}{png.suffix}", png) for title, png in section.figures]
    ordered = sorted(rows.values(), key=lambda r: (r["role"] != "teacher", r["model"]))
    return ordered, figures


def _cell(row: dict[str, Any], col: str) -> str:
    if col == "size MB":
        return "" if row.get("size_bytes") is None else f"{row['size_bytes'] / 1e6:.2f}"
    value = row.get(col)
    if value is None:
        return ""
    if col == "params":
        return f"{value:,}"
    if col == "speed-up":
        return f"{value:.2f}x"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(r, c) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines)


def _speed_plot(rows: list[dict[str, Any]], path: Path) -> bool:
    points = [r for r in rows if r.get("sent/s") and r.get("value") is not None]
    if not points:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    fig, ax = plt.subplots(figsize=(6, 4))
    for r in points:
        ax.scatter(r["sent/s"], r["value"], marker="*" if r["role"] == "teacher" else "o", s=80)
        ax.annotate(r["model"], (r["sent/s"], r["value"]), textcoords="offset points", xytext=(5, 5), fontsize=8)
    ax.set_xscale("log")
    # Minor ticks on a log axis spanning under two decades get labels that overprint each other
    # (seen in a headless render of the quickstart report): label only the decades.
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    ax.set_xlabel("sentences/s (same inputs, same machine)")
    ax.set_ylabel(points[0]["metric"].split(" (")[0])
    ax.set_title("quality vs inference speed")
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


def _audit_sections(run_dir: Path, out: Path) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """`kdpipe audit` results saved under runs/RUN/audit/STAGE/: one summary line and the plots."""
    sections = []
    for audit_json in sorted((run_dir / "audit").glob("*/audit.json")):
        stage = audit_json.parent.name
        a = json.loads(audit_json.read_text(encoding="utf-8"))
        facts = [f"{k} {a[k]}" for k in ("ece", "temperature") if a.get(k) is not None]
        if a.get("gold"):
            facts.append(f"teacher accuracy on gold {a['gold']['accuracy']} ({a['gold']['rows']} rows)")
        if "label_issues" in a:
            facts.append(f"likely gold-label errors {a['label_issues']['count']}")
        if a.get("augmentation"):
            facts.append(f"augmentation agreement {a['augmentation']['agreement']}")
        images = []
        for png in sorted(audit_json.parent.glob("*.png")):
            shutil.copyfile(png, out / f"audit-{stage}-{png.name}")
            images.append((f"Audit {stage}: {png.stem}", f"audit-{stage}-{png.name}"))
        sections.append((stage, "; ".join(facts) + f" (details: ../audit/{stage}/audit.html)", images))
    return sections


def build_report(workdir: str | Path, run: str) -> tuple[Path, str]:
    run_dir = Path(workdir) / "runs" / run
    if not run_dir.is_dir():
        raise KdpipeError(f"no run {run!r} under {Path(workdir) / 'runs'}; `kdpipe ls --workdir {workdir}` lists runs")
    rows, figures = collect_rows(run_dir)
    if not rows:
        raise KdpipeError(f"run {run!r} has no finished stage with a report section (train, evaluate) to report")
    out = run_dir / "report"
    out.mkdir(exist_ok=True)
    images = []
    if _speed_plot(rows, out / "accuracy_vs_speed.png"):
        images.append(("Quality vs speed", "accuracy_vs_speed.png"))
    for title, file, png in figures:
        shutil.copyfile(png, out / file)
        images.append((title, file))
    table = markdown_table(rows)
    audits = _audit_sections(run_dir, out)
    images += [img for _, _, imgs in audits for img in imgs]
    md = [f"# kdpipe report: {run}", "", table, ""]
    md += [f"## Label audit: {stage}\n\n{summary}\n" for stage, summary, _ in audits]
    md += [f"## {title}\n\n![{title}]({file})\n" for title, file in images]
    (out / "report.md").write_text("\n".join(md), encoding="utf-8")
    head = "".join(f"<th>{html.escape(c)}</th>" for c in COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_cell(r, c))}</td>" for c in COLUMNS) + "</tr>" for r in rows)
    figs = "".join(f"<h2>Label audit: {html.escape(stage)}</h2><p>{html.escape(summary)}</p>" for stage, summary, _ in audits)
    figs += "".join(f"<h2>{html.escape(t)}</h2><img src=\"{html.escape(f)}\" alt=\"{html.escape(t)}\">" for t, f in images)
    (out / "report.html").write_text(
        f"<!doctype html><html><head><meta charset=\"utf-8\"><title>kdpipe report: {html.escape(run)}</title>"
        "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #ccc;"
        f"padding:4px 8px}}</style></head><body><h1>kdpipe report: {html.escape(run)}</h1><table><tr>{head}</tr>"
        f"{body}</table>{figs}</body></html>\n", encoding="utf-8")
    return out, table


def cmd_report(args: argparse.Namespace) -> int:
    out, table = build_report(args.workdir, args.run)
    print(table)
    print(f"\nreport: {out / 'report.md'} (and report.html)")
    if args.open:
        import webbrowser

        if not webbrowser.open((out / "report.html").resolve().as_uri()):
            print("no browser found here; open the report.html above", file=sys.stderr)
    return 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("report", help="Markdown/HTML report of a run: teacher vs students")
    p.add_argument("run", help="run name (the manifest's `name`)")
    p.add_argument("--workdir", default="data")
    p.add_argument("--open", action="store_true", help="open report.html in a browser")
    p.set_defaults(func=cmd_report)
