"""Benchmark: distil a causal LM teacher into a student 1/8 its size from sparse token targets.

A GPT-2-style teacher with its own sentencepiece vocabulary is trained on real English
(Multi30k train.en + SST-2 train sentences); it labels a Multi30k transfer set in each storage
mode; students train from those labels (3 seeds each) and are scored by held-out perplexity on
Multi30k val.en. Rows of the table:
  * ce            cross-entropy on the text only (alpha 0)
  * full          full-distribution KD, teacher run online (the upper bound; bench only)
  * topk-8/64     lm_label mode topk, k 8 / 64 (tail bucket)
  * sampled-12/86 lm_label mode sampled, 12 / 86 draws (nominal bytes of topk 8 / 64)
  * seqkd         Seq-KD: cross-entropy on lm_generate's sampled completions of the transfer
                  set's first 2 tokens (one per document), not in the default --rows
with on-disk bytes/token of the distribution columns (Parquet, zstd), nominal bytes/token and
KL(full teacher || rebuilt), as lm_label's summary reports them.

The stages run in this process through their own classes (no Ray): the same code the manifest
runs (manifests/lm-distill.yaml), plus the online full-KD student the manifest cannot express.

--scale S in (0, 1]: fraction of the corpora (teacher: S x 96,349 documents; transfer set:
S x 29,000; held-out: all 1,014 val.en sentences). Models and epochs stay fixed unless given.
Seeds can run in parallel processes sharing one workdir (the first makes teacher and labels):

    .venv/bin/python bench/lm_distill.py --scale 0.1
    for s in 0 1 2; do .venv/bin/python bench/lm_distill.py --scale 0.1 --workdir W --only-seed $s \
        --json r$s.json & done   # start seeds 1 and 2 once seed 0 has printed its labels
    .venv/bin/python bench/lm_distill.py --merge r0.json r1.json r2.json
    .venv/bin/python bench/lm_distill.py --scale 0.01 --tiny      # a smoke run, not a result
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

from _env import REPO, scale_fraction

TEACHER = {"d_model": 128, "layers": 4, "heads": 4, "dropout": 0.1, "max_positions": 64}
STUDENT = {"d_model": 32, "layers": 2, "heads": 2, "dropout": 0.1, "max_positions": 64}
TINY_T = {"d_model": 32, "layers": 1, "heads": 2, "dropout": 0.0, "max_positions": 64}
TINY_S = {"d_model": 16, "layers": 1, "heads": 2, "dropout": 0.0, "max_positions": 64}
CODECS = {"topk-8": {"mode": "topk", "k": 8}, "topk-64": {"mode": "topk", "k": 64},
          "sampled-12": {"mode": "sampled", "k": 12}, "sampled-86": {"mode": "sampled", "k": 86}}


def _docs(lines: list[str], prefix: str):
    import pyarrow as pa

    lines = [s.strip() for s in lines if s.strip()]
    return pa.table({"id": [f"{prefix}{i:06d}" for i in range(len(lines))], "text": lines})


def _read(data: Path, scale: float):
    m30k = (data / "multi30k" / "train.en").read_text(encoding="utf-8").splitlines()
    sst = [line.rsplit("\t", 1)[0] for line in
           (data / "sst2" / "train.tsv").read_text(encoding="utf-8").splitlines()[1:]]
    val = (data / "multi30k" / "val.en").read_text(encoding="utf-8").splitlines()
    n_m, n_s = max(64, round(len(m30k) * scale)), max(64, round(len(sst) * scale))
    # The transfer set is the teacher's own Multi30k share: distillation on in-domain text it saw.
    return _docs(m30k[:n_m], "m"), _docs(sst[:n_s], "s"), _docs(val, "v")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scale", type=scale_fraction, default=0.1,
                   help="fraction in (0, 1] of the full-size run (the corpora, see above); default 0.1")
    p.add_argument("--data", default=str(REPO.parent / "shared" / "data"))
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--teacher-epochs", type=float, default=3.0)
    p.add_argument("--student-epochs", type=float, default=3.0)
    p.add_argument("--vocab", type=int, default=4000, help="teacher sentencepiece vocabulary")
    p.add_argument("--teacher-dims", default=None, help="d_model,layers,heads of the teacher (default 128,4,4)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rows", default="ce,full," + ",".join(CODECS), help="which students to train")
    p.add_argument("--tiny", action="store_true", help="test-sized models (a smoke run, not a result)")
    p.add_argument("--workdir", default=None)
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--only-seed", type=int, default=None, help="train the students of this seed only (runs "
                   "in parallel processes share the workdir's teacher and labels; --merge prints the table)")
    p.add_argument("--merge", nargs="+", default=None, help="print the table of these --json files")
    args = p.parse_args()
    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        merged = {**parts[0], "runs": {}}
        for part in parts:
            for name, values in part["runs"].items():
                merged["runs"].setdefault(name, []).extend(values)
        print_table(merged)
        return
    if not 0 < args.scale <= 1:
        p.error("--scale must be in (0, 1]")
    import torch

    from transformers import AutoModelForCausalLM

    from kd.lm.codecs import CodecSpec
    from kd.lm.settings import LmDims
    from kd.lm.text import load_tokenizer
    from pipeline.stage import StageContext
    from pipeline.testing import make_artifact, make_context
    from stages.lm_label import LmLabelStage
    from stages.lm_teacher import LmTeacherStage
    from stages.train_lm import TrainLmStage

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kdpipe-lm-"))
    m30k, sst, val = _read(Path(args.data), args.scale)
    from pipeline.artifact import Artifact

    arts = {name: Artifact(work / name) if Artifact(work / name).is_complete() else make_artifact(work / name, t)
            for name, t in (("m30k", m30k), ("sst2", sst), ("val", val))}
    teacher_dims, student_dims = (TINY_T, TINY_S) if args.tiny else (TEACHER, STUDENT)
    if args.teacher_dims:
        d, layers, heads = (int(x) for x in args.teacher_dims.split(","))
        teacher_dims = {**teacher_dims, "d_model": d, "layers": layers, "heads": heads}
    print(f"lm distill: teacher on {m30k.num_rows} Multi30k + {sst.num_rows} SST-2 documents, transfer set "
          f"{m30k.num_rows}, held-out {val.num_rows} (val.en); workdir {work}", flush=True)

    teacher_ctx = make_context(work, inputs={"data": [arts["m30k"], arts["sst2"]], "heldout": [arts["val"]]},
                               name="teacher", num_cpus=args.threads)
    teacher_cfg = {"vocab_size": 500 if args.tiny else args.vocab, "max_length": 64, "model": teacher_dims,
                   "train": {"epochs": args.teacher_epochs, "batch_size": 32, "lr": 2e-3, "warmup_steps": 100}}
    teacher_dir = teacher_ctx.out_dir / "model"
    if (teacher_ctx.out_dir / "metrics.json").is_file():  # made by an earlier run in this workdir
        teacher_stats = json.loads((teacher_ctx.out_dir / "metrics.json").read_text())
    else:
        teacher_stats = LmTeacherStage(config=LmTeacherStage.Config(**teacher_cfg)).run(teacher_ctx)
    print(f"teacher: {teacher_stats['parameters']:,} params, held-out perplexity "
          f"{teacher_stats['heldout']['perplexity']:.2f} ({time.perf_counter() - t0:.0f}s)", flush=True)

    labels, codec_rows = {}, {}
    for name, codec in CODECS.items():
        stage = LmLabelStage(config=LmLabelStage.Config(teacher=str(teacher_dir), max_length=64, **codec))
        art = Artifact(work / f"labels-{name}")
        if not art.is_complete():
            ctx = make_context(work, name=f"label-{name}", seed=0, num_cpus=args.threads)
            stage.setup(ctx)
            table = stage.process(m30k, ctx, shard_index=0)
            art = make_artifact(work / f"labels-{name}", table, rows_per_shard=max(64, table.num_rows // 4),
                                metadata={f"kdpipe.{k}": v for k, v in stage.metadata().items()})
        summary = stage.summarize([], StageContext(stage_name=name, out_dir=art.path / "files",
                                                   scratch_dir=art.path / "scratch", inputs={}))["lm"]
        spec = CodecSpec(mode=codec["mode"], k=codec["k"], vocab_size=int(art.file_metadata()["kdpipe.vocab_size"]))
        summary["nominal_bytes_per_token"] = spec.payload_bytes()
        labels[name], codec_rows[name] = art, summary
        print(f"labels {name}: {summary}", flush=True)
    if "seqkd" in args.rows.split(","):
        labels["seqkd"] = _generated(work, teacher_dir, m30k, args.threads)
    teacher_model = AutoModelForCausalLM.from_pretrained(str(teacher_dir)).eval()
    tok = load_tokenizer(teacher_dir)

    schedule = {"epochs": args.student_epochs, "batch_size": 32, "lr": 2e-3, "warmup_steps": 50}
    runs: dict[str, list[float]] = {}
    student_params = None
    for seed in ([args.only_seed] if args.only_seed is not None else range(args.seeds)):
        for name in args.rows.split(","):
            t_run = time.perf_counter()
            source = labels["topk-8" if name in ("ce", "full") else name]
            ctx = make_context(work, inputs={"data": [source], "heldout": [arts["val"]]}, name=f"s-{name}-{seed}",
                               seed=seed, num_cpus=args.threads)
            if name == "full":
                ppl, student_params = _online_full_kd(source, teacher_model, tok, LmDims(**student_dims), schedule,
                                                      seed, ctx.scratch_dir, val.column("text").to_pylist())
            else:
                kd = {"alpha": 0.0 if name in ("ce", "seqkd") else 0.5, "temperature": 1.0}
                stage = TrainLmStage(config=TrainLmStage.Config(tokenizer=str(teacher_dir), student=student_dims,
                                                                train=schedule, kd=kd, eval_max_length=64))
                out = stage.run(ctx)
                ppl, student_params = out["heldout"]["perplexity"], out["parameters"]
            runs.setdefault(name, []).append(ppl)
            print(f"seed {seed} {name}: perplexity {ppl:.3f} ({time.perf_counter() - t_run:.0f}s)", flush=True)

    results = {"teacher": teacher_stats, "student_parameters": student_params, "codecs": codec_rows, "runs": runs,
               "seconds": round(time.perf_counter() - t0)}
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str))
    print_table(results)


def print_table(results: dict) -> None:
    runs, codec_rows, teacher = results["runs"], results["codecs"], results["teacher"]
    ce, full = (statistics.mean(runs[r]) if r in runs else float("nan") for r in ("ce", "full"))
    print(f"\nteacher {teacher['parameters']:,} params (held-out perplexity {teacher['heldout']['perplexity']:.2f}); "
          f"students {results['student_parameters']:,} params; seeds per row: "
          f"{', '.join(f'{k} {len(v)}' for k, v in runs.items())}")
    print("| targets | bytes/token (Parquet) | nominal bytes/token | KL(full‖rebuilt) nats | held-out perplexity "
          "(mean ± sd) | share of the full-KD gain |")
    print("|---|---|---|---|---|---|")
    for name, values in runs.items():
        mean, sd = statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0
        share = (ce - mean) / (ce - full) if ce != full else float("nan")
        c = codec_rows.get(name)
        b, nb, kl = ((f"{c['bytes_per_token']:.1f}", f"{c['nominal_bytes_per_token']:.0f}",
                      f"{c['kl_full_to_rebuilt']:.3f}") if c else ("-", "-", "-"))
        print(f"| {name} | {b} | {nb} | {kl} | {mean:.3f} ± {sd:.3f} | {share:.0%} |")


def _generated(work: Path, teacher_dir: Path, docs, threads: int):
    """lm_generate's sampled completions of each transfer document's first 2 tokens (seed 0)."""
    from pipeline.artifact import Artifact
    from pipeline.testing import make_artifact, make_context
    from stages.lm_generate import LmGenerateStage

    art = Artifact(work / "generated")
    if art.is_complete():
        return art
    stage = LmGenerateStage(config=LmGenerateStage.Config(teacher=str(teacher_dir), prompt_tokens=2,
                                                          max_new_tokens=40, max_length=64))
    ctx = make_context(work, name="generate", seed=0, num_cpus=threads)
    stage.setup(ctx)
    t0 = time.perf_counter()
    table = stage.process(docs, ctx, shard_index=0)
    print(f"generated {table.num_rows} completions ({time.perf_counter() - t0:.0f}s)", flush=True)
    return make_artifact(work / "generated", table, rows_per_shard=max(64, table.num_rows // 4),
                         metadata={f"kdpipe.{k}": v for k, v in stage.metadata().items()})


def _online_full_kd(source, teacher, tok, dims, schedule: dict, seed: int, scratch: Path, val_texts: list[str]):
    """The upper bound: the same initial weights and batches as the stored-target students
    (TrainLmStage's seeds), KL to the teacher's full distribution computed online."""
    from kd.lm.data import ShardBatches, epoch_plan, steps_per_epoch
    from kd.lm.settings import build_gpt2
    from kd.lm.training import fit, perplexity, student_loss

    rows = [s["rows"] for s in sorted(source.manifest["shards"], key=lambda s: s["index"])]
    reader = ShardBatches(source.shard_paths(), mode="topk", k=8)
    per_epoch = steps_per_epoch(rows, schedule["batch_size"])
    model = build_gpt2(len(tok), dims, seed=seed)
    fit(model, batch_at=lambda e, o: reader.batch(*epoch_plan(rows, schedule["batch_size"], seed=seed, epoch=e)[o]),
        steps_per_epoch=per_epoch, total_steps=max(1, round(schedule["epochs"] * per_epoch)),
        loss_fn=student_loss(vocab_size=len(tok), alpha=0.5, temperature=1.0, teacher=teacher),
        lr=schedule["lr"], warmup_steps=schedule["warmup_steps"], scratch=scratch, seed=seed, checkpoint_every=10**9)
    return perplexity(model, tok, val_texts, max_length=64)["perplexity"], sum(p.numel() for p in model.parameters())


if __name__ == "__main__":
    main()
