"""Benchmark: sequence-level KD on Multi30k EN->DE, one run, through the real manifest.

Runs manifests/multi30k-seqkd.yaml on Ray (read -> seq2seq teacher -> beam labels -> four
students sharing the teacher's vocabulary: references, Seq-KD, Seq-Inter, Word-KD), then decodes
test_2016_flickr in this process with every model, same batches and thread count:
  * BLEU / chrF (sacrebleu) of the teacher (beam) and of each student (greedy and beam)
  * parameters, decode sentences/s, and the speed-up of student-greedy over teacher-beam
Goal (issue 7): the Seq-KD student (greedy) beats the reference-trained student (greedy).

Documented scale (--scale 1, the manifest's defaults), about 45 min on 2 CPU cores: teacher (BART layout)
d_model 256 / ff 1024 / 3+3 layers (6.6M params) trained 6 epochs on all 29,000 pairs with a
joint 4k sentencepiece; it labels a random 10,000-pair subset (beam 5, 5-best, top-8), on which
the students, d_model 128 / ff 512 / 2+2 layers (1.5M params), train 6 epochs; all 1,000 test
sentences. --scale s in (0, 1] multiplies the pair counts and test sentences (epochs stay);
--tiny swaps in test-sized models to prove the script works in a minute or two.

    .venv/bin/python bench/multi30k_seqkd.py                 # the documented hour
    .venv/bin/python bench/multi30k_seqkd.py --scale 0.01 --tiny
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

from _env import REPO, add_bench_args, write_json

MANIFEST = REPO / "manifests" / "multi30k-seqkd.yaml"
STUDENTS = ["student_reference", "student_seqkd", "student_seqinter", "student_wordkd"]
TINY = {"vocab_size": 500, "teacher_d_model": 64, "teacher_d_ff": 128, "teacher_layers": 2,
        "student_d_model": 32, "student_d_ff": 64, "student_layers": 1, "batch_size": 16, "max_tokens": 32}


def decode(model, texts: list[str], *, num_beams: int, batch_size: int = 64) -> tuple[list[str], float]:
    """Translations and sentences/s (after one warm-up batch)."""
    model.predict(texts[:batch_size], num_beams=num_beams, batch_size=batch_size)
    start = time.perf_counter()
    out = model.predict(texts, num_beams=num_beams, batch_size=batch_size)
    return out, len(texts) / max(time.perf_counter() - start, 1e-9)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_bench_args(p, default_scale=1.0, full="teacher on 29,000 pairs, students on 10,000, 1,000 test "
                   "sentences, about 45 min", full_rows=10_000)
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data" / "multi30k"))
    p.add_argument("--tiny", action="store_true", help="test-sized models (a smoke run, not a result)")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 1)
    p.add_argument("--workdir", default=None, help="artifact store (default: a fresh temp dir); reuse to resume")
    p.add_argument("--epochs", type=float, default=None, help="override teacher and student epochs")
    args = p.parse_args()
    t0 = time.perf_counter()

    import sacrebleu
    import torch

    from pipeline.graph import build_graph
    from pipeline.manifest import load_manifest
    from pipeline.runner import run_graph
    from kd.students.seq2seq import load

    train_pairs = max(64, round(10_000 * args.scale))
    teacher_pairs = max(64, round(29_000 * args.scale))
    test_rows = max(32, round(1000 * args.scale))
    overrides = {"multi30k": args.data, "teacher_pairs": teacher_pairs, "train_pairs": train_pairs,
                 "test_rows": test_rows, "cpus": args.cpus, "rows_per_shard": max(16, -(-train_pairs // 4))}
    if args.tiny:
        overrides.update(TINY)
    if args.epochs:
        overrides.update(teacher_epochs=args.epochs, student_epochs=args.epochs)
    manifest = load_manifest(MANIFEST, overrides={k: str(v) for k, v in overrides.items()})
    manifest.workdir = args.workdir or tempfile.mkdtemp(prefix="kdpipe-seqkd-")
    print(f"multi30k seq-KD benchmark: teacher on {teacher_pairs} pairs, students on {train_pairs}, "
          f"{test_rows} test sentences, "
          f"{'tiny' if args.tiny else 'documented'} models, {args.cpus} CPUs, workdir {manifest.workdir}")
    summary = run_graph(build_graph(manifest), only=STUDENTS, progress=False, log=lambda *a: None)
    stage_seconds = {s["name"]: s["seconds"] for s in summary}
    paths = {s["name"]: Path(s["path"]) for s in summary}
    pipeline_s = time.perf_counter() - t0

    torch.set_num_threads(args.cpus)
    data = Path(args.data)
    src = (data / "test_2016_flickr.en").read_text(encoding="utf-8").splitlines()[:test_rows]
    refs = (data / "test_2016_flickr.de").read_text(encoding="utf-8").splitlines()[:test_rows]
    beams = int(manifest.vars["num_beams"])

    def score(hyps: list[str]) -> tuple[float, float]:
        return sacrebleu.corpus_bleu(hyps, [refs]).score, sacrebleu.corpus_chrf(hyps, [refs]).score

    rows = []
    teacher = load(paths["teacher"] / "files" / "model")
    hyps, teacher_speed = decode(teacher, src, num_beams=beams)
    rows.append(("teacher", "beam", teacher.num_parameters(), *score(hyps), teacher_speed))
    hyps, speed = decode(teacher, src, num_beams=1)
    rows.append(("teacher", "greedy", teacher.num_parameters(), *score(hyps), speed))
    for name in STUDENTS:
        student = load(paths[name] / "files" / "student")
        for mode, nb in (("greedy", 1), ("beam", beams)):
            hyps, speed = decode(student, src, num_beams=nb)
            rows.append((name, mode, student.num_parameters(), *score(hyps), speed))

    print(f"\n{'model':18s} {'decode':7s} {'params':>9s} {'BLEU':>6s} {'chrF':>6s} {'sent/s':>8s} "
          f"{'vs teacher-beam':>15s}   train s")
    for name, mode, params, bleu, chrf, speed in rows:
        print(f"{name:18s} {mode:7s} {params:9d} {bleu:6.2f} {chrf:6.2f} {speed:8.1f} "
              f"{speed / teacher_speed:14.2f}x   {stage_seconds.get(name, 0):7.0f}")
    bleu = {(n, m): b for n, m, _, b, _, _ in rows}
    ref_g, kd_g = bleu[("student_reference", "greedy")], bleu[("student_seqkd", "greedy")]
    verdict = "met" if kd_g > ref_g else "NOT met"
    print(f"\ngoal: Seq-KD student greedy BLEU {kd_g:.2f} > reference student greedy {ref_g:.2f}: {verdict}")
    reliance = {n: json.loads((paths[n] / "files" / "metrics.json").read_text()).get("source_reliance")
                for n in STUDENTS}
    print("source reliance (CE with another row's source minus CE with its own; ~0 = ignores the source): "
          + ", ".join(f"{n} {r}" for n, r in reliance.items()))
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in stage_seconds.items()))
    result = {"teacher_pairs": teacher_pairs, "train_pairs": train_pairs, "test_rows": test_rows,
              "tiny": args.tiny, "cpus": args.cpus,
              "overrides": overrides, "stage_seconds": stage_seconds, "source_reliance": reliance,
              "models": [dict(zip(("name", "decode", "parameters", "bleu", "chrf", "sentences_per_s"), r))
                         for r in rows], "goal_met": kd_g > ref_g,
              "pipeline_seconds": round(pipeline_s, 1), "total_seconds": round(time.perf_counter() - t0, 1)}
    out = Path(manifest.workdir) / "bench_multi30k_seqkd.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    write_json(args.json, {"bench": "multi30k_seqkd", "scale": args.scale,
                           "seeds": {"manifest": manifest.seed}, **result})
    print(f"results in {out}\nbenchmark ran {time.perf_counter() - t0:.0f} s "
          f"(pipeline {pipeline_s:.0f} s, decoding {time.perf_counter() - t0 - pipeline_s:.0f} s)")


if __name__ == "__main__":
    main()
