"""`pair_detection`: a translation-pair detection task (sentence-pair classification, in the
spirit of MRPC/QQP and of bitext filtering) built from a line-aligned parallel corpus.

Each row keeps its source sentence. With probability `positive_fraction` (a hash of seed and id)
it keeps its own translation: label `translation`. The other rows become negatives: within the
shard they are sorted by the length of their translation and each takes the translation of its
neighbour in that order (a cyclic shift), so a negative's length is close to what a true
translation's would be and length alone does not give the answer: label `mismatch`.

Output columns: id, text (source), text_pair (a translation or a neighbour's), label (0 = mismatch,
1 = translation; `label_names` metadata), and `pair_source_id` (whose translation it is).
Deterministic per shard; no row is dropped, so the task has as many rows as the corpus.
"""
from __future__ import annotations

import hashlib
import json

from pydantic import Field

from pipeline.stage import Facts, InputRole, MapStage, Problem, ResourceConfig, throughput

LABEL_NAMES = ["mismatch", "translation"]


class PairDetectionConfig(ResourceConfig):
    source_column: str = Field("text", description="the sentence every row keeps (e.g. English)")
    target_column: str = Field("de", description="its aligned translation (e.g. German)")
    positive_fraction: float = Field(0.5, gt=0, lt=1, description="share of rows that keep their own translation")
    seed: int = 0
    concurrency: int | None = throughput(None, gt=0)


def is_positive(row_id: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"pairs\0{seed}\0{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


def detection_rows(ids: list[str], sources: list[str], targets: list[str], *, seed: int,
                   fraction: float) -> list[dict]:
    """One output row per input row: positives keep their pair, negatives swap with a length neighbour."""
    order = sorted(range(len(ids)), key=lambda i: ids[i])
    negatives = [i for i in order if not is_positive(ids[i], seed, fraction)]
    if len(negatives) == 1:  # no partner in this shard: keep it as a positive
        negatives = []
    negatives.sort(key=lambda i: (len(targets[i] or ""), ids[i]))
    partner = {i: negatives[(k + 1) % len(negatives)] for k, i in enumerate(negatives)}
    rows = []
    for i in order:
        j = partner.get(i, i)
        rows.append({"id": ids[i], "text": sources[i] or "", "text_pair": targets[j] or "",
                     "label": 0 if j != i else 1, "pair_source_id": ids[j]})
    return rows


class PairDetectionStage(MapStage):
    type = "pair_detection"
    Config = PairDetectionConfig
    inputs = {"data": InputRole(doc="parallel rows: id, source and target columns (read format parallel)")}

    config: PairDetectionConfig

    def validate(self, *, input_columns) -> list[Problem]:
        cfg = self.config
        problems = []
        for cols in input_columns.get("data", []):
            for loc, col in (("config.source_column", cfg.source_column), ("config.target_column", cfg.target_column)):
                if cols is not None and col not in cols:
                    problems.append(Problem(loc, f"data has no column {col!r} (it has {', '.join(cols)})"))
        return problems

    def output_columns(self, *, input_columns):
        return ["id", "text", "text_pair", "label", "pair_source_id"]

    def output_facts(self, *, input_facts) -> Facts:
        return Facts({"label_names": list(LABEL_NAMES)}, {"label_names": "pair_detection"})

    def metadata(self) -> dict[str, str]:
        return {"label_names": json.dumps(LABEL_NAMES)}

    def process(self, table, ctx, *, shard_index: int):
        import pyarrow as pa

        cfg = self.config
        rows = detection_rows(table["id"].to_pylist(), table[cfg.source_column].to_pylist(),
                              table[cfg.target_column].to_pylist(), seed=cfg.seed, fraction=cfg.positive_fraction)
        return pa.table({"id": pa.array([r["id"] for r in rows], pa.string()),
                         "text": pa.array([r["text"] for r in rows], pa.string()),
                         "text_pair": pa.array([r["text_pair"] for r in rows], pa.string()),
                         "label": pa.array([r["label"] for r in rows], pa.int64()),
                         "pair_source_id": pa.array([r["pair_source_id"] for r in rows], pa.string())})
