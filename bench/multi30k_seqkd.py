"""Benchmark: sequence-level KD on Multi30k EN->DE, through the real manifest, with one
learning-rate rule for every student and several seeds.

Runs manifests/multi30k-seqkd.yaml on Ray (read -> seq2seq teacher -> beam labels -> five
students sharing the teacher's vocabulary: references, Seq-KD, Seq-Inter, Word-KD on the gold
prefixes (Kim & Rush), Seq-KD + Word-KD along the teacher's hypothesis), then decodes in this
process with every model, same batches and thread count.

The rule, the same for every student: train seed 0 at every learning rate of `--lrs`, decode the
Multi30k validation split greedily, keep the rate with the highest validation BLEU (ties: the
smaller rate); then train the other seeds at that rate. test_2016_flickr is only ever decoded
for the final table: BLEU / chrF (sacrebleu) mean +- sd over the seeds, greedy and beam.
The beam width is `--beams` (the manifest's num_beams: the teacher's generation config, the
labels' beam search, and the beam decodes here); the teacher is decoded with the width read
back from its own checkpoint.
Goal (issue 7): the Seq-KD student (greedy) beats the reference-trained student (greedy).

Documented scale (--scale 1, the manifest's defaults): teacher (BART layout) d_model 256 / ff
1024 / 3+3 layers (6.6M params) trained 6 epochs on all 29,000 pairs with a joint 4k
sentencepiece; it labels a random 10,000-pair subset (beam 5, 5-best, top-8), on which the
students, d_model 128 / ff 512 / 2+2 layers (1.5M params), train 6 epochs; all 1,014 validation
and 1,000 test sentences. With the default grid (3 rates) and 3 seeds that is 25 student runs,
several hours on 2 CPU cores. --scale s in (0, 1] multiplies the pair and sentence counts
(epochs stay); --tiny swaps in test-sized models to prove the script works in minutes.

    .venv/bin/python bench/multi30k_seqkd.py                 # the documented run
    .venv/bin/python bench/multi30k_seqkd.py --scale 0.01 --tiny --lrs 1e-3 --seeds 2
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

from _env import REPO, add_bench_args, write_json

MANIFEST = REPO / "manifests" / "multi30k-seqkd.yaml"
STUDENTS = ["student_reference", "student_seqkd", "student_seqinter", "student_wordkd", "student_seqkd_wordkd"]
TINY = {"vocab_size": 500, "teacher_d_model": 64, "teacher_d_ff": 128, "teacher_layers": 2,
        "student_d_model": 32, "student_d_ff": 64, "student_layers": 1, "batch_size": 16, "max_tokens": 32}
DEFAULT_LRS = (5e-4, 1e-3, 2e-3)


def select_lr(val_bleu: dict[float, float]) -> float:
    """The grid rate with the highest validation BLEU; a tie goes to the smaller rate."""
    if not val_bleu:
        raise ValueError("no validation scores to choose a learning rate from")
    return max(sorted(val_bleu), key=lambda lr: (val_bleu[lr], -lr))


def run_name(student: str, lr: float, seed: int) -> str:
    return f"{student}__lr{lr:g}__seed{seed}"


def with_runs(raw: dict[str, Any], runs: list[tuple[str, float, int]]) -> dict[str, Any]:
    """The manifest with its students replaced by one stage per (student, lr, seed) and no evaluate
    stage (decoding happens in this process)."""
    raw = copy.deepcopy(raw)
    by_name = {s["name"]: s for s in raw["stages"]}
    stages = [s for s in raw["stages"] if s["name"] not in STUDENTS and s["type"] != "evaluate"]
    for student, lr, seed in runs:
        spec = copy.deepcopy(by_name[student])
        spec["name"] = run_name(student, lr, seed)
        spec["config"]["seed"] = seed
        spec["config"]["train"]["lr"] = lr
        stages.append(spec)
    raw["stages"] = stages
    return raw


def decode(model, texts: list[str], *, num_beams: int, batch_size: int = 64) -> tuple[list[str], float]:
    """Translations and sentences/s (after one warm-up batch)."""
    model.predict(texts[:batch_size], num_beams=num_beams, batch_size=batch_size)
    start = time.perf_counter()
    out = model.predict(texts, num_beams=num_beams, batch_size=batch_size)
    return out, len(texts) / max(time.perf_counter() - start, 1e-9)


def lines(path: Path, limit: int) -> list[str]:
    return path.read_text(encoding="utf-8").splitlines()[:limit]


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_args(p, default_scale=1.0, full="teacher on 29,000 pairs, students on 10,000, 1,014 validation "
                   "and 1,000 test sentences, 25 student runs", full_rows=10_000)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "multi30k"))
    p.add_argument("--tiny", action="store_true", help="test-sized models (a smoke run, not a result)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", default=None, help="artifact store (default: a fresh temp dir); reuse to resume")
    p.add_argument("--epochs", type=float, default=None, help="override teacher and student epochs")
    p.add_argument("--lrs", default=",".join(f"{lr:g}" for lr in DEFAULT_LRS),
                   help="the learning-rate grid every student chooses from on validation BLEU")
    p.add_argument("--seeds", type=int, default=3, help="seeds per student at its chosen rate")
    p.add_argument("--beams", type=int, default=5, help="beam width: teacher generation config, labels, beam decodes")
    args = p.parse_args(argv)
    try:
        args.lrs = sorted({float(x) for x in args.lrs.split(",") if x.strip()})
    except ValueError:
        p.error(f"--lrs is a comma-separated list of numbers, got {args.lrs!r}")
    if not args.lrs or min(args.lrs) <= 0:
        p.error("--lrs needs at least one positive learning rate")
    if args.seeds < 1 or args.beams < 1:
        p.error("--seeds and --beams must be >= 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    t0 = time.perf_counter()

    import sacrebleu
    import torch
    from transformers import GenerationConfig

    from kd.students.seq2seq import load
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    train_pairs = max(64, round(10_000 * args.scale))
    teacher_pairs = max(64, round(29_000 * args.scale))
    val_rows, test_rows = max(32, round(1014 * args.scale)), max(32, round(1000 * args.scale))
    overrides: dict[str, Any] = {"multi30k": args.data, "teacher_pairs": teacher_pairs, "train_pairs": train_pairs,
                                 "test_rows": test_rows, "cpus": args.cpus, "num_beams": args.beams,
                                 "nbest": args.beams, "rows_per_shard": max(16, -(-train_pairs // 4))}
    if args.tiny:
        overrides.update(TINY)
    if args.epochs:
        overrides.update(teacher_epochs=args.epochs, student_epochs=args.epochs)
    raw = yaml.safe_load(MANIFEST.read_text(encoding="utf-8"))
    raw["vars"].update(overrides)
    raw["workdir"] = args.workdir or tempfile.mkdtemp(prefix="kdpipe-seqkd-")
    print(f"multi30k seq-KD benchmark: teacher on {teacher_pairs} pairs, students on {train_pairs}, "
          f"{val_rows} validation / {test_rows} test sentences, lr grid {args.lrs}, {args.seeds} seed(s), "
          f"beam {args.beams}, {'tiny' if args.tiny else 'documented'} models, workdir {raw['workdir']}")
    torch.set_num_threads(args.cpus)
    data = Path(args.data)
    stage_seconds: dict[str, float] = {}

    def run(runs: list[tuple[str, float, int]]) -> dict[str, Path]:
        manifest = parse_manifest(with_runs(raw, runs), source=f"{MANIFEST} (bench)")
        names = [run_name(*r) for r in runs]
        summary = run_graph(build_graph(manifest), only=names, progress=False, log=lambda *a: None)
        stage_seconds.update({s["name"]: s["seconds"] for s in summary})
        return {s["name"]: Path(s["path"]) for s in summary}

    def bleu_chrf(hyps: list[str], refs: list[str]) -> tuple[float, float]:
        return sacrebleu.corpus_bleu(hyps, [refs]).score, sacrebleu.corpus_chrf(hyps, [refs]).score

    # 1. the rule: seed 0 at every rate, validation BLEU (greedy), best rate per student
    val_src, val_ref = lines(data / "val.en", val_rows), lines(data / "val.de", val_rows)
    paths = run([(s, lr, 0) for s in STUDENTS for lr in args.lrs])
    val_bleu: dict[str, dict[float, float]] = {}
    for student in STUDENTS:
        val_bleu[student] = {}
        for lr in args.lrs:
            hyps, _ = decode(load(paths[run_name(student, lr, 0)] / "files" / "student"), val_src, num_beams=1)
            val_bleu[student][lr] = bleu_chrf(hyps, val_ref)[0]
    chosen = {student: select_lr(scores) for student, scores in val_bleu.items()}
    print("validation BLEU (greedy) per rate: " + "; ".join(
        f"{s} " + ", ".join(f"{lr:g}: {b:.2f}" for lr, b in v.items()) + f" -> {chosen[s]:g}"
        for s, v in val_bleu.items()))
    # 2. the other seeds at the chosen rate
    final = [(s, chosen[s], seed) for s in STUDENTS for seed in range(args.seeds)]
    paths.update(run([r for r in final if r[2] > 0]) if args.seeds > 1 else {})
    pipeline_s = time.perf_counter() - t0

    # 3. test: the teacher at the beam width of its own checkpoint, every student run greedy and beam
    src, refs = lines(data / "test_2016_flickr.en", test_rows), lines(data / "test_2016_flickr.de", test_rows)
    teacher_dir = paths["teacher"] / "files" / "model"
    teacher_beams = GenerationConfig.from_pretrained(str(teacher_dir)).num_beams or 1
    if teacher_beams != args.beams:
        raise SystemExit(f"the teacher checkpoint says num_beams {teacher_beams}, the run asked for {args.beams}")
    label_md = json.loads((paths["labels"] / "manifest.json").read_text()).get("summary", {}).get("label", {})
    if int(label_md.get("num_beams", args.beams)) != args.beams:
        raise SystemExit(f"the labels were decoded with num_beams {label_md['num_beams']}, the run asked for {args.beams}")
    teacher = load(teacher_dir)
    models: list[dict[str, Any]] = []
    hyps, teacher_speed = decode(teacher, src, num_beams=teacher_beams)
    models.append({"name": "teacher", "decode": f"beam {teacher_beams}", "parameters": teacher.num_parameters(),
                   "bleu": [bleu_chrf(hyps, refs)[0]], "chrf": [bleu_chrf(hyps, refs)[1]],
                   "sentences_per_s": [teacher_speed]})
    hyps, speed = decode(teacher, src, num_beams=1)
    models.append({"name": "teacher", "decode": "greedy", "parameters": teacher.num_parameters(),
                   "bleu": [bleu_chrf(hyps, refs)[0]], "chrf": [bleu_chrf(hyps, refs)[1]], "sentences_per_s": [speed]})
    reliance: dict[str, list[float]] = {}
    for student in STUDENTS:
        runs = [p for s, lr, seed in final if s == student for p in [paths[run_name(s, lr, seed)]]]
        reliance[student] = [json.loads((p / "files" / "metrics.json").read_text()).get("source_reliance")
                             for p in runs]
        for mode, nb in (("greedy", 1), (f"beam {args.beams}", args.beams)):
            row = {"name": student, "decode": mode, "lr": chosen[student], "bleu": [], "chrf": [], "sentences_per_s": []}
            for path in runs:
                model = load(path / "files" / "student")
                hyps, speed = decode(model, src, num_beams=nb)
                b, c = bleu_chrf(hyps, refs)
                row["bleu"].append(b)
                row["chrf"].append(c)
                row["sentences_per_s"].append(speed)
                row["parameters"] = model.num_parameters()
            models.append(row)
    for m in models:
        m["bleu_mean"], m["bleu_sd"] = mean_sd(m["bleu"])
        m["chrf_mean"], m["chrf_sd"] = mean_sd(m["chrf"])
        m["speedup_vs_teacher_beam"] = statistics.median(m["sentences_per_s"]) / teacher_speed

    print(f"\n{'model':22s} {'decode':8s} {'lr':>7s} {'params':>9s} {'BLEU (mean +- sd)':>18s} {'chrF':>6s} {'sent/s':>8s}")
    for m in models:
        print(f"{m['name']:22s} {m['decode']:8s} {m.get('lr', 0):7.0e} {m['parameters']:9d} "
              f"{m['bleu_mean']:9.2f} +- {m['bleu_sd']:5.2f} {m['chrf_mean']:6.2f} {statistics.median(m['sentences_per_s']):8.1f}")
    greedy = {m["name"]: m["bleu_mean"] for m in models if m["decode"] == "greedy"}
    goal_met = greedy["student_seqkd"] > greedy["student_reference"]
    print(f"\ngoal: Seq-KD student greedy BLEU {greedy['student_seqkd']:.2f} > reference student greedy "
          f"{greedy['student_reference']:.2f} (means over {args.seeds} seed(s)): {'met' if goal_met else 'NOT met'}")
    result = {"teacher_pairs": teacher_pairs, "train_pairs": train_pairs, "val_rows": val_rows, "test_rows": test_rows,
              "tiny": args.tiny, "cpus": args.cpus, "beams": args.beams, "teacher_checkpoint_num_beams": teacher_beams,
              "label_num_beams": int(label_md["num_beams"]) if "num_beams" in label_md else None, "lr_grid": args.lrs, "seeds": list(range(args.seeds)),
              "validation_bleu": {s: {f"{lr:g}": b for lr, b in v.items()} for s, v in val_bleu.items()},
              "chosen_lr": chosen, "overrides": overrides, "stage_seconds": stage_seconds,
              "source_reliance": reliance, "models": models, "goal_met": goal_met,
              "pipeline_seconds": round(pipeline_s, 1), "total_seconds": round(time.perf_counter() - t0, 1)}
    out = Path(raw["workdir"]) / "bench_multi30k_seqkd.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_json(args.json, {"bench": "multi30k_seqkd", "scale": args.scale, **result})
    print(f"results in {out}\nbenchmark ran {time.perf_counter() - t0:.0f} s "
          f"(pipeline {pipeline_s:.0f} s, decoding {time.perf_counter() - t0 - pipeline_s:.0f} s)")


if __name__ == "__main__":
    main()
