"""Memory of the stages that load whole tables, per input row (docs/resources.md).

Each stage's own loading code runs in a fresh process on synthetic artifacts of N and N/4 rows;
the figure is the growth of peak RSS from after the imports to the end of the load (Linux: the
peak, VmHWM, is reset through /proc/self/clear_refs once the imports are done, so their own
transient peak does not hide a smaller load), and the slope per row between the two sizes. Model weights, optimizer state and
activations come on top (docs/resources.md gives those from the configs).

    finetune        load_examples + teacher_logits (SST-2-like rows: ~100-char text, 2 logits)
    train_seq2seq   _read_sources + join_labels for target seqkd_wordkd (4 hypotheses of 20
                    tokens, top-8 ids/log-probs per token), before tokenisation
    evaluate        EvaluateStage.run with no model: the data table and its texts
    agreement       AgreementStage.run with no model: data, labels and their argmax

--scale 1 = 200,000 rows (the large size; the small one is a quarter of it).
"""
from __future__ import annotations

import _env  # noqa: F401  (first: this checkout on sys.path, offline)

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

FULL_ROWS = 200_000
WORDS = ("a warm funny film the cast is terrific dull lifeless mess plot makes no sense painfully boring "
         "start finish worst acting seen waste good cast wanted money back smart beautifully made").split()
STAGES = ("finetune", "train_seq2seq", "evaluate", "agreement")


def _text(i: int, n_words: int) -> str:
    return " ".join(WORDS[(i * 7 + j * 13) % len(WORDS)] for j in range(n_words)) + f" {i}"


def make_inputs(root: Path, rows: int) -> None:
    """The artifacts every probe reads, as kdpipe writes them (shards of 10,000 rows)."""
    import numpy as np
    import pyarrow as pa

    from pipeline.testing import make_artifact

    ids = [f"r{i:07d}" for i in range(rows)]
    md = {"kdpipe.label_names": json.dumps(["negative", "positive"])}
    rng = np.random.default_rng(0)
    make_artifact(root / "data", pa.table({"id": ids, "text": [_text(i, 18) for i in range(rows)],
                                           "label": pa.array(rng.integers(0, 2, rows), pa.int64())}),
                  rows_per_shard=10_000, metadata=md)
    logits = pa.FixedSizeListArray.from_arrays(pa.array(rng.normal(size=2 * rows).astype("float32")), 2)
    make_artifact(root / "labels", pa.table({"id": ids, "logits": logits}), rows_per_shard=10_000, metadata=md)
    tokens, k, hyps = 20, 8, 4
    hyp_ids = pa.array([[list(range(i % 50, i % 50 + tokens))] * hyps for i in range(rows)],
                       pa.list_(pa.list_(pa.int32())))
    top_ids = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (rows + 1) * tokens, tokens, dtype=np.int32)),
        pa.FixedSizeListArray.from_arrays(pa.array(rng.integers(0, 8000, rows * tokens * k, dtype=np.int32)), k))
    top_lp = pa.ListArray.from_arrays(
        pa.array(np.arange(0, (rows + 1) * tokens, tokens, dtype=np.int32)),
        pa.FixedSizeListArray.from_arrays(pa.array(-rng.random(rows * tokens * k).astype("float16")), k))
    make_artifact(root / "s2s_labels", pa.table({"id": ids, "hyp_text": [[_text(i, 12)] * hyps for i in range(rows)],
                                                 "hyp_ids": hyp_ids, "topk_ids": top_ids, "topk_logprobs": top_lp}),
                  rows_per_shard=10_000)


def _status_bytes(field: str) -> int:
    """VmRSS / VmHWM of this process from /proc/self/status, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status (this bench needs Linux)")


def probe(stage: str, root: Path) -> dict:
    """In this (fresh) process: peak RSS growth of one stage's loading code, in bytes."""
    from pipeline.artifact import Artifact
    from pipeline.testing import make_context
    from stages.agreement import AgreementConfig, AgreementStage
    from stages.evaluate import EvaluateConfig, EvaluateStage
    from stages.finetune import FinetuneConfig, load_examples, teacher_logits
    from stages.train_seq2seq import _read_sources, join_labels

    data, labels, s2s = Artifact(root / "data"), Artifact(root / "labels"), Artifact(root / "s2s_labels")
    Path("/proc/self/clear_refs").write_text("5")  # peak := current, so the imports' peak is not counted
    before = _status_bytes("VmRSS")
    keep = None
    if stage == "finetune":
        train = load_examples(data, FinetuneConfig(), ["negative", "positive"])
        keep = (train, teacher_logits(labels, train["ids"], ["negative", "positive"]))
    elif stage == "train_seq2seq":
        ctx = make_context(root / "ctx", inputs={"data": [data]})
        keep = join_labels(_read_sources(ctx, "text"), s2s, ["hyp_text", "hyp_ids", "topk_ids", "topk_logprobs"])
    elif stage == "evaluate":
        ctx = make_context(root / "ctx", inputs={"data": [data], "models": []})
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        EvaluateStage(config=EvaluateConfig()).run(ctx)
    else:
        ctx = make_context(root / "ctx", inputs={"data": [data], "labels": [labels], "models": []})
        AgreementStage(config=AgreementConfig()).run(ctx)
    after = _status_bytes("VmHWM")
    del keep
    return {"peak_growth_bytes": after - before}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    _env.add_bench_args(parser, default_scale=0.25, full=f"{FULL_ROWS:,} rows", full_rows=FULL_ROWS)
    parser.add_argument("--probe", nargs=2, metavar=("STAGE", "DIR"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.probe:
        print(json.dumps(probe(args.probe[0], Path(args.probe[1]))))
        return 0
    large = _env.scaled(FULL_ROWS, args.scale, minimum=400)
    sizes = (large // 4, large)
    results: dict[str, dict] = {s: {} for s in STAGES}
    with tempfile.TemporaryDirectory() as tmp:
        for rows in sizes:
            root = Path(tmp) / str(rows)
            make_inputs(root, rows)
            for stage in STAGES:
                out = subprocess.run([sys.executable, __file__, "--probe", stage, str(root)], check=True,
                                     capture_output=True, text=True)
                results[stage][rows] = json.loads(out.stdout.strip().splitlines()[-1])["peak_growth_bytes"]
    print(f"{'stage':<15} " + " ".join(f"{f'MB at {n:,} rows':>18}" for n in sizes) + f" {'bytes/row (slope)':>18}")
    figures = {}
    for stage, by_rows in results.items():
        slope = (by_rows[sizes[1]] - by_rows[sizes[0]]) / (sizes[1] - sizes[0])
        figures[stage] = {"rows": list(sizes), "peak_growth_bytes": [by_rows[n] for n in sizes],
                          "bytes_per_row": round(slope)}
        print(f"{stage:<15} " + " ".join(f"{by_rows[n] / 1e6:>18.1f}" for n in sizes) + f" {slope:>18.0f}")
    if args.json:
        args.json.write_text(json.dumps({"bench": "table_memory", "scale": args.scale, "figures": figures}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
