"""The SST-2 accuracy / speed / size frontier from a bench/sst2_kd.py --json output (or a
bench/run_all.py results JSON holding one): one point per model, x = parameters (log), y = dev
accuracy (mean over seeds, bars = std), colour = sentences/s (log), the teacher marked.

    .venv/bin/python bench/sst2_frontier.py --from sst2.json --out docs/sst2_frontier.png
    .venv/bin/python bench/sst2_frontier.py --from n10.json n20.json --out docs/sst2_frontier.png

Several results (runs of one workdir at other --n-iter) draw into one plot: the students that
train on the augmented transfer set get ", n_iter N" in their names; the teacher and the students
that do not depend on augmentation are the same cached artifacts, drawn once (first file wins).
"""
from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

LABELS = {"student_kd_aug": "BiLSTM, KD + aug (MSE)", "student_kd": "BiLSTM, KD, no aug", "student_nokd": "BiLSTM, no KD"}


def _inner(result: dict[str, Any]) -> dict[str, Any]:
    return result["benches"]["sst2_kd"]["result"] if "benches" in result else result  # run_all JSON or not


def _on_augmented(key: str) -> bool:
    """Trained on the augmented transfer set (so its numbers depend on n_iter); a variant's gold-only
    control (`*_nokd`) trains on the original sentences."""
    return key == "student_kd_aug" or (key.startswith("variant_") and not key.endswith("_nokd"))


def points(result: dict[str, Any], *, name_n_iter: bool = False) -> list[dict[str, Any]]:
    """(name, params, accuracy mean/std in %, sentences/s, is_teacher) per model of one sst2_kd result."""
    result = _inner(result)
    res = result["results"]
    t = res["teacher"]
    out = [{"name": "teacher (MiniLM-L6, fine-tuned)", "parameters": t["parameters"], "accuracy": 100 * t["accuracy"],
            "std": 0.0, "sentences_per_s": t["sentences_per_s"], "teacher": True}]
    for key, s in res.items():
        if isinstance(s, dict) and "accuracy_mean" in s:
            name = s.get("label") or LABELS.get(key, key)
            if name_n_iter and _on_augmented(key):
                name += f", n_iter {result['n_iter']}"
            out.append({"name": name, "parameters": s["parameters"],
                        "accuracy": 100 * s["accuracy_mean"], "std": 100 * s["accuracy_std"],
                        "sentences_per_s": s["sentences_per_s"], "teacher": False})
    return out


def merged_points(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points of several results of one workdir: a model that appears twice is drawn once."""
    several = len({_inner(r)["n_iter"] for r in results}) > 1
    seen: dict[str, dict[str, Any]] = {}
    for r in results:
        for pt in points(r, name_n_iter=several):
            seen.setdefault(pt["name"], pt)
    return list(seen.values())


def plot(pts: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import LogNorm

    fig, ax = plt.subplots(figsize=(10, 5.5))
    speeds = [p["sentences_per_s"] for p in pts]
    norm = LogNorm(vmin=min(speeds), vmax=max(speeds) * (1.01 if min(speeds) == max(speeds) else 1))
    for p in pts:
        ax.errorbar(p["parameters"], p["accuracy"], yerr=p["std"], fmt="none", ecolor="grey", capsize=3, zorder=1)
    sc = ax.scatter([p["parameters"] for p in pts], [p["accuracy"] for p in pts], c=speeds, cmap="viridis", norm=norm,
                    s=[260 if p["teacher"] else 70 for p in pts], marker="o", edgecolors="black", zorder=2)
    # neighbours in accuracy get their labels on alternate sides, and labels on one side are pushed
    # apart vertically, so close points stay readable
    accs = [p["accuracy"] for p in pts]
    ax.set_ylim(min(accs) - 2, max(accs) + 2)
    bottom, top = ax.get_ylim()
    points_per_unit = ax.get_position().height * fig.get_figheight() * 72 / (top - bottom)
    last = {True: -math.inf, False: -math.inf}  # the highest label so far, per side (in accuracy units)
    largest = max(p["parameters"] for p in pts)
    for rank, p in enumerate(sorted(pts, key=lambda q: q["accuracy"])):
        if p["teacher"]:
            ax.scatter([p["parameters"]], [p["accuracy"]], marker="*", s=420, facecolors="none",
                       edgecolors="red", linewidths=1.5, zorder=3)
        # labels of the largest models go left, where the plot has room for them
        right = (rank % 2 == 0 or p["teacher"]) and p["parameters"] < largest / 4
        at = max(p["accuracy"], last[right] + 12 / points_per_unit)
        last[right] = at
        ax.annotate(f"{p['name']} ({p['sentences_per_s']:,.0f} sent/s)", (p["parameters"], p["accuracy"]),
                    textcoords="offset points", xytext=(8 if right else -8, -3 + (at - p["accuracy"]) * points_per_unit),
                    fontsize=7, ha="left" if right else "right")
    ax.set_xscale("log")
    lo, hi = min(p["parameters"] for p in pts), max(p["parameters"] for p in pts)
    ax.set_xlim(lo / 20, hi * 8)  # room for the labels left of the smallest model
    ax.set(xlabel="parameters (log scale)", ylabel="SST-2 dev accuracy (%)", title=title)
    fig.colorbar(sc, ax=ax, label="sentences/s on this machine (log)")
    ax.grid(True, which="major", alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--from", dest="sources", type=Path, nargs="+", required=True,
                   help="sst2_kd.py --json output(s) or run_all JSON(s) of one workdir")
    p.add_argument("--out", type=Path, default=Path("docs/sst2_frontier.png"))
    p.add_argument("--title", default=None)
    args = p.parse_args(argv)
    results = [json.loads(path.read_text(encoding="utf-8")) for path in args.sources]
    inner = _inner(results[0])
    n_iters = "/".join(str(n) for n in dict.fromkeys(_inner(r)["n_iter"] for r in results))
    title = args.title or (f"SST-2: {inner['rows']:,} training sentences (--scale {inner['scale']:g}), "
                           f"n_iter {n_iters}, seeds {len(inner['seeds'])}")
    pts = merged_points(results)
    plot(pts, args.out, title=title)
    for pt in sorted(pts, key=lambda q: -q["accuracy"]):
        print(f"{pt['name']:<45} {pt['parameters']:>12,} {pt['accuracy']:6.2f} ± {pt['std']:4.2f} "
              f"{pt['sentences_per_s']:>9.1f} sent/s{'  (teacher)' if pt['teacher'] else ''}")
    print(f"wrote {args.out} ({math.ceil(args.out.stat().st_size / 1024)} KiB)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
