"""bench/label_ops.py: the fair loop's op breakdown counts what the model computes. Checks the
FLOPs and the grouping, never a timing."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from factories import tiny_bert_classifier

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import label_ops  # noqa: E402

SENTENCES = [" ".join(["a warm funny film"] * (1 + i % 5)) for i in range(23)]


def test_the_matmul_flops_are_the_encoders_linear_layers_over_every_padded_token(tmp_path):
    model = tiny_bert_classifier(tmp_path / "clf", 2, sentences=SENTENCES)
    b = label_ops.op_breakdown(SENTENCES, model, threads=1, rows_per_shard=10, token_budget=64, batch_size=8)
    c = json.loads((model / "config.json").read_text())
    h, i, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    per_token = 2 * layers * (4 * h * h + 2 * h * i)  # q, k, v, output; the feed-forward pair
    per_row = 2 * (h * h + h * 2)  # pooler and the 2-label classifier, once per sentence
    mm = b["groups"]["matrix products"]
    assert mm["flops"] == b["padded_tokens"] * per_token + len(SENTENCES) * per_row
    assert b["rows"] == 23 and b["batches"] >= 23 / 8 and b["useful_tokens"] < b["padded_tokens"]
    assert abs(sum(g["seconds"] for g in b["groups"].values()) - b["op_seconds"]) < 1e-9
    assert "aten::gelu" in b["groups"]["layer norm, GELU, tanh"]["ops"]
    assert label_ops.group_of("aten::addmm") == "matrix products"
    assert label_ops.group_of("aten::embedding").startswith("the rest")
