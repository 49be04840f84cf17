"""Scaled Tang et al. (2019) SST-2 experiment, run through kdpipe manifests.

The template is manifests/sst2-tang.yaml. This script rescales it (training subset, n_iter,
epochs), repeats the three BiLSTM students over several seeds (teacher, transfer set and teacher
labels are shared: they are the same cached artifacts), runs the generated manifest with the
runner, and reports SST-2 dev accuracy (872 sentences, never used for any choice: epochs and
early stopping use `heldout`, 5% of the training subset) as mean +- std over seeds:

    teacher (fine-tuned MiniLM)   | KD + augmentation | KD, no augmentation | no KD (gold only)

plus the share of the teacher-student gap that KD closes, parameters, and inference speed-up
(sentences/s of each model on the same dev inputs, same process, batch 64).

Scale 1.0 (sized for about an hour on 2 CPU cores, not shared with other work):
    5,000 shuffled training sentences (4,750 train / 250 held out), n_iter 10 (Tang: 20), teacher
    2 epochs, KD+aug student up to 4 epochs, the other students up to 10 (patience 2), 3 seeds.
    Expected cost (extrapolated from --scale 0.2, which ran 13.5 min on the 2 shared cores):
    teacher ~10 min (MiniLM training is ~15-20 rows/s here), labeling ~50k rows ~8 min, 9 students
    ~20 min, evaluation ~2 min.
--scale is a fraction in (0, 1] of the training subset (the other settings stay); 0.02 is a smoke test.

--variants adds students from the literature that try to close more of the gap, each trained on
the same augmented transfer set and teacher labels as the KD+aug BiLSTM (VARIANTS below: KL at a
temperature instead of MSE, a CNN, a small transformer, a sentencepiece vocabulary from the `spm`
stage instead of words, a transformer started from 2 or 3 of the teacher's layers); --n-iter sets the augmentation samples per sentence. bench/sst2_frontier.py
draws params vs accuracy vs sentences/s of every model from the --json output.

    .venv/bin/python bench/sst2_kd.py --scale 1 [--data ../shared/data/sst2] [--seeds 3] [--json out.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import yaml

from _env import REPO, add_bench_args, write_json
TEMPLATE = REPO / "manifests" / "sst2-tang.yaml"
TRAIN_ROWS = 5000
STUDENTS = {"student_kd_aug": "KD + augmentation", "student_kd": "KD, no augmentation", "student_nokd": "no KD"}
GOALS = {"kd_aug_minus_nokd_points": 4.0, "gap_closed": 0.5, "speedup": 20.0}
# name -> (label, config changes to the KD+aug BiLSTM; an "inputs" entry replaces inputs, None drops
# one). All but the gold-only control train on `augment` with the same labels.
VARIANTS: dict[str, tuple[str, dict]] = {
    "kl_t2": ("BiLSTM, KL at T = 2 (Hinton)", {"losses": {"ce": 0.0, "mse": 0.0, "kl": 1.0}, "temperature": 2.0}),
    "kl_t4": ("BiLSTM, KL at T = 4 (Hinton)", {"losses": {"ce": 0.0, "mse": 0.0, "kl": 1.0}, "temperature": 4.0}),
    "cnn": ("CNN (Kim 2014), MSE", {"student": {"type": "cnn", "embedding_dim": 300, "num_filters": 100,
                                                "filter_sizes": [3, 4, 5], "dropout": 0.1}}),
    "transformer": ("transformer 2 x 128, MSE", {
        "student": {"type": "transformer", "dropout": 0.1,
                    "hf_config": {"model_type": "bert", "hidden_size": 128, "num_hidden_layers": 2,
                                  "num_attention_heads": 2, "intermediate_size": 256, "max_position_embeddings": 128}},
        "lr": 5.0e-4}),
    "spm": ("BiLSTM, 8k sentencepiece vocabulary, MSE", {"tokenizer": {"kind": "spm", "lowercase": True},
                                                         "inputs": {"tokenizer": "spm"}}),
}


def _from_teacher(layers: list[int]) -> dict[str, tuple[str, dict]]:
    """Sanh et al. 2019 / Sun et al. 2019: the teacher's embeddings, some of its 6 layers (evenly
    spaced) and its head start a transformer student; lr as the teacher's own fine-tuning, batches
    grouped by length as its. With its control: the same start trained on the gold labels of the
    4,761 original sentences only (no KD, no augmentation; epochs as the no-KD BiLSTM)."""
    name, shown = f"teacher_l{len(layers)}", f"transformer from the teacher's layers {', '.join(map(str, layers))}"
    start = {"student": {"type": "transformer", "init_layers": layers}, "tokenizer": {"kind": "hf"},
             "lr": 5.0e-5, "group_by_length": True}
    return {name: (f"{shown}, MSE", {**start, "inputs": {"init": "teacher"}}),
            f"{name}_nokd": (f"{shown}, no KD (gold only)", {
                **start, "losses": {"ce": 1.0}, "gold_only": True,
                "inputs": {"init": "teacher", "data": "train", "labels": None}})}


VARIANTS |= _from_teacher([0, 3]) | _from_teacher([0, 2, 4])


def build_manifest(*, scale: float, data: str, seeds: list[int], n_iter: int, workdir: str,
                   teacher_epochs: int, kd_aug_epochs: int, student_epochs: int,
                   variants: list[str] = (), variant_seeds: list[int] | None = None) -> dict:
    raw = yaml.safe_load(TEMPLATE.read_text(encoding="utf-8"))  # anchors are expanded here
    rows = max(40, round(TRAIN_ROWS * scale))
    raw["name"] = f"sst2-kd-bench-{rows}"
    raw["workdir"] = workdir
    raw["vars"].update(sst2=data, n_iter=n_iter)
    stages = {s["name"]: s for s in raw["stages"]}
    read = stages["sst2_train"]["config"]
    read.update(shuffle=True, shuffle_seed=0, limit=rows, rows_per_shard=max(20, -(-rows // 2)))
    stages["teacher"]["config"].update(epochs=teacher_epochs)
    out = [s for s in raw["stages"] if s["name"] not in STUDENTS and s["type"] != "evaluate"]
    models = ["teacher"]
    for seed in seeds:
        for name in STUDENTS:
            spec = copy.deepcopy(stages[name])
            spec["name"] = f"{name}_seed{seed}"
            spec["config"].update(seed=seed, epochs=kd_aug_epochs if name == "student_kd_aug" else student_epochs)
            out.append(spec)
            models.append(spec["name"])
    if "spm" in variants:
        out.append({"name": "spm", "type": "spm", "inputs": {"data": "augment"}, "config": {"vocab_size": 8000}})
    for variant in variants:
        for seed in seeds if variant_seeds is None else variant_seeds:
            spec = copy.deepcopy(stages["student_kd_aug"])
            spec["name"] = f"variant_{variant}_seed{seed}"
            changes = copy.deepcopy(VARIANTS[variant][1])
            spec["config"]["losses"] = changes.pop("losses", spec["config"]["losses"])
            inputs = {**spec["inputs"], **changes.pop("inputs", {})}
            spec["inputs"] = {role: ref for role, ref in inputs.items() if ref is not None}
            epochs = student_epochs if changes.pop("gold_only", False) else kd_aug_epochs
            spec["config"].update(changes, seed=seed, epochs=epochs)
            out.append(spec)
            models.append(spec["name"])
    evaluate = copy.deepcopy(stages["evaluate"])
    evaluate["inputs"]["models"] = models
    evaluate["config"]["speed_rows"] = 512
    out.append(evaluate)
    raw["stages"] = out
    return raw


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarize(metrics: dict, seeds: list[int], variants: list[str] = (), variant_seeds: list[int] | None = None) -> dict:
    """Mean/std per student over seeds; gap closure of KD+aug and of each variant against no-KD."""
    by_name = {m["name"]: m for m in metrics["models"]}
    teacher = by_name["teacher"]
    out = {"teacher": {"accuracy": teacher["metrics"]["accuracy"], "parameters": teacher["parameters"],
                       "sentences_per_s": teacher["sentences_per_s"]}}
    names = [(name, seeds) for name in STUDENTS]
    names += [(f"variant_{v}", seeds if variant_seeds is None else variant_seeds) for v in variants]
    for name, name_seeds in names:
        runs = [by_name[f"{name}_seed{s}"] for s in name_seeds]
        acc = mean_std([r["metrics"]["accuracy"] for r in runs])
        out[name] = {"accuracy_mean": acc[0], "accuracy_std": acc[1],
                     "accuracies": [r["metrics"]["accuracy"] for r in runs], "parameters": runs[0]["parameters"],
                     "sentences_per_s": statistics.median(r["sentences_per_s"] for r in runs),
                     "speedup": statistics.median(r["speedup_vs_teacher"] for r in runs)}
    nokd, kd_aug = out["student_nokd"]["accuracy_mean"], out["student_kd_aug"]["accuracy_mean"]
    gap = out["teacher"]["accuracy"] - nokd
    out["kd_aug_minus_nokd_points"] = 100 * (kd_aug - nokd)
    out["gap_closed"] = (kd_aug - nokd) / gap if gap > 0 else None
    out["kd_minus_nokd_points"] = 100 * (out["student_kd"]["accuracy_mean"] - nokd)
    for v in variants:
        acc = out[f"variant_{v}"]["accuracy_mean"]
        out[f"variant_{v}"]["label"] = VARIANTS[v][0]
        out[f"variant_{v}"]["gap_closed"] = (acc - nokd) / gap if gap > 0 else None
    return out


def report(res: dict, *, rows: int, dev_rows: int, seeds: list[int], args, seconds: float, stage_seconds: dict) -> str:
    t = res["teacher"]
    lines = [f"SST-2 dev accuracy ({dev_rows} sentences); training subset {rows} rows (5% held out for epoch "
             f"choice), n_iter {args.n_iter}, seeds {seeds}, teacher {args.teacher_epochs} epochs, "
             f"students <= {args.kd_aug_epochs} (KD+aug) / {args.student_epochs} epochs",
             f"{'model':<22} {'dev accuracy':>18} {'params':>12} {'sent/s':>9} {'speed-up':>9}",
             f"{'teacher (MiniLM)':<22} {100 * t['accuracy']:>11.2f}        {t['parameters']:>12,} "
             f"{t['sentences_per_s']:>9.1f} {1.0:>8.1f}x"]
    for name, label in STUDENTS.items():
        s = res[name]
        lines.append(f"{label:<22} {100 * s['accuracy_mean']:>8.2f} +- {100 * s['accuracy_std']:<5.2f} "
                     f"{s['parameters']:>12,} {s['sentences_per_s']:>9.1f} {s['speedup']:>8.1f}x")
    for key in (k for k in res if k.startswith("variant_")):
        s = res[key]
        gap = "n/a" if s["gap_closed"] is None else f"{100 * s['gap_closed']:.0f}%"
        lines.append(f"{s['label']:<42} {100 * s['accuracy_mean']:>8.2f} +- {100 * s['accuracy_std']:<5.2f} "
                     f"{s['parameters']:>12,} {s['sentences_per_s']:>9.1f} {s['speedup']:>8.1f}x  gap closed {gap}")
    gap = res["gap_closed"]
    checks = [("KD+aug - no-KD (points)", res["kd_aug_minus_nokd_points"], GOALS["kd_aug_minus_nokd_points"]),
              ("share of the gap closed", gap, GOALS["gap_closed"]),
              ("student speed-up vs teacher", res["student_kd_aug"]["speedup"], GOALS["speedup"])]
    lines.append("")
    lines.append(f"{'measure':<30} {'measured':>9} {'goal':>7}  met")
    for label, value, goal in checks:
        shown = "n/a" if value is None else f"{value:.2f}"
        lines.append(f"{label:<30} {shown:>9} {'>= ' + str(goal):>7}  {'yes' if value is not None and value >= goal else 'NO'}")
    lines.append(f"KD without augmentation - no-KD: {res['kd_minus_nokd_points']:.2f} points")
    lines.append("")
    lines.append("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()))
    lines.append(f"ran for {seconds / 60:.1f} min (cached stages cost nothing: rerun with a new --workdir to time all)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_args(p, default_scale=1.0, full=f"{TRAIN_ROWS:,} training sentences, about an hour",
                   full_rows=TRAIN_ROWS)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "sst2"), help="folder with train.tsv, dev.tsv")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--n-iter", type=int, default=10)
    p.add_argument("--teacher-epochs", type=int, default=2)
    p.add_argument("--kd-aug-epochs", type=int, default=4)
    p.add_argument("--student-epochs", type=int, default=10)
    p.add_argument("--workdir", default=str(REPO / "out" / "sst2_kd"))
    p.add_argument("--variants", default="", help="comma-separated extra students: " + ", ".join(VARIANTS))
    p.add_argument("--variant-seeds", type=int, default=None, help="seeds per variant (default: --seeds)")
    args = p.parse_args(argv)
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {unknown}; known: {', '.join(VARIANTS)}")
    if not (Path(args.data) / "train.tsv").is_file():
        p.error(f"{args.data}/train.tsv not found; pass --data <folder with the GLUE SST-2 TSVs>")
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    seeds = list(range(args.seeds))
    variant_seeds = None if args.variant_seeds is None else list(range(args.variant_seeds))
    raw = build_manifest(scale=args.scale, data=args.data, seeds=seeds, n_iter=args.n_iter, workdir=args.workdir,
                         teacher_epochs=args.teacher_epochs, kd_aug_epochs=args.kd_aug_epochs,
                         student_epochs=args.student_epochs, variants=variants, variant_seeds=variant_seeds)
    rows = raw["stages"][0]["config"]["limit"]
    start = time.perf_counter()
    summary = run_graph(build_graph(parse_manifest(raw, source=f"{TEMPLATE} (scaled)")), progress=False)
    seconds = time.perf_counter() - start
    stages = {s["name"]: s for s in summary}
    from pipeline.artifact import Artifact

    metrics = json.loads((Artifact(stages["evaluate"]["path"]).files_dir / "metrics.json").read_text())
    res = summarize(metrics, seeds, variants, variant_seeds)
    stage_seconds = {n: s["seconds"] for n, s in stages.items() if s["seconds"] >= 1}
    print()
    print(report(res, rows=rows, dev_rows=metrics["rows"], seeds=seeds, args=args, seconds=seconds,
                 stage_seconds=stage_seconds))
    write_json(args.json, {"bench": "sst2_kd", "scale": args.scale, "rows": rows, "seeds": seeds,
                           "variants": variants, "variant_seeds": variant_seeds if variant_seeds is not None else seeds,
                           "n_iter": args.n_iter, "seconds": round(seconds, 1), "stage_seconds": stage_seconds,
                           "dev_rows": metrics["rows"], "results": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
