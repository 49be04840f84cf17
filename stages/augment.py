"""`augment`: the transfer-set generator of Tang et al. 2019 ("Distilling task-specific knowledge
from BERT into simple neural networks", section 3.3).

Inputs: `data`, a `pos_tag` artifact (words, coarse POS tags, trailing-space flags), and
`table`, a `unigram` artifact (per-tag word counts of the corpus).

For each input example, repeat `n_iter` times (iteration = `aug_index` 0..n_iter-1):
1. for each word (every spaCy token except `SPACE` whitespace tokens) draw X ~ U[0,1]:
   X < p_mask -> replace it by `mask_token`; else X < p_mask + p_pos -> replace it by a word
   drawn from the corpus unigram distribution of words with the same POS tag (the draw may
   return the same word: the distribution is not renormalised); else keep it;
2. then with probability p_ng keep only a random n-gram of the result: n uniform in
   [ng_min, ng_max], clipped to the number of words, start uniform over the valid positions.
Text is rebuilt from the tokens and spaCy's trailing-whitespace flags, so untouched text
round-trips exactly and a mask keeps the whitespace (or its absence) of the word it replaces.
Sentence pairs (`text_pair`): both sides are perturbed independently (own draws, own n-gram).

`ops` lists the perturbations that fired in a sample (any side): "mask" / "pos" when at least one
word was masked / replaced, "ngram" when the n-gram draw fired (even if n covered everything).

Dedup: a sample identical to its original or to an earlier sample of the same example is
dropped (`dedup: example`). `dedup: artifact` also drops samples identical to any original of the
corpus (checked per shard against every input text, loaded in `setup`), and, in a post-pass over
the finished shards (`finalize`), samples identical to another example's sample: the one with the
smallest (parent_id, aug_index) is kept. Both rules depend only on ids and texts, never on shard
boundaries, worker count or order, so the output is the same for any sharding.

Determinism: each sample's RNG is a numpy PCG64 whose state is set from sha256(global seed, seed,
parent id, iteration); unigram draws invert the per-tag cumulative counts (bisect on one
uniform). Empty and whitespace-only inputs yield no samples; the summary counts them.

Output: `id` (sha256(parent id, aug_index), originals keep their own id), `parent_id`,
`aug_index` int32 (-1 = the original, kept when `keep_original`), `ops` list<str>, `text`,
`text_pair`, then `label` and every other input column, copied from the parent.
"""
from __future__ import annotations

import bisect
import dataclasses
import hashlib
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.stage import Facts, InputRole, MapStage, Problem, ResourceConfig, StageContext, throughput

OPS = ("mask", "pos", "ngram")
SIDES = (("text", ""), ("text_pair", "_pair"))
TAG_COLUMNS = tuple(f"{c}{s}" for _, s in SIDES for c in ("words", "pos", "spaces"))
LINEAGE = ("id", "parent_id", "aug_index", "ops")
SKIP_TAGS = frozenset({"SPACE"})


class AugmentConfig(ResourceConfig):
    p_mask: float = Field(0.1, ge=0, le=1, description="per-word probability of the mask token")
    p_pos: float = Field(0.1, ge=0, le=1, description="per-word probability of a same-POS unigram draw")
    p_ng: float = Field(0.25, ge=0, le=1, description="per-sample probability of n-gram sampling")
    ng_min: int = Field(1, ge=1)
    ng_max: int = Field(5, ge=1)
    n_iter: int = Field(20, ge=0, description="samples drawn per example (before dedup)")
    mask_token: str = Field("[MASK]", min_length=1, description="e.g. the teacher tokenizer's mask token")
    keep_original: bool = True
    dedup: Literal["example", "artifact"] = "example"
    seed: int = Field(0, description="offset combined with the manifest seed")
    concurrency: int | None = throughput(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "AugmentConfig":
        if self.p_mask + self.p_pos > 1:
            raise ValueError(f"p_mask + p_pos = {self.p_mask + self.p_pos} exceeds 1; lower one of them")
        if self.ng_min > self.ng_max:
            raise ValueError(f"ng_min ({self.ng_min}) exceeds ng_max ({self.ng_max}); swap them")
        return self


@dataclasses.dataclass
class SideSample:
    """One perturbed side, with what happened to it (the tests check the rates)."""

    words: list[str]
    text: str
    n_words: int
    masked: int = 0
    replaced: int = 0
    ngram: int | None = None  # n when n-gram sampling fired


@dataclasses.dataclass
class PreparedSide:
    """Per-example work done once for all n_iter samples: word positions, text pieces."""

    words: list[str]
    pos: list[str]
    spaces: list[bool]
    word_idx: list[int] = dataclasses.field(init=False)
    pieces: list[str] = dataclasses.field(init=False)  # token + its trailing whitespace

    def __post_init__(self) -> None:
        self.word_idx = [i for i, tag in enumerate(self.pos) if tag not in SKIP_TAGS]
        self.pieces = [w + " " if s else w for w, s in zip(self.words, self.spaces)]


def seed_hasher(global_seed: int, seed: int, parent_id: str):
    return hashlib.sha256(f"{global_seed}\0{seed}\0{parent_id}\0".encode())


def sample_seed(global_seed: int, seed: int, parent_id: str, iteration: int, *, hasher=None) -> bytes:
    """sha256(global seed, seed offset, parent id, iteration): the 256 bits seeding one sample."""
    h = (hasher or seed_hasher(global_seed, seed, parent_id)).copy()
    h.update(str(iteration).encode())
    return h.digest()


class SampleRng:
    """A numpy Generator re-seeded per sample. The PCG64 state and increment are set straight from
    the sha256 digest: 4x cheaper than building a Generator (and its SeedSequence) per sample,
    which would otherwise cost as much as the rest of augmentation."""

    def __init__(self) -> None:
        import numpy as np

        self.bit_generator = np.random.PCG64()
        self.generator = np.random.Generator(self.bit_generator)

    def reseed(self, digest: bytes):
        self.bit_generator.state = {
            "bit_generator": "PCG64", "has_uint32": 0, "uinteger": 0,
            "state": {"state": int.from_bytes(digest[:16], "little"),
                      "inc": int.from_bytes(digest[16:], "little") | 1},  # PCG increments are odd
        }
        return self.generator


def sample_id(parent_id: str, aug_index: int) -> str:
    return hashlib.sha256(f"{parent_id}\0{aug_index}".encode()).hexdigest()[:16]


def perturb_side(words: list[str], pos: list[str], spaces: list[bool], rng: Any, cfg: AugmentConfig,
                 table: dict[str, tuple[list[str], list[int]]], *, prepared: PreparedSide | None = None
                 ) -> SideSample:
    """One sample of one side. Draws, in order: one uniform per word plus three for the n-gram
    (fires?, n, start), then one uniform per POS replacement (inverse CDF over cumulative counts)."""
    side = prepared or PreparedSide(words, pos, spaces)
    word_idx, n_words = side.word_idx, len(side.word_idx)
    u = rng.random(n_words + 3).tolist()
    out, pieces = list(side.words), list(side.pieces)
    masked, replace = [], []
    threshold = cfg.p_mask + cfg.p_pos
    for j in range(n_words):
        x = u[j]
        if x < threshold:
            i = word_idx[j]
            if x < cfg.p_mask:
                out[i] = cfg.mask_token
                masked.append(i)
            elif side.pos[i] in table:  # a tag missing from the table (another corpus's) keeps the word
                replace.append(i)
    for i, v in zip(replace, rng.random(len(replace)).tolist() if replace else ()):
        vocab, cum = table[side.pos[i]]
        out[i] = vocab[bisect.bisect_right(cum, int(v * cum[-1]))]
    for i in masked + replace:
        pieces[i] = out[i] + " " if side.spaces[i] else out[i]
    if n_words and u[n_words] < cfg.p_ng:
        n = min(cfg.ng_min + int(u[n_words + 1] * (cfg.ng_max - cfg.ng_min + 1)), n_words)
        start = int(u[n_words + 2] * (n_words - n + 1))
        lo, hi = word_idx[start], word_idx[start + n - 1] + 1
        text = "".join(pieces[lo:hi])
        if side.spaces[hi - 1]:
            text = text[:-1]  # the n-gram ends mid-sentence: no trailing space
        return SideSample(out[lo:hi], text, n_words, len(masked), len(replace), n)
    return SideSample(out, "".join(pieces), n_words, len(masked), len(replace))


def has_words(pos: list[str] | None) -> bool:
    return any(tag not in SKIP_TAGS for tag in pos or [])


def augment_example(sides: list[tuple[list[str], list[str], list[bool]]], original: tuple[str, ...],
                    parent_id: str, cfg: AugmentConfig, table, *, global_seed: int,
                    forbidden: set | None = None, sample_rng: SampleRng | None = None
                    ) -> list[tuple[int, tuple[str, ...], list[str]]]:
    """(aug_index, texts per side, ops) of the kept samples of one example."""
    if not all(has_words(pos) for _, pos, _ in sides):
        return []
    prepared = [PreparedSide(w, p, s) for w, p, s in sides]
    hasher = seed_hasher(global_seed, cfg.seed, parent_id)
    sample_rng = sample_rng or SampleRng()
    seen = {original}
    kept = []
    for it in range(cfg.n_iter):
        rng = sample_rng.reseed(sample_seed(global_seed, cfg.seed, parent_id, it, hasher=hasher))
        results = [perturb_side(p.words, p.pos, p.spaces, rng, cfg, table, prepared=p) for p in prepared]
        texts = tuple(r.text for r in results)
        if texts in seen or (forbidden is not None and texts in forbidden) or not all(t.strip() for t in texts):
            continue
        seen.add(texts)
        ops = [op for op, hit in zip(OPS, (any(r.masked for r in results), any(r.replaced for r in results),
                                         any(r.ngram is not None for r in results))) if hit]
        kept.append((it, texts, ops))
    return kept


class AugmentStage(MapStage):
    """Tang et al. 2019 transfer-set generation; semantics in the module docstring."""

    type = "augment"
    Config = AugmentConfig
    seeded = True
    inputs = {"data": InputRole(doc="a pos_tag stage"),
              "table": InputRole(kind="files", doc="a unigram stage")}

    config: AugmentConfig

    def validate(self, *, input_columns) -> list[Problem]:
        problems = []
        for cols in input_columns.get("data", []):
            if cols is None:
                continue
            need = ["id", "text", "words", "pos", "spaces"]
            if "text_pair" in cols:
                need += ["words_pair", "pos_pair", "spaces_pair"]
            missing = [c for c in need if c not in cols]
            if missing:
                problems.append(Problem("inputs.data", f"input lacks column(s) {missing} (it has {cols}); "
                                        "feed augment the output of a pos_tag stage over a read stage"))
        return problems

    def output_facts(self, *, input_facts) -> Facts:
        facts = super().output_facts(input_facts=input_facts)
        if self.config.p_mask > 0:
            facts.values["mask_token"] = self.config.mask_token
        return facts

    def output_columns(self, *, input_columns) -> list[str] | None:
        cols = (input_columns.get("data") or [None])[0]
        if cols is None:
            return None
        texts = [c for c, _ in SIDES if c in cols]
        rest = [c for c in cols if c not in (*LINEAGE, *texts, *TAG_COLUMNS)]
        return [*LINEAGE, *texts, *rest]

    def setup(self, ctx: StageContext) -> None:
        from kd.unigram_table import load_unigram_table

        self.table = load_unigram_table(ctx.input("table").files_dir)
        self.sample_rng = SampleRng()
        self.forbidden = None
        if self.config.dedup == "artifact":
            # Every original text of the corpus, so a sample equal to one is dropped in any shard.
            data = ctx.input("data")
            sides = [c for c, _ in SIDES if c in (data.columns() or [])]
            self.forbidden = set()
            for shard in data.iter_shards(columns=sides):
                columns = [["" if t is None else t for t in shard.column(c).to_pylist()] for c in sides]
                self.forbidden.update(zip(*columns))

    def process(self, table, ctx: StageContext, *, shard_index: int):
        import pyarrow as pa

        cfg = self.config
        side_cols = [(c, s) for c, s in SIDES if c in table.column_names]
        ids = table.column("id").to_pylist()
        texts = [table.column(c).to_pylist() for c, _ in side_cols]
        tagged = [[table.column(f"{name}{s}").to_pylist() for name in ("words", "pos", "spaces")]
                  for _, s in side_cols]
        parents, aug_index, out_ids, out_ops = [], [], [], []
        out_texts: list[list[str]] = [[] for _ in side_cols]

        def emit(row: int, index: int, row_id: str, ops: list[str], side_texts: tuple[str, ...]) -> None:
            parents.append(row)
            aug_index.append(index)
            out_ids.append(row_id)
            out_ops.append(ops)
            for column, text in zip(out_texts, side_texts):
                column.append(text)

        for row, parent_id in enumerate(ids):
            original = tuple("" if t[row] is None else t[row] for t in texts)
            if cfg.keep_original:
                emit(row, -1, parent_id, [], original)
            sides = [(w[row] or [], p[row] or [], s[row] or []) for w, p, s in tagged]
            for it, sample, ops in augment_example(sides, original, parent_id, cfg, self.table,
                                                   global_seed=ctx.seed, forbidden=self.forbidden,
                                                   sample_rng=self.sample_rng):
                emit(row, it, sample_id(parent_id, it), ops, sample)
        columns: dict[str, Any] = {
            "id": pa.array(out_ids, pa.string()),
            "parent_id": pa.array([ids[r] for r in parents], pa.string()),
            "aug_index": pa.array(aug_index, pa.int32()),
            "ops": pa.array(out_ops, pa.list_(pa.string())),
        }
        for (col, _), values in zip(side_cols, out_texts):
            columns[col] = pa.array(values, pa.string())
        rest = [c for c in table.column_names if c not in columns and c not in TAG_COLUMNS]
        passed = table.select(rest).take(pa.array(parents, pa.int64()))
        for col in rest:
            columns[col] = passed.column(col)
        return pa.table(columns)

    def finalize(self, shard_stats: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        if self.config.dedup != "artifact":
            return shard_stats
        stats, self.cross_example_dropped = dedup_across_shards(ctx.output().loc, shard_stats)
        return stats

    def summarize(self, shard_stats: list[dict[str, Any]], ctx: StageContext) -> dict[str, Any]:
        summary = summarize_output(ctx.output().loc, ctx.input("data"), n_iter=self.config.n_iter)
        if self.config.dedup == "artifact":
            summary["cross_example_duplicates_dropped_this_run"] = getattr(self, "cross_example_dropped", 0)
        return summary


def dedup_across_shards(art_dir, shard_stats: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """Whole-artifact post-pass: among augmented samples with identical text (and text_pair), keep
    the one with the smallest (parent_id, aug_index); rewrite only shards that lose rows.

    Idempotent (the kept sample of each text is never dropped), so a resume may rerun it."""
    import pandas as pd
    import pyarrow as pa

    from pipeline.artifact import Artifact, write_shard

    art = Artifact(art_dir)
    cols = [c for c, _ in SIDES if c in (art.columns() or [])]
    frames = []
    for st in shard_stats:
        frame = art.read_shard(st["index"], columns=["parent_id", "aug_index", *cols]).to_pandas()
        frame["shard"], frame["row"] = st["index"], range(len(frame))
        frames.append(frame[frame["aug_index"] >= 0])
    if not frames:
        return shard_stats, 0
    samples = pd.concat(frames, ignore_index=True)
    samples = samples.sort_values(["parent_id", "aug_index"], kind="stable")
    dup = samples[samples.duplicated(subset=cols, keep="first")]
    drop_by_shard = dup.groupby("shard")["row"].apply(set).to_dict()
    out = []
    for st in shard_stats:
        drop = drop_by_shard.get(st["index"])
        if not drop:
            out.append(st)
            continue
        shard = art.read_shard(st["index"])
        keep = pa.array([row not in drop for row in range(shard.num_rows)], pa.bool_())
        new = write_shard(art.loc, st["index"], shard.filter(keep), {})  # schema metadata is kept
        out.append({**st, **new})
    return out, len(dup)


def summarize_output(art_dir, data, *, n_iter: int) -> dict[str, Any]:
    """Size, growth and per-op rates of a finished augment artifact, and the empty inputs.
    Counted with Arrow compute, shard by shard: a full-size transfer set has a million rows."""
    import numpy as np
    import pyarrow.compute as pc

    from pipeline.artifact import Artifact

    input_rows = empty = 0
    pos_cols = [c for c in ("pos", "pos_pair") if c in (data.columns() or [])]
    for shard in data.iter_shards(columns=pos_cols):
        input_rows += shard.num_rows
        with_words = [_rows_with_words(shard.column(c)) for c in pos_cols]
        empty += shard.num_rows - int(np.logical_and.reduce(with_words).sum()) if with_words else 0
    originals = samples = 0
    fired = dict.fromkeys(OPS, 0)
    for shard in Artifact(art_dir).iter_shards(columns=["aug_index", "ops"]):
        is_sample = pc.greater_equal(shard.column("aug_index"), 0)
        n = int(pc.sum(is_sample).as_py() or 0)
        samples += n
        originals += shard.num_rows - n
        ops = pc.list_flatten(shard.filter(is_sample).column("ops"))
        for entry in pc.value_counts(ops).to_pylist():
            fired[entry["values"]] += entry["counts"]
    drawn = (input_rows - empty) * n_iter
    return {
        "input_rows": input_rows,
        "empty_inputs": empty,
        "originals": originals,
        "samples": samples,
        "rows": originals + samples,
        "growth": round((originals + samples) / input_rows, 3) if input_rows else 0.0,
        "samples_drawn": drawn,
        "samples_dropped": drawn - samples,  # duplicates and samples that came out empty
        "op_rates": {op: round(n / samples, 4) if samples else 0.0 for op, n in fired.items()},
    }


def _rows_with_words(column) -> "np.ndarray":
    """Per row of a list<string> POS column: has_words(row), as a numpy bool array."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.compute as pc

    column = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    tags = pc.list_flatten(column)
    is_word = pc.fill_null(pc.invert(pc.is_in(tags, value_set=pa.array(sorted(SKIP_TAGS)))), True)
    out = np.zeros(len(column), dtype=bool)
    out[pc.filter(pc.list_parent_indices(column), is_word).to_numpy(zero_copy_only=False)] = True
    return out
