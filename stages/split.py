"""`split`: keep a deterministic fraction of rows, chosen by a hash of (seed, id).

Two `split` stages with the same seed and fraction and `part: in` / `part: out` partition an
artifact exactly (e.g. a held-out set for epoch selection, and the rest for training). The choice
depends only on the row id, so it is the same for any sharding or worker count.
"""
from __future__ import annotations

import hashlib
from typing import Literal

from pydantic import Field

from pipeline.stage import InputRole, MapStage, Problem, ResourceConfig, throughput


class SplitConfig(ResourceConfig):
    fraction: float = Field(gt=0, le=1, description="share of rows that are 'in'")
    part: Literal["in", "out"] = "in"
    seed: int = 0
    concurrency: int | None = throughput(None, gt=0)


def in_fraction(row_id: str, seed: int, fraction: float) -> bool:
    digest = hashlib.sha256(f"{seed}\0{row_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < fraction


class SplitStage(MapStage):
    type = "split"
    Config = SplitConfig
    inputs = {"data": InputRole(doc="rows with an id column")}

    config: SplitConfig

    def validate(self, *, input_columns) -> list[Problem]:
        for cols in input_columns.get("data", []):
            if cols is not None and "id" not in cols:
                return [Problem("inputs.data", "input has no `id` column; split rows need stable ids")]
        return []

    def output_columns(self, *, input_columns):
        cols = input_columns.get("data", [None])
        return cols[0] if cols else None

    def process(self, table, ctx, *, shard_index: int):
        import pyarrow as pa

        cfg = self.config
        keep = [in_fraction(i, cfg.seed, cfg.fraction) == (cfg.part == "in")
                for i in table.column("id").to_pylist()]
        return table.filter(pa.array(keep, pa.bool_()))
