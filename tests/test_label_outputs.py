"""The label stage's shards hold the values of a reference computation (one unpadded forward per
sentence), whatever the throughput settings (token budget, batch size, actors, shard size): any
speed work on the stage machinery must keep these values."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from factories import tiny_bert_classifier

from pipeline.artifact import Artifact


def _run(tmp_path: Path, workdir: str, tsv: Path, teacher: Path, *, rows_per_shard: int, **label) -> dict:
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    m = {"name": "t", "workdir": str(tmp_path / workdir), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(tsv), "text_column": "sentence",
                                                    "rows_per_shard": rows_per_shard}},
        {"name": "label", "type": "label", "inputs": {"data": "read"},
         "config": {"teacher": str(teacher), "temperature": 2.0, **label}}]}
    return {s["name"]: s for s in run_graph(build_graph(parse_manifest(m)), progress=False, log=lambda *a: None)}


def _reference(teacher: Path, texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(teacher)
    model = AutoModelForSequenceClassification.from_pretrained(teacher).eval()
    with torch.inference_mode():
        return np.stack([model(**tok(t, return_tensors="pt", truncation=True)).logits[0].numpy() for t in texts])


@pytest.mark.ray
def test_label_shards_equal_a_reference_whatever_the_throughput_settings(tmp_path, sentiment_tsv, ray_session):
    teacher = tiny_bert_classifier(tmp_path / "clf", 2, ["negative", "positive"])
    small = _run(tmp_path, "a", sentiment_tsv, teacher, rows_per_shard=7, token_budget=24, batch_size=3,
                 concurrency=2)
    large = _run(tmp_path, "b", sentiment_tsv, teacher, rows_per_shard=40, token_budget=8192, batch_size=256,
                 concurrency=1)
    texts = Artifact(small["read"]["path"]).read_table().column("text").to_pylist()
    reference = _reference(teacher, texts)
    tables = []
    for run, shards in ((small, 6), (large, 1)):
        art = Artifact(run["label"]["path"])
        assert art.num_shards() == shards
        table = art.read_table()
        assert table.column("id").to_pylist() == Artifact(run["read"]["path"]).read_table().column("id").to_pylist()
        logits = np.array(table.column("logits").to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(logits, reference, atol=1e-5)
        z = np.exp(reference / 2.0)
        np.testing.assert_allclose(np.array(table.column("probs").to_pylist()), z / z.sum(1, keepdims=True), atol=1e-5)
        tables.append(logits)
        timing = art.manifest["timing"]  # where the stage's time went, for bench/label.py --profile
        assert timing["shards_timed"] == shards and 1 <= timing["actors"] <= 2
        assert set(timing) >= {"compute_seconds", "write_seconds", "slowest_setup_seconds"}
        # A CPU actor holds one shard at a time: a prefetched second shard slows its forward passes.
        assert timing["most_shards_held_by_an_actor"] == 1
    np.testing.assert_allclose(tables[0], tables[1], atol=1e-6)
