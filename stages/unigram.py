"""`unigram`: the corpus unigram distribution of words per POS tag, as its own cached artifact.

Reads a `pos_tag` artifact shard by shard (only `words`/`pos` and their `_pair` twins, so memory
holds the counts, never all rows) and writes `files/unigram.parquet` with columns `tag` str,
`word` str, `count` int64, sorted by tag, then count descending, then word. `SPACE` tokens are
left out: augmentation never replaces them. Several `augment` configs reuse one table.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

from kd.unigram_table import TABLE_FILE, count_pairs, load_unigram_table
from pipeline.stage import InputRole, Problem, ResourceConfig, StageContext, TaskStage

# load_unigram_table lives in kd/unigram_table.py; it stays importable from here for older callers.
__all__ = ["UnigramConfig", "UnigramStage", "load_unigram_table"]


class UnigramConfig(ResourceConfig):
    lowercase: bool = False


class UnigramStage(TaskStage):
    """Count (tag, word) pairs over a POS-tagged corpus; see the module docstring."""

    type = "unigram"
    Config = UnigramConfig
    inputs = {"data": InputRole(doc="a pos_tag stage")}

    config: UnigramConfig

    def validate(self, *, input_columns) -> list[Problem]:
        for cols in input_columns.get("data", []):
            if cols is not None and not {"words", "pos"} <= set(cols):
                return [Problem("inputs.data", f"input has no `words`/`pos` columns (it has {cols}); "
                                "feed it the output of a pos_tag stage")]
        return []

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import pyarrow as pa
        import pyarrow.parquet as pq

        data = ctx.input("data")
        available = data.columns() or []
        sides = [(w, p) for w, p in (("words", "pos"), ("words_pair", "pos_pair")) if w in available]
        counts: Counter[tuple[str, str]] = Counter()
        for shard in data.iter_shards(columns=[c for side in sides for c in side]):
            for words_col, pos_col in sides:
                count_pairs(counts, shard.column(words_col).to_pylist(), shard.column(pos_col).to_pylist(),
                            lowercase=self.config.lowercase)
        rows = sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1], kv[0][1]))
        table = pa.table({
            "tag": pa.array([tag for (tag, _), _ in rows], pa.string()),
            "word": pa.array([word for (_, word), _ in rows], pa.string()),
            "count": pa.array([n for _, n in rows], pa.int64()),
        })
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        pq.write_table(table, ctx.out_dir / TABLE_FILE, compression="zstd")
        tags = sorted({tag for (tag, _) in counts})
        return {"tags": len(tags), "words": len(rows), "tokens": int(sum(counts.values())),
                "per_tag_words": {t: sum(1 for (tag, _) in counts if tag == t) for t in tags}}

