"""Where the fair bare loop's time goes, by PyTorch op: why the teacher's useful tokens/s stay
below the matmul FLOP ceiling that `bench/label.py` measures.

The label stage runs at the fair loop's speed (BENCHMARKS.md), so what separates it from the
ceiling is inside the model's forward pass. This runs the fair loop (the same model, the label
stage's length-sorted token-budget batches) under `torch.profiler` and sums each op's own CPU
time into groups: matrix products (with the FLOPs the profiler counts for them), attention,
normalisation and activations, other element-wise work, and the rest. The matmul probe of
`bench/label.py` runs in the same process, so the matmuls' GFLOP/s can be read against it.
The profiler adds its own cost per op call; the unprofiled loop over the same rows is timed too.
It runs twice: with batches cut by the token budget alone, and with the label stage's padding cap
(kd/teachers.py: MAX_PADDING), so the padding the cap removes shows beside its effect.

    .venv/bin/python bench/label_ops.py --scale 0.03 --json label_ops.json
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

from _env import write_json
from kd.teachers import MAX_PADDING  # noqa: E402  (bench/_env puts the repo on sys.path)
from label import (add_teacher_args, as_classifier, check_teacher_args, fair_batches, flops_per_token, matmul_gflops,
                   read_sentences)

GROUPS = {
    "matrix products": ("aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm"),
    "attention (fused kernel, softmax)": ("aten::_scaled_dot_product_flash_attention_for_cpu",
                                          "aten::_scaled_dot_product_attention_math", "aten::_softmax"),
    "layer norm, GELU, tanh": ("aten::native_layer_norm", "aten::gelu", "aten::tanh"),
    "element-wise add, mul, copy": ("aten::add", "aten::add_", "aten::mul", "aten::div", "aten::copy_",
                                    "aten::clone", "aten::contiguous", "aten::where", "aten::masked_fill"),
}


def group_of(op: str) -> str:
    return next((g for g, ops in GROUPS.items() if op in ops), "the rest (embeddings, views, dispatch)")


def op_breakdown(sentences: list[str], model_dir: Path, *, threads: int, rows_per_shard: int = 1000,
                 token_budget: int = 8192, batch_size: int = 256, max_padding: float | None = MAX_PADDING) -> dict:
    """Self CPU seconds per op group over the fair loop, the matmuls' FLOPs, and the same loop's
    unprofiled wall time. max_padding=None: batches cut by the token budget alone."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    limit = min(model.config.max_position_embeddings, tok.model_max_length)
    batches = list(fair_batches(sentences, tok, rows_per_shard, token_budget, batch_size, limit, max_padding))
    tokens = sum(n for n, _ in batches)
    padded = sum(int(b["input_ids"].numel()) for _, b in batches)
    with torch.inference_mode():
        model(**batches[0][1])  # warm-up, outside both timings
        start = time.perf_counter()
        for _, b in batches:
            model(**b).logits.numpy()
        plain = time.perf_counter() - start
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            start = time.perf_counter()
            for _, b in batches:
                model(**b).logits.numpy()
            profiled = time.perf_counter() - start
    groups: dict[str, dict] = {}
    for e in prof.key_averages():
        g = groups.setdefault(group_of(e.key), {"seconds": 0.0, "calls": 0, "flops": 0, "ops": {}})
        seconds = e.self_cpu_time_total / 1e6
        g["seconds"] += seconds
        g["calls"] += e.count
        g["flops"] += int(e.flops or 0)
        if seconds > 0:
            g["ops"][e.key] = round(seconds, 4)
    for g in groups.values():
        g["ops"] = dict(sorted(g["ops"].items(), key=lambda kv: -kv[1])[:4])
    return {"rows": len(sentences), "batches": len(batches), "useful_tokens": tokens, "padded_tokens": padded,
            "plain_seconds": plain, "profiled_seconds": profiled,
            "op_seconds": sum(g["seconds"] for g in groups.values()), "groups": groups}


def report(r: dict) -> str:
    b, probe = r["breakdown"], r["matmul_probe_gflops"]
    ops = b["op_seconds"]
    mm = b["groups"].get("matrix products", {"seconds": 0.0, "flops": 0})
    lines = [f"label ops: {b['rows']} sentences, {b['batches']} batches, {b['useful_tokens']} useful tokens "
             f"({b['padded_tokens']} with padding); {r['threads']} threads; load average {r['loadavg'][0]} -> "
             f"{r['loadavg'][1]}",
             f"  fair loop, unprofiled {b['plain_seconds']:.2f}s = {b['useful_tokens'] / b['plain_seconds']:.0f} "
             f"useful tokens/s = {r['fair_tokens_over_ceiling']:.2f} of the ceiling ({probe:.1f} GFLOP/s probe, "
             f"{r['flops_per_token'] / 1e6:.1f} MFLOP/token); profiled {b['profiled_seconds']:.2f}s, "
             f"ops' own time {ops:.2f}s",
             f"  {'group':40s} {'seconds':>8s} {'share':>6s} {'calls':>7s}  top ops"]
    for name, g in sorted(b["groups"].items(), key=lambda kv: -kv[1]["seconds"]):
        top = ", ".join(f"{k.removeprefix('aten::')} {v:.2f}s" for k, v in g["ops"].items())
        lines.append(f"  {name:40s} {g['seconds']:8.2f} {100 * g['seconds'] / ops:5.1f}% {g['calls']:7d}  {top}")
    if mm["seconds"]:
        rate = mm["flops"] / mm["seconds"] / 1e9
        lines.append(f"  matrix products: {mm['flops'] / 1e9:.1f} GFLOP at {rate:.1f} GFLOP/s = {rate / probe:.2f} of "
                     f"the probe; all other ops take {100 * (1 - mm['seconds'] / ops):.0f}% of the ops' time")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_teacher_args(p, default_scale=0.03)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    check_teacher_args(args)
    sentences = read_sentences(args.data, args.scale)
    load = round(os.getloadavg()[0], 1)
    with tempfile.TemporaryDirectory(prefix="kdops") as tmp:
        model = as_classifier(args.model, Path(tmp) / "teacher")
        probe = matmul_gflops(int(args.num_cpus))
        runs = {name: op_breakdown(sentences, model, threads=int(args.num_cpus), rows_per_shard=args.rows_per_shard,
                                   token_budget=args.token_budget, batch_size=args.label_batch_size, max_padding=cap)
                for name, cap in (("budget only", None), (f"padding cap {MAX_PADDING:g} (default)", MAX_PADDING))}
        per_token = flops_per_token(model, next(iter(runs.values()))["useful_tokens"] / len(sentences))
    ceiling = probe * 1e9 / per_token
    results = {name: {"bench": "label_ops", "batching": name, "sentences": len(sentences), "scale": args.scale,
                      "data": str(args.data), "model": str(args.model), "threads": int(args.num_cpus),
                      "matmul_probe_gflops": probe, "flops_per_token": per_token, "breakdown": b,
                      "fair_tokens_over_ceiling": b["useful_tokens"] / b["plain_seconds"] / ceiling,
                      "loadavg": [load, round(os.getloadavg()[0], 1)]} for name, b in runs.items()}
    print("\n".join(f"[batches: {name}] " + report(r) for name, r in results.items()))
    write_json(args.json, {"bench": "label_ops", "runs": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
