"""Engine contract: registry, validation, cache keys, resume after SIGKILL, Parquet round trips."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.cli import main
from pipeline.errors import ManifestError
from pipeline.graph import build_graph
from pipeline.manifest import parse_manifest
from pipeline.plan import make_plan
from pipeline.registry import STAGES, get_stage_class
from pipeline.runner import run_graph
from pipeline.stage import throughput_fields

REPO = Path(__file__).resolve().parent.parent


def manifest(tmp_path: Path, tsv: Path, *, fraction: float = 0.5, concurrency: int = 1,
             rows_per_shard: int = 10, name: str = "t") -> dict:
    return {
        "name": name,
        "workdir": str(tmp_path / "wd"),
        "stages": [
            {"name": "read", "type": "read",
             "config": {"path": str(tsv), "text_column": "sentence", "label_column": "label",
                        "rows_per_shard": rows_per_shard}},
            {"name": "heldout", "type": "split", "inputs": {"data": "read"},
             "config": {"fraction": fraction, "concurrency": concurrency}},
            {"name": "rest", "type": "split", "inputs": ["read"],
             "config": {"fraction": fraction, "part": "out"}},
        ],
    }


def run(m: dict) -> dict[str, dict]:
    summary = run_graph(build_graph(parse_manifest(m)), progress=False, log=lambda *a: None)
    return {s["name"]: s for s in summary}


def test_every_registered_stage_imports_with_matching_type():
    for key in STAGES:
        cls = get_stage_class(key)
        assert cls.type == key
        assert cls.kind in ("source", "map", "task")
        assert cls.Config.model_config.get("extra") == "forbid"


def test_throughput_fields_are_left_out_of_the_key(tmp_path, sentiment_tsv):
    assert {"num_cpus", "concurrency"} <= throughput_fields(get_stage_class("split").Config)
    keys = [{p.name: p.key for p in make_plan(build_graph(parse_manifest(manifest(tmp_path, sentiment_tsv, concurrency=c))))}
            for c in (1, 2)]
    assert keys[0] == keys[1]
    changed = {p.name: p.key for p in make_plan(build_graph(parse_manifest(manifest(tmp_path, sentiment_tsv, fraction=0.3))))}
    assert changed["read"] == keys[0]["read"] and changed["heldout"] != keys[0]["heldout"]


def test_validation_collects_every_problem_with_locations(tmp_path, sentiment_tsv):
    m = manifest(tmp_path, sentiment_tsv)
    m["stages"][1]["config"]["fraction"] = 2
    m["stages"][2]["inputs"] = {"data": "nope"}
    m["stages"].append({"name": "x", "type": "splitt"})
    with pytest.raises(ManifestError) as err:
        build_graph(parse_manifest(m))
    text = "\n".join(err.value.problems)
    assert "stages[1].config.fraction" in text
    assert "stages[2].inputs.data: no stage named 'nope'" in text
    assert "stages[3].type: unknown stage type 'splitt' (did you mean 'split'?)" in text
    assert not (tmp_path / "wd").exists()


def test_cycle_is_reported(tmp_path, sentiment_tsv):
    m = manifest(tmp_path, sentiment_tsv)
    m["stages"][1]["inputs"] = {"data": "rest"}
    m["stages"][2]["inputs"] = {"data": "heldout"}
    with pytest.raises(ManifestError, match="cycle: "):
        build_graph(parse_manifest(m))


@pytest.mark.ray
def test_cache_contract(tmp_path, sentiment_tsv, ray_session):
    first = run(manifest(tmp_path, sentiment_tsv))
    assert {s["status"] for s in first.values()} == {"ran"}
    assert first["read"]["shards_total"] == 4 and first["read"]["rows"] == 40
    assert first["heldout"]["rows"] + first["rest"]["rows"] == 40

    again = run(manifest(tmp_path, sentiment_tsv))
    assert {s["status"] for s in again.values()} == {"cached"}
    assert sum(s["shards_run"] for s in again.values()) == 0

    faster = run(manifest(tmp_path, sentiment_tsv, concurrency=2))
    assert {s["status"] for s in faster.values()} == {"cached"}

    edited = run(manifest(tmp_path, sentiment_tsv, fraction=0.25))
    assert edited["read"]["status"] == "cached"
    assert edited["heldout"]["status"] == "ran" and edited["rest"]["status"] == "ran"
    assert "config.fraction changed 0.5 -> 0.25" in edited["heldout"]["reason"]

    # A changed source file changes the key of read and everything below it.
    sentiment_tsv.write_text(sentiment_tsv.read_text() + "one more great film\t1\n")
    grown = run(manifest(tmp_path, sentiment_tsv, fraction=0.25))
    assert {s["status"] for s in grown.values()} == {"ran"}
    assert "source file" in grown["read"]["reason"] and grown["read"]["rows"] == 41


@pytest.mark.ray
def test_split_partitions_and_roundtrips_through_readers(tmp_path, sentiment_tsv, ray_session):
    summary = run(manifest(tmp_path, sentiment_tsv))
    wd = tmp_path / "wd"
    runs = wd / "runs" / "t"
    import pandas as pd

    read = pd.read_parquet(runs / "read" / "shards")
    held = pd.read_parquet(runs / "heldout" / "shards")
    rest = pd.read_parquet(runs / "rest" / "shards")
    assert read["id"].is_unique and len(read) == 40
    assert set(held["id"]).isdisjoint(rest["id"]) and set(held["id"]) | set(rest["id"]) == set(read["id"])

    import datasets

    ds = datasets.load_dataset("parquet", data_files=str(runs / "read" / "shards" / "*.parquet"), split="train",
                               cache_dir=str(tmp_path / "hf"))
    assert sorted(ds["id"]) == sorted(read["id"])
    table = pq.read_table(runs / "read" / "shards")
    assert table.schema.field("label").type == pa.int64()
    md = pq.read_schema(next((runs / "read" / "shards").glob("*.parquet"))).metadata
    assert md[b"kdpipe.key"].decode() == summary["read"]["key"]
    art_manifest = json.loads((runs / "read" / "manifest.json").read_text())
    assert art_manifest["rows"] == 40 and len(art_manifest["shards"]) == 4
    assert all(len(s["sha256"]) == 64 for s in art_manifest["shards"])


def test_cli_plan_explains_a_miss(tmp_path, sentiment_tsv, capsys):
    import yaml

    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest(tmp_path, sentiment_tsv)))
    assert main(["plan", str(path)]) == 0
    out = capsys.readouterr().out
    assert "read" in out and "not computed before" in out


def test_cli_bad_manifest_exits_2_with_location(tmp_path, sentiment_tsv, capsys):
    import yaml

    m = manifest(tmp_path, sentiment_tsv)
    m["stages"][0]["config"]["rows_per_shard"] = 0
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(m))
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: stages[0].config.rows_per_shard")
    assert not (tmp_path / "wd").exists()


def test_schema_command_lists_stage_configs(capsys):
    assert main(["schema"]) == 0
    schema = json.loads(capsys.readouterr().out)
    titles = {v["title"] for v in schema["properties"]["stages"]["items"]["oneOf"]}
    assert {"read", "split"} <= titles


@pytest.mark.slow
def test_sigkill_mid_stage_then_resume_equals_uninterrupted_run(tmp_path):
    """Kill the driver (and its embedded Ray) while a 200-shard stage runs; the rerun executes
    only the missing shards and the result equals an uninterrupted run."""
    import yaml

    tsv = tmp_path / "big.tsv"
    tsv.write_text("sentence\tlabel\n" + "".join(f"sentence number {i}\t{i % 2}\n" for i in range(4000)))

    def write_manifest(wd: str) -> Path:
        m = manifest(tmp_path, tsv, rows_per_shard=20)
        m["workdir"] = str(tmp_path / wd)
        path = tmp_path / f"{wd}.yaml"
        path.write_text(yaml.safe_dump(m))
        return path

    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "KDPIPE_RAY_TMPDIR": f"/tmp/kdc{os.getpid()}"}
    cmd = [sys.executable, "-m", "pipeline.cli", "run", "--no-progress"]
    crashed = write_manifest("crashed")
    proc = subprocess.Popen(cmd + [str(crashed)], cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    markers = None
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        dirs = list((tmp_path / "crashed" / "artifacts" / "split").glob("*/completions"))
        if dirs and len(list(dirs[0].glob("*.json"))) >= 5:
            markers = dirs[0]
            break
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert markers is not None, "the split stage never started writing shards"
    done_before = len(list(markers.glob("*.json")))
    assert done_before < 200

    summary_path = tmp_path / "resume.json"
    subprocess.run(cmd + [str(crashed), "--summary-json", str(summary_path)], cwd=REPO, env=env, check=True,
                   stdout=subprocess.DEVNULL)
    stages = {s["name"]: s for s in json.loads(summary_path.read_text())["stages"]}
    first = stages["heldout"]
    assert first["status"] == "resumed"
    assert first["shards_total"] == 200
    assert first["shards_run"] <= 200 - done_before + 1  # a shard may finish between poll and kill

    clean = write_manifest("clean")
    subprocess.run(cmd + [str(clean)], cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)
    for stage in ("read", "heldout", "rest"):
        a = pq.read_table(tmp_path / "crashed" / "runs" / "t" / stage / "shards").sort_by("id")
        b = pq.read_table(tmp_path / "clean" / "runs" / "t" / stage / "shards").sort_by("id")
        assert a.num_rows == b.num_rows and len(set(a.column("id").to_pylist())) == a.num_rows
        assert a.equals(b)


@pytest.mark.ray
def test_input_from_another_run_by_reference(tmp_path, sentiment_tsv, ray_session):
    run(manifest(tmp_path, sentiment_tsv))
    other = {"name": "other", "workdir": str(tmp_path / "wd"),
             "stages": [{"name": "tenth", "type": "split", "inputs": {"data": "@t/read"}, "config": {"fraction": 0.1}}]}
    first = run(other)
    assert first["tenth"]["status"] == "ran" and first["tenth"]["shards_total"] == 4
    assert run(other)["tenth"]["status"] == "cached"
    missing = {**other, "stages": [{**other["stages"][0], "inputs": {"data": "@nope/read"}}]}
    with pytest.raises(ManifestError, match="run that manifest first"):
        build_graph(parse_manifest(missing))


def test_manifest_seed_stays_out_of_keys_of_stages_without_randomness(tmp_path, sentiment_tsv):
    # read has its own shuffle_seed and split its own seed; the manifest seed changes neither.
    base = manifest(tmp_path, sentiment_tsv)
    keys = [{p.name: p.key for p in make_plan(build_graph(parse_manifest({**base, "seed": seed})))} for seed in (0, 1)]
    assert keys[0] == keys[1]


def test_parquet_read_by_several_tasks_writes_the_same_shards(tmp_path, ray_session):
    """`read_tasks: 3` on a Parquet corpus: three tasks read the row groups of their shards (shards
    of 7 rows straddle row groups of 9) and write exactly the shards one task writes."""

    from pipeline.artifact import Artifact

    source = tmp_path / "corpus.parquet"
    pq.write_table(pa.table({"sentence": [f"sentence number {i}" for i in range(100)],
                             "label": pa.array([i % 3 for i in range(100)], pa.int32())}), source, row_group_size=9)

    def manifest(tasks: int) -> dict:
        return {"name": "parts", "workdir": str(tmp_path / f"wd{tasks}"), "stages": [
            {"name": "read", "type": "read", "config": {"path": str(source), "text_column": "sentence",
                                                        "label_column": "label", "rows_per_shard": 7,
                                                        "read_tasks": tasks}}]}

    one, three = run(manifest(1))["read"], run(manifest(3))["read"]
    assert (one["read_tasks"], three["read_tasks"]) == (1, 3)
    assert one["key"] == three["key"] and one["shards_total"] == three["shards_total"] == 15
    a, b = Artifact(one["path"]), Artifact(three["path"])
    for i in range(15):
        assert a.read_shard(i).equals(b.read_shard(i)), f"shard {i} differs"
