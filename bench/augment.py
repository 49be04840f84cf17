"""Benchmark: SST-2 transfer-set generation through kdpipe vs the same work without kdpipe.

Reports, from one run on the same sentences:
  * raw `nlp.pipe` tagging sentences/s (one process, the pos_tag stage's components and batch);
  * a bare chain: the same tagging, unigram counts and Tang augmentation in one process, no Ray,
    no Parquet (the fair baseline for the whole chain);
  * kdpipe end to end (read -> pos_tag -> unigram -> augment on Ray, fresh workdir, Ray start-up
    excluded and reported apart) with 1 and with N workers per map stage, and per stage: model
    (spaCy / augmentation) time, Parquet write time and the rest (actor start-up, hand-off);
  * ratios: pos_tag stage (1 worker) / raw nlp.pipe, whole chain (1 worker) / raw nlp.pipe
    (goal >= 0.8) and / the bare chain, and N workers / (N x one worker);
  * with --profile, each step of pos_tag and augment timed in-process (spaCy parse vs
    augmentation vs Arrow vs Parquet write, hash and marker).

--scale is a fraction of --data (1 = all 67,349 SST-2 train sentences, Tang defaults n_iter 20).

    .venv/bin/python bench/augment.py --scale 0.1 --json augment.json
"""
from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

from _env import SST2_TRAIN, add_bench_args, scaled, write_json

SST2_TRAIN_ROWS = 67_349


def load_rows(data: Path, scale: float):
    from stages.read import ReadStage

    full = ReadStage(config=ReadStage.Config(path=str(data), format="tsv", text_column="sentence",
                                             label_column="label")).build_table()
    n = scaled(full.num_rows, scale)
    return full.slice(0, n), n


def raw_tagging(texts: list[str], *, model: str, batch_size: int):
    """(seconds, tags) of nlp.pipe over `texts` in one process, after a warm-up batch."""
    import spacy

    from stages.pos_tag import EXCLUDE, resolve_spacy_model, tag_texts

    nlp = spacy.load(resolve_spacy_model(model), exclude=EXCLUDE)
    tag_texts(nlp, texts[:64], batch_size=batch_size)  # warm-up, as an actor's first batch would be
    start = time.perf_counter()
    tags = tag_texts(nlp, texts, batch_size=batch_size)
    return time.perf_counter() - start, tags


def bare_augment(ids: list[str], texts: list[str], tags, *, n_iter: int, seed: int) -> tuple[float, int]:
    """Unigram counts and Tang augmentation over already tagged rows, in this process, with the
    stage's own functions and default settings: (seconds, samples kept)."""
    import numpy as np

    from stages.augment import AugmentConfig, SampleRng, augment_example
    from stages.unigram import count_pairs

    cfg = AugmentConfig(n_iter=n_iter)
    words, pos, spaces = tags
    start = time.perf_counter()
    counts: Counter = Counter()
    count_pairs(counts, words, pos, lowercase=False)
    by_tag: dict[str, list[tuple[str, int]]] = {}
    for (tag, word), c in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1])):
        by_tag.setdefault(tag, []).append((word, c))
    table = {t: ([w for w, _ in wc], np.cumsum([c for _, c in wc], dtype=np.int64).tolist())
             for t, wc in by_tag.items()}
    rng = SampleRng()
    kept = 0
    for i, parent in enumerate(ids):
        kept += len(augment_example([(words[i], pos[i], spaces[i])], (texts[i],), parent, cfg, table,
                                    global_seed=seed, sample_rng=rng))
    return time.perf_counter() - start, kept


def kdpipe_run(workdir: Path, data: Path, n: int, *, workers: int, shards: int, model: str,
               batch_size: int, n_iter: int) -> dict:
    from pipeline.artifact import Artifact
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    par = {"concurrency": workers}
    manifest = parse_manifest({"name": "bench-augment", "workdir": str(workdir), "stages": [
        {"name": "read", "type": "read", "config": {
            "path": str(data), "format": "tsv", "text_column": "sentence", "label_column": "label",
            "limit": n, "rows_per_shard": max(1, math.ceil(n / shards))}},
        {"name": "pos_tag", "type": "pos_tag", "inputs": {"data": "read"},
         "config": {"spacy_model": model, "batch_size": batch_size, **par}},
        {"name": "unigram", "type": "unigram", "inputs": {"data": "pos_tag"}},
        {"name": "augment", "type": "augment", "inputs": {"data": "pos_tag", "table": "unigram"},
         "config": {"n_iter": n_iter, **par}},
    ]})
    start = time.perf_counter()
    summary = run_graph(build_graph(manifest), progress=False, log=lambda *a: None)
    seconds = time.perf_counter() - start
    stages, manifests = {}, {}
    for st in summary:
        manifests[st["name"]] = Artifact(st["path"]).manifest
        stages[st["name"]] = {"seconds": st["seconds"], **(manifests[st["name"]].get("timing") or {})}
    return {"seconds": seconds, "stages": stages, "augment": manifests["augment"]["summary"]}


def profile_in_process(tmp: Path, table, *, model: str, batch_size: int, shards: int, n_iter: int) -> dict:
    """pos_tag and augment on `table` through their own setup/process/write_shard in this process
    (no Ray), each step timed: spaCy parse vs Arrow columns vs write; augmentation vs the rest."""
    import stages.augment as augment_mod
    import stages.pos_tag as pos_tag_mod
    from _profile import Timers, breakdown, run_shards
    from pipeline.artifact import Artifact
    from pipeline.testing import make_artifact, make_context
    from stages.augment import AugmentStage
    from stages.pos_tag import PosTagStage
    from stages.unigram import UnigramStage

    data = make_artifact(tmp / "in", table, rows_per_shard=max(1, math.ceil(table.num_rows / shards)))
    out = {}
    tag_timers = Timers()
    stage = PosTagStage(config=PosTagStage.Config(spacy_model=model, batch_size=batch_size))
    start = time.perf_counter()
    run_shards(stage, make_context(tmp / "ctx", inputs={"data": [data]}), data, tmp / "tagged", tag_timers,
               extra=[(pos_tag_mod, "tag_texts", "spaCy parse (nlp.pipe)")])
    out["pos_tag"] = {"wall_seconds": time.perf_counter() - start,
                      "breakdown": breakdown(tag_timers.as_dict(), process_parts=["spaCy parse (nlp.pipe)"])}
    tagged = make_artifact(tmp / "tagged_art", Artifact(tmp / "tagged").read_table(),
                           rows_per_shard=max(1, math.ceil(table.num_rows / shards)))
    uni_ctx = make_context(tmp / "uni", inputs={"data": [tagged]})
    start = time.perf_counter()
    UnigramStage(config=UnigramStage.Config()).run(uni_ctx)
    out["unigram"] = {"wall_seconds": time.perf_counter() - start}
    table_art = make_artifact(tmp / "uni_art", files={"unigram.parquet": (uni_ctx.out_dir / "unigram.parquet").read_bytes()})
    aug_timers = Timers()
    stage = AugmentStage(config=AugmentStage.Config(n_iter=n_iter))
    start = time.perf_counter()
    run_shards(stage, make_context(tmp / "actx", inputs={"data": [tagged], "table": [table_art]}), tagged,
               tmp / "augmented", aug_timers, extra=[(augment_mod, "augment_example", "augmentation")])
    out["augment"] = {"wall_seconds": time.perf_counter() - start,
                      "breakdown": breakdown(aug_timers.as_dict(), process_parts=["augmentation"])}
    return out


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=SST2_TRAIN, help="SST-2 train.tsv (GLUE layout: sentence<TAB>label)")
    add_bench_args(ap, default_scale=0.1, full=f"all {SST2_TRAIN_ROWS:,} SST-2 train sentences",
                   full_rows=SST2_TRAIN_ROWS)
    ap.add_argument("--model", default="en_core_web_sm")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--shards", type=int, default=8, help="input shards (same for every worker count)")
    ap.add_argument("--workers", default="1,2", help="comma-separated worker counts to compare (1 first)")
    ap.add_argument("--n-iter", type=int, default=20, help="augmentation samples per sentence (Tang: 20)")
    ap.add_argument("--profile", action="store_true", help="also time each step of pos_tag and augment in-process")
    ap.add_argument("--rounds", type=int, default=1,
                    help="raw tagging, bare augmentation and each worker count in turn, this many times "
                         "(ABCABC..., medians reported): on a shared machine the arms then see the same load")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if not args.data.is_file():
        raise SystemExit(f"--data {args.data} not found; give the SST-2 train.tsv (GLUE layout)")
    workers = sorted({int(x) for x in args.workers.split(",")})
    t0 = time.perf_counter()
    table, n = load_rows(args.data, args.scale)
    texts = table.column("text").to_pylist()

    from pipeline.executor import init_ray

    tmp = Path(tempfile.mkdtemp(prefix="kdab", dir="/tmp"))
    profile = profile_in_process(tmp / "profile", table, model=args.model, batch_size=args.batch_size,
                                 shards=args.shards, n_iter=args.n_iter) if args.profile else None
    ray_start = time.perf_counter()
    init_ray(address=None, num_cpus=None, temp_dir=tmp / "ray")
    ray_s = time.perf_counter() - ray_start
    rounds = []
    try:
        for r in range(args.rounds):
            raw_s, tags = raw_tagging(texts, model=args.model, batch_size=args.batch_size)
            aug_s, kept = bare_augment(table.column("id").to_pylist(), texts, tags, n_iter=args.n_iter, seed=0)
            runs = {w: kdpipe_run(tmp / f"r{r}w{w}", args.data, n, workers=w, shards=args.shards,
                                  model=args.model, batch_size=args.batch_size, n_iter=args.n_iter)
                    for w in workers}
            rounds.append({"raw_tagging_seconds": raw_s, "bare_augment_seconds": aug_s, "bare_samples": kept,
                           "runs": {str(w): run for w, run in runs.items()}})
            write_json(args.json, {"bench": "augment", "partial": True, "rounds": rounds})
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(tmp, ignore_errors=True)
    median = sorted(rounds, key=lambda rd: rd["runs"][str(workers[0])]["seconds"])[(len(rounds) - 1) // 2]
    raw_s, aug_s, kept = median["raw_tagging_seconds"], median["bare_augment_seconds"], median["bare_samples"]
    runs = {int(w): run for w, run in median["runs"].items()}
    result = {"bench": "augment", "sentences": n, "scale": args.scale, "data": str(args.data), "cpus": os.cpu_count(),
              "seeds": {"manifest": 0, "augment": 0}, "settings": {"model": args.model, "batch_size": args.batch_size,
                                                                    "shards": args.shards, "n_iter": args.n_iter},
              "raw_tagging_seconds": raw_s, "bare_augment_seconds": aug_s, "bare_samples": kept,
              "ray_init_seconds": ray_s, "runs": {str(w): r for w, r in runs.items()}}
    result["ratios"] = ratios(result)
    per_round = [ratios({**rd, "runs": rd["runs"]}) for rd in rounds]
    result["rounds"] = {"count": len(rounds), "ratios": {k: [rr[k] for rr in per_round] for k in result["ratios"]},
                        "median_ratios": {k: statistics.median(rr[k] for rr in per_round) for k in result["ratios"]},
                        "raw_tagging_seconds": [rd["raw_tagging_seconds"] for rd in rounds],
                        "chain_seconds": {w: [rd["runs"][w]["seconds"] for rd in rounds] for w in rounds[0]["runs"]}}
    result["profile"] = profile
    result["bench_seconds"] = time.perf_counter() - t0
    print(report(result))
    write_json(args.json, result)
    return 0


def ratios(r: dict) -> dict:
    """Speed ratios (kdpipe rate / baseline rate) from a result's seconds."""
    raw, bare = r["raw_tagging_seconds"], r["raw_tagging_seconds"] + r["bare_augment_seconds"]
    runs = {int(w): run for w, run in r["runs"].items()}
    out = {}
    if 1 in runs:
        one = runs[1]
        out["pos_tag_1w_over_raw_pipe"] = raw / one["stages"]["pos_tag"]["seconds"]
        out["chain_1w_over_raw_pipe"] = raw / one["seconds"]
        out["chain_1w_over_bare_chain"] = bare / one["seconds"]
        for w, run in runs.items():
            if w > 1:
                out[f"chain_{w}w_over_1w"] = one["seconds"] / run["seconds"]
                out[f"chain_{w}w_over_{w}x1w"] = one["seconds"] / run["seconds"] / w
                out[f"pos_tag_{w}w_over_1w"] = one["stages"]["pos_tag"]["seconds"] / run["stages"]["pos_tag"]["seconds"]
    return out


def report(r: dict) -> str:
    n = r["sentences"]
    s = r["settings"]
    lines = [f"SST-2 sentences: {n} (scale {r['scale']}); CPUs: {r['cpus']}; spaCy model {s['model']}, "
             f"batch {s['batch_size']}; {s['shards']} shards; n_iter {s['n_iter']}",
             f"raw nlp.pipe tagging (1 process):      {n / r['raw_tagging_seconds']:8.1f} sentences/s "
             f"({r['raw_tagging_seconds']:.1f}s)",
             f"bare chain (tag + count + augment):    {n / (r['raw_tagging_seconds'] + r['bare_augment_seconds']):8.1f} "
             f"sentences/s (augmentation {r['bare_augment_seconds']:.1f}s, {r['bare_samples']} samples)",
             f"ray.init (excluded below):             {r['ray_init_seconds']:8.1f} s"]
    for w, run in r["runs"].items():
        parts = []
        for name, st in run["stages"].items():
            detail = ""
            if "compute_seconds" in st and int(w) == 1:
                setup = st.get("slowest_setup_seconds", 0.0)
                rest = st["seconds"] - st["compute_seconds"] - st["write_seconds"] - setup
                detail = (f" = actor setup {setup:.1f} + model {st['compute_seconds']:.1f} + write "
                          f"{st['write_seconds']:.1f} + start-up/hand-off {rest:.1f}")
            elif "compute_seconds" in st:  # the workers overlap: their sums do not add up to the wall time
                detail = (f" (summed over {st.get('actors', w)} workers: model {st['compute_seconds']:.1f}, "
                          f"write {st['write_seconds']:.1f})")
            parts.append(f"{name} {st['seconds']:.1f}s{detail}")
        lines.append(f"kdpipe end to end, {w} worker(s):       {n / run['seconds']:8.1f} sentences/s "
                     f"({run['seconds']:.1f}s: {'; '.join(parts)})")
    lines.append(f"(the round with the median 1-worker chain time; ratios below: median over "
                 f"{r['rounds']['count']} round(s), each round's arms side by side, and the spread)")
    for k, v in r["rounds"]["median_ratios"].items():
        spread = r["rounds"]["ratios"][k]
        lines.append(f"  {k:32s} {v:6.2f}   ({min(spread):.2f}-{max(spread):.2f})")
    lines.append("  goals: chain_1w_over_raw_pipe >= 0.8, chain_2w_over_1w >= 1.7")
    aug = next(iter(r["runs"].values()))["augment"]
    lines.append(f"transfer set: {aug['rows']} rows from {aug['input_rows']} ({aug['growth']}x), "
                 f"{aug['samples']} samples, op rates {aug['op_rates']}, empty inputs {aug['empty_inputs']}")
    for name, p in (r.get("profile") or {}).items():
        lines.append(f"in-process {name}: {p['wall_seconds']:.2f}s")
        for k, v in (p.get("breakdown") or {}).items():
            lines.append(f"    {k:48s} {v:8.3f}s {100 * v / max(p['wall_seconds'], 1e-9):5.1f}%")
    lines.append(f"benchmark ran {r['bench_seconds']:.1f}s")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
