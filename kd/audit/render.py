"""Write an audit as audit.json, audit.md and audit.html with PNG plots (matplotlib, Agg)."""
from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    _plt().close(fig)


def plot_gold(report: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    g = report.get("gold")
    if not g:
        return []
    plt = _plt()
    names = report["label_names"]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    acc = [g["per_class"][n]["accuracy"] or 0.0 for n in names]
    ax1.bar(range(len(names)), acc, color="#4c72b0")
    ax1.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax1.set_ylim(0, 1)
    ax1.set_ylabel("teacher accuracy on gold")
    ax1.set_title(f"accuracy per class (overall {g['accuracy']:.3f}, {g['rows']} rows)")
    for i, a in enumerate(acc):
        ax1.text(i, a + 0.02, f"{a:.3f}", ha="center", fontsize=9)
    cm = np.array(g["confusion"])
    ax2.imshow(cm, cmap="Blues")
    ax2.set_xticks(range(len(names)), names, rotation=30, ha="right")
    ax2.set_yticks(range(len(names)), names)
    ax2.set_xlabel("teacher")
    ax2.set_ylabel("gold")
    ax2.set_title("confusion matrix")
    for (i, j), v in np.ndenumerate(cm):
        ax2.text(j, i, str(v), ha="center", va="center", color="white" if v > cm.max() / 2 else "black")
    _save(fig, out / "gold.png")
    return [("Teacher vs gold", "gold.png")]


def plot_reliability(report: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    cal = report.get("calibration")
    if not cal:
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5, 5))
    bins = cal["bins"]
    width = 1.0 / cal["n_bins"]
    ax.bar([b["lo"] for b in bins], [b["accuracy"] for b in bins], width=width, align="edge",
           edgecolor="black", color="#4c72b0", label="accuracy in bin")
    # The gap between a bar's top (accuracy) and its marker (mean confidence) is what ECE averages.
    ax.plot([(b["lo"] + b["hi"]) / 2 for b in bins], [b["confidence"] for b in bins], "_", markersize=14,
            markeredgewidth=3, color="#c44e52", label="mean confidence in bin")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("teacher confidence (top label)")
    ax.set_ylabel("accuracy")
    ax.set_title(f"reliability: ECE {report['ece']:.4f}, best T {report['temperature']:.2f}")
    ax.legend(loc="upper left", fontsize=8)
    _save(fig, out / "reliability.png")
    return [("Calibration", "reliability.png")]


def plot_augmentation(report: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    aug = report.get("augmentation")
    if not aug or not aug["per_combination"]:
        return []
    plt = _plt()
    items = list(aug["per_combination"].items())
    fig, ax = plt.subplots(figsize=(7, 0.4 * len(items) + 1.5))
    ax.barh([k for k, _ in items], [v["agreement"] for _, v in items], color="#55a868")
    for i, (_, v) in enumerate(items):
        ax.text(min(v["agreement"], 0.85) + 0.01, i, f"{v['agreement']:.3f} (n={v['samples']})", va="center", fontsize=8)
    ax.set_xlim(0, 1)
    ax.set_xlabel("teacher label agrees with the original's")
    ax.set_title("augmentation agreement by operations applied")
    _save(fig, out / "augmentation.png")
    return [("Augmentation agreement", "augmentation.png")]


def plot_topk(report: dict[str, Any], out: Path) -> list[tuple[str, str]]:
    mass = report.get("_topk_mass")
    if mass is None or not len(mass):
        return []
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.hist(mass, bins=40, range=(0, 1), color="#8172b2")
    ax.set_xlabel(f"probability mass kept by the stored top-{report['topk']['k']}")
    ax.set_ylabel("target positions")
    ax.set_title(f"top-k mass (mean {report['topk']['mass_mean']:.3f})")
    _save(fig, out / "topk_mass.png")
    return [("Top-k cache", "topk_mass.png")]


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    def cell(v: Any) -> str:
        return ("" if v is None else str(v)).replace("|", "\\|").replace("\n", " ")

    return "\n".join(["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
                     + ["| " + " | ".join(cell(v) for v in r) + " |" for r in rows])


def markdown(report: dict[str, Any], images: dict[str, str]) -> str:
    """The audit as Markdown; each plot sits in its own section (`images`: section -> PNG name)."""

    def figure(section: str) -> list[str]:
        return [f"![{section}]({images[section]})", ""] if section in images else []

    md = [f"# Label audit: {report['artifact']}", "",
          f"task: {report['task']}, rows: {report['rows']}"
          + (f", teachers: {', '.join(report['teachers'])}" if report.get("teachers") else ""), ""]
    md += [f"> note: {n}" for n in report.get("notes", [])] + [""]
    if report.get("gold"):
        g = report["gold"]
        md += ["## Teacher vs gold", "", f"accuracy {g['accuracy']} on {g['rows']} gold rows", "",
               _table(["class", "rows", "accuracy"], [[n, v["rows"], v["accuracy"]] for n, v in g["per_class"].items()]), ""]
        md += figure("Teacher vs gold")
    if report.get("calibration"):
        c = report["calibration"]
        md += ["## Calibration", "", f"- ECE ({c['n_bins']} bins, torchmetrics): **{report['ece']}**",
               f"- temperature minimising NLL: **{report['temperature']}** (suggested KD temperature); "
               f"ECE at that T: {c['ece_at_temperature']}",
               f"- NLL at T=1: {c['nll_t1']}, at best T: {c['nll_best_t']}"]
        if "heldout_nll_t1" in c:
            md.append(f"- held-out NLL (T fitted on the other half, both ways): {c['heldout_nll_t1']} at T=1 -> "
                      f"{c['heldout_nll_fitted_t']} (fold temperatures {c['fold_temperatures']})")
        md.append("")
        md += figure("Calibration")
    if "label_issues" in report:
        li = report["label_issues"]
        md += ["## Likely gold-label errors (cleanlab find_label_issues)", "",
               f"{li['count']} rows ({li['share']:.1%} of gold rows) flagged; most suspicious first:", "",
               _table(["id", "gold", "teacher", "p(gold)", "text"],
                      [[r["id"], r["gold"], r["teacher"], r["p_gold"], r["text"]] for r in li["top"]]), ""]
    if report.get("augmentation"):
        a = report["augmentation"]
        md += ["## Augmentation agreement", "",
               f"{a['agree']} of {a['samples']} augmented rows ({a['agreement']}) keep the teacher label of their "
               f"original ({a['originals']} originals, {a['unmatched_samples']} samples without a labelled original)", "",
               _table(["op (fired in the sample)", "samples", "agree", "agreement"],
                      [[k, v["samples"], v["agree"], v["agreement"]] for k, v in a["per_op"].items()]), "",
               _table(["exact ops", "samples", "agree", "agreement"],
                      [[k, v["samples"], v["agree"], v["agreement"]] for k, v in a["per_combination"].items()]), ""]
        md += figure("Augmentation agreement")
    if report.get("ensemble"):
        e = report["ensemble"]
        md += ["## Ensemble agreement", "", f"all members agree on {e['all_agree']:.1%} of rows; "
               f"mean Jensen-Shannon divergence {e['js_divergence_mean']}", "",
               _table(["pair", "agreement"], [[k, v] for k, v in e["pairwise"].items()]), "", "Top disagreements:", "",
               _table(["id", "JS", "predictions", "text"],
                      [[r["id"], r["js_divergence"], ", ".join(f"{k}: {v}" for k, v in r["predictions"].items()), r["text"]]
                       for r in e["top_disagreements"]]), ""]
    if report.get("topk"):
        t = report["topk"]
        md += ["## Top-k cache", "", _table(list(t), [list(t.values())]), "",
               "KL(renormalised top-k || teacher) = -log(stored mass) per position, so its mean is exact.", ""]
        md += figure("Top-k cache")
    return "\n".join(md)


def _md_table_to_html(lines: list[str]) -> str:
    rows = [[c.strip().replace("\\|", "|") for c in line.strip().strip("|").split(" | ")] for line in lines if not line.startswith("|---")]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in rows[0])
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in r) + "</tr>" for r in rows[1:])
    return f"<table><tr>{head}</tr>{body}</table>"


def to_html(md: str, title: str) -> str:
    """The Markdown above as HTML (headings, notes, lists, tables, images): enough for our own output."""
    out, table = [], []
    for line in md.splitlines() + [""]:
        if line.startswith("|"):
            table.append(line)
            continue
        if table:
            out.append(_md_table_to_html(table))
            table = []
        text = html.escape(line).replace("**", "")
        if line.startswith("!["):
            alt, src = line[2:].split("](", 1)
            out.append(f'<img src="{html.escape(src.rstrip(")"))}" alt="{html.escape(alt)}">')
        elif line.startswith("## "):
            out.append(f"<h2>{text[3:]}</h2>")
        elif line.startswith("# "):
            out.append(f"<h1>{text[2:]}</h1>")
        elif text.startswith("&gt; "):
            out.append(f'<p class="note">{text[5:]}</p>')
        elif line.startswith("- "):
            out.append(f"<li>{text[2:]}</li>")
        elif line:
            out.append(f"<p>{text}</p>")
    style = ("body{font-family:sans-serif;max-width:1100px;margin:1em auto}table{border-collapse:collapse;margin:.5em 0}"
             "td,th{border:1px solid #ccc;padding:3px 8px;font-size:13px;text-align:left}"
             ".note{background:#fff3cd;padding:4px 8px}img{max-width:100%;display:block;margin:.5em 0}")
    return (f'<!doctype html><html><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
            f"<style>{style}</style></head><body>{''.join(out)}</body></html>\n")


def write_audit(report: dict[str, Any], out: Path) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    images = plot_gold(report, out) + plot_reliability(report, out) + plot_augmentation(report, out) + plot_topk(report, out)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    (out / "audit.json").write_text(json.dumps(public, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
    md = markdown(public, dict(images))
    (out / "audit.md").write_text(md, encoding="utf-8")
    (out / "audit.html").write_text(to_html(md, f"label audit: {report['artifact']}"), encoding="utf-8")
    return {"json": out / "audit.json", "md": out / "audit.md", "html": out / "audit.html"}
