"""BiLSTM student training speed: the train stage fed from Parquet shards (seeded shard order,
per-shard id join to teacher logits, tokenization, batching) vs a bare PyTorch loop over batches
already tokenized and padded in memory. Same model, batch size, losses and thread count, measured in
one invocation, alternating the two (best of --repeat each, for a shared machine).
Goal: stage / bare >= 0.9.

    .venv/bin/python bench/train.py --scale 4000            # rows in the transfer set
    .venv/bin/python bench/train.py --scale 20000 --model tang   # Tang et al. sizes (emb 300, hidden 300)
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _env  # noqa: F401  (kdpipe from this checkout, offline)

MODELS = {"small": {"embedding_dim": 64, "hidden_dim": 64, "mlp_dim": 64},
          "tang": {"embedding_dim": 300, "hidden_dim": 300, "mlp_dim": 400}}


def synthetic(rows: int, vocab: int, seed: int):
    """Zipf-distributed words, 5-30 per sentence, random labels and teacher logits."""
    import numpy as np
    import pyarrow as pa

    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(vocab)]
    lengths = rng.integers(5, 31, rows)
    ranks = np.minimum(rng.zipf(1.2, lengths.sum()), vocab) - 1
    texts, pos = [], 0
    for n in lengths:
        texts.append(" ".join(words[r] for r in ranks[pos:pos + n]))
        pos += n
    ids = [f"r{i:08d}" for i in range(rows)]
    labels = rng.integers(0, 2, rows)
    logits = rng.normal(size=(rows, 2)).astype("float32")
    data = pa.table({"id": ids, "text": texts, "label": labels})
    lab = pa.table({"id": ids, "logits": pa.FixedSizeListArray.from_arrays(pa.array(logits.ravel()), 2)})
    return data, lab


def bare_loop(cfg, data, lab, threads: int) -> tuple[float, int]:
    """The same student and loss over pre-collated in-memory batches: the ceiling for the stage."""
    import numpy as np
    import torch

    from stages.students.common import WordVocab
    from stages.train import _loss, _optimizer, _student_module, derive_seed

    torch.set_num_threads(threads)
    texts = data["text"].to_pylist()
    vocab = WordVocab.build(texts, max_size=cfg.tokenizer.vocab_size)
    meta = {"num_labels": 2, "pair": False, "max_length": cfg.max_length,
            "hyperparameters": cfg.student.model_dump(mode="json", exclude_none=True)}
    torch.manual_seed(derive_seed(0, "init"))
    module = _student_module("bilstm").create(meta=meta, tokenizer=vocab)
    optimizer = _optimizer(cfg, module)
    rows = module.tokenize_rows(texts, None)
    gold = torch.tensor(data["label"].to_pylist())
    teacher = torch.from_numpy(np.array(lab["logits"].combine_chunks().flatten().to_numpy()).reshape(-1, 2))
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(0)).tolist()
    b = cfg.batch_size
    batches = [(module.collate([rows[i] for i in order[s:s + b]]), gold[order[s:s + b]], teacher[order[s:s + b]])
               for s in range(0, len(order), b)]
    module.train()
    start = time.perf_counter()
    for batch, g, t in batches:
        loss, _ = _loss(cfg, module(**batch), g, t, 1.0, 0.0)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return time.perf_counter() - start, len(rows)


def stage_run(cfg, data_art, lab_art, tmp: Path, threads: int) -> dict:
    import torch

    from pipeline.testing import make_context
    from stages.train import TrainStage

    torch.set_num_threads(threads)
    ctx = make_context(tmp, inputs={"data": [data_art], "labels": [lab_art]}, name="bench")
    start = time.perf_counter()
    TrainStage(config=cfg).run(ctx)
    total = time.perf_counter() - start
    record = json.loads((ctx.out_dir / "metrics.json").read_text())["history"][-1]
    return {"epoch_seconds": record["seconds"], "examples": record["examples"], "total_seconds": total}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--scale", type=int, default=4000, help="rows in the synthetic transfer set")
    p.add_argument("--model", choices=sorted(MODELS), default="small")
    p.add_argument("--vocab", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--rows-per-shard", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeat", type=int, default=3, help="alternating runs of each; the best is reported")
    args = p.parse_args()
    t0 = time.perf_counter()

    from pipeline.testing import make_artifact
    from stages.train import TrainStage

    cfg = TrainStage.Config(student={"type": "bilstm", **MODELS[args.model], "dropout": 0.1},
                            tokenizer={"kind": "word", "vocab_size": args.vocab}, losses={"ce": 0.5, "kl": 1.0},
                            temperature=2.0, epochs=1, batch_size=args.batch_size, max_length=64)
    data, lab = synthetic(args.scale, args.vocab, seed=0)
    with tempfile.TemporaryDirectory(prefix="kdbench") as d:
        tmp = Path(d)
        md = {"kdpipe.task": "classification", "kdpipe.logit_columns": '["logits"]'}
        data_art = make_artifact(tmp / "data", data, rows_per_shard=args.rows_per_shard)
        lab_art = make_artifact(tmp / "labels", lab, rows_per_shard=args.rows_per_shard, metadata=md)
        # Alternate the two, best of --repeat each: other processes on a shared machine slow
        # whichever happens to run while they are busy.
        bare_runs, stage_runs = [], []
        for i in range(args.repeat):
            bare_runs.append(bare_loop(cfg, data, lab, args.threads))
            stage_runs.append(stage_run(cfg, data_art, lab_art, tmp / f"run{i}", args.threads))
    bare_s, n = min(bare_runs)
    stage = min(stage_runs, key=lambda r: r["epoch_seconds"])
    bare_eps = n / bare_s
    stage_eps = stage["examples"] / stage["epoch_seconds"]
    if args.repeat > 1:
        print("all runs, examples/s: bare " + ", ".join(f"{n / s:.0f}" for s, _ in bare_runs) + "; stage "
              + ", ".join(f"{r['examples'] / r['epoch_seconds']:.0f}" for r in stage_runs))
    print(f"BiLSTM ({args.model}: {MODELS[args.model]}), best of {args.repeat}, {args.scale} rows in {-(-args.scale // args.rows_per_shard)} "
          f"shards, batch {args.batch_size}, {args.threads} thread(s), 1 epoch")
    print(f"{'':<34}{'examples/s':>12}{'seconds':>10}")
    print(f"{'bare loop, in-memory batches':<34}{bare_eps:>12.1f}{bare_s:>10.2f}")
    print(f"{'train stage, Parquet shards':<34}{stage_eps:>12.1f}{stage['epoch_seconds']:>10.2f}")
    print(f"ratio stage / bare: {stage_eps / bare_eps:.3f} (goal >= 0.9)")
    print(f"stage total incl. vocab build, checkpoint, curves: {stage['total_seconds']:.1f} s; "
          f"benchmark ran {time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
