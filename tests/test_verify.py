"""Store integrity: `kdpipe verify` finds every truncated, altered, stray or mis-typed shard and
file; the next run recomputes it instead of using it; two concurrent runs share one workdir."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline.artifact import Artifact, write_json
from pipeline.cli import main
from pipeline.hashing import sha256_file
from pipeline.testing import make_artifact

REPO = Path(__file__).resolve().parent.parent


def _table(n: int = 12) -> pa.Table:
    return pa.table({"id": pa.array([f"r{i:03d}" for i in range(n)], pa.string()),
                     "text": pa.array([f"sentence {i}" for i in range(n)], pa.string()),
                     "label": pa.array([i % 2 for i in range(n)], pa.int64())})


def _verify(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["verify", *args])
    out = capsys.readouterr()
    return code, [line for line in out.err.splitlines() if line.startswith("BAD ")], out.out


@pytest.fixture
def artifact(tmp_path: Path) -> Artifact:
    return make_artifact(tmp_path / "art", _table(), rows_per_shard=4)


def test_intact_artifact_passes(artifact, capsys):
    code, bad, out = _verify(capsys, str(artifact.path))
    assert code == 0 and bad == []
    assert "3 shard(s)" in out and "12 row(s)" in out


def test_truncated_shard_is_reported_once(artifact, capsys):
    shard = artifact.shard_path(1)
    shard.write_bytes(shard.read_bytes()[:-50])
    code, bad, _ = _verify(capsys, str(artifact.path))
    assert code == 1
    assert len(bad) == 1 and str(shard) in bad[0] and "truncated" in bad[0]


def test_altered_shard_same_size_is_reported(artifact, capsys):
    shard = artifact.shard_path(2)
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    code, bad, _ = _verify(capsys, str(artifact.path))
    assert code == 1 and len(bad) == 1 and str(shard) in bad[0] and "sha256" in bad[0]


def test_every_bad_shard_gets_its_own_line(artifact, capsys):
    artifact.shard_path(0).unlink()
    artifact.shard_path(2).write_bytes(b"PAR1 garbage")
    code, bad, _ = _verify(capsys, str(artifact.path))
    assert code == 1 and len(bad) == 2
    assert str(artifact.shard_path(0)) in bad[0] and "missing" in bad[0]
    assert str(artifact.shard_path(2)) in bad[1]


def test_schema_mismatch_is_reported_even_with_matching_checksum(artifact, capsys):
    # A shard whose checksum was (re)recorded but whose columns differ: caught by the schema check.
    other = _table(4).set_column(2, "label", pa.array(["a", "b", "a", "b"], pa.string()))
    shard = artifact.shard_path(1)
    pq.write_table(other, shard)
    manifest = artifact.manifest
    manifest["shards"][1].update(bytes=shard.stat().st_size, sha256=sha256_file(shard))
    write_json(artifact.manifest_path, manifest)
    code, bad, _ = _verify(capsys, str(artifact.path))
    assert code == 1 and len(bad) == 1 and "schema" in bad[0] and "label: int64 vs string" in bad[0]


def test_wrong_row_count_is_reported(artifact, capsys):
    manifest = artifact.manifest
    manifest["shards"][0]["rows"] = 5
    write_json(artifact.manifest_path, manifest)
    code, bad, _ = _verify(capsys, str(artifact.path))
    assert code == 1 and len(bad) == 1 and "4 rows, manifest says 5" in bad[0]


def test_stray_shard_is_reported(artifact, capsys):
    pq.write_table(_table(2), artifact.shards_dir / "00007.parquet")
    code, bad, _ = _verify(capsys, str(artifact.path))
    assert code == 1 and len(bad) == 1 and "00007.parquet" in bad[0] and "stray" in bad[0]


def test_incomplete_artifact_is_reported(artifact, capsys):
    artifact.manifest_path.unlink()
    code, bad, _ = _verify(capsys, str(artifact.path))
    assert code == 1 and len(bad) == 1 and "interrupted" in bad[0]


@pytest.mark.parametrize("fault", ["altered", "truncated", "missing", "extra"])
def test_files_artifact_checksums(tmp_path, capsys, fault):
    art = make_artifact(tmp_path / "ckpt", files={"model/model.safetensors": b"\0" * 64,
                                                  "metrics.json": b'{"acc": 0.5}'})
    code, bad, _ = _verify(capsys, str(art.path))
    assert code == 0 and bad == []
    weights = art.files_dir / "model" / "model.safetensors"
    if fault == "altered":
        weights.write_bytes(b"\1" * 64)
    elif fault == "truncated":
        weights.write_bytes(b"\0" * 10)
    elif fault == "missing":
        weights.unlink()
    else:
        (art.files_dir / "notes.txt").write_text("added later")
    code, bad, _ = _verify(capsys, str(art.path))
    assert code == 1 and len(bad) == 1
    assert ("notes.txt" if fault == "extra" else "model.safetensors") in bad[0]


def test_unknown_target_is_exit_2(tmp_path, capsys):
    assert main(["verify", "nope/read", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "kdpipe ls" in err[0]


# --- through the engine -------------------------------------------------------------------------

def _manifest(tmp_path: Path, corpus: Path, workdir: Path) -> dict:
    return {"name": "integrity", "workdir": str(workdir),
            "stages": [{"name": "read", "type": "read",
                        "config": {"path": str(corpus), "label_column": "label", "text_column": "sentence",
                                   "rows_per_shard": 8}}]}


@pytest.mark.ray
def test_corrupted_cached_shard_is_recomputed_not_reused(tmp_path, sentiment_tsv, ray_session, capsys):
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.plan import make_plan
    from pipeline.runner import run_graph

    workdir = tmp_path / "wd"
    graph = build_graph(parse_manifest(_manifest(tmp_path, sentiment_tsv, workdir)))
    first = run_graph(graph, progress=False, log=lambda *a: None)
    art = Artifact(first[0]["path"])
    original = art.read_table().sort_by("id")
    total = first[0]["shards_total"]
    assert total == 5

    for index, how in ((1, "truncate"), (3, "flip")):
        shard = art.shard_path(index)
        data = bytearray(shard.read_bytes())
        if how == "truncate":
            data = data[: len(data) // 2]
        else:
            data[len(data) // 3] ^= 0x01
        shard.write_bytes(bytes(data))

        code, bad, _ = _verify(capsys, "integrity", "--workdir", str(workdir))
        assert code == 1 and len(bad) == 1 and str(shard) in bad[0]

        (plan,) = make_plan(graph)
        if how == "flip":  # same size: plan trusts the stored digests; `--verify` re-hashes
            assert plan.status == "cached"
            (plan,) = make_plan(graph, verify=True)
        assert plan.status == "run" and "failed verification" in plan.reason
        summary = run_graph(graph, progress=False, log=lambda *a: None, verify=True)
        assert summary[0]["status"] == "ran" and summary[0]["shards_run"] == 1
        assert summary[0]["shards_total"] == total
        assert _verify(capsys, "integrity", "--workdir", str(workdir))[0] == 0
        assert art.read_table().sort_by("id").equals(original)

    assert run_graph(graph, progress=False, log=lambda *a: None)[0]["status"] == "cached"


@pytest.mark.slow
def test_two_concurrent_runs_share_a_workdir_without_corruption(tmp_path, sentiment_tsv, request):
    """Both start while another owner holds the artifact's writer claim; one computes, the other
    waits then finds it cached."""
    import yaml

    from pipeline.claims import Claims
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.plan import make_plan

    workdir = tmp_path / "wd"
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(_manifest(tmp_path, sentiment_tsv, workdir)))
    (plan,) = make_plan(build_graph(parse_manifest(_manifest(tmp_path, sentiment_tsv, workdir))))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    procs, logs = [], [tmp_path / f"out{i}.log" for i in range(2)]
    ray_dirs = [Path(tempfile.mkdtemp(prefix="kdv", dir="/tmp")) for _ in range(2)]  # short socket paths
    request.addfinalizer(lambda: [shutil.rmtree(d, ignore_errors=True) for d in ray_dirs])
    with Claims(str(workdir), run="holder") as holder:
        holder.acquire_writer(str(plan.art_dir))
        for i in range(2):
            env_i = {**env, "KDPIPE_RAY_TMPDIR": str(ray_dirs[i])}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--no-progress",
                 "--summary-json", str(tmp_path / f"s{i}.json")],
                cwd=REPO, env=env_i, stdout=logs[i].open("w"), stderr=subprocess.STDOUT,
                start_new_session=True))
        deadline = time.monotonic() + 120
        while not all("waiting: artifact read/" in log.read_text() for log in logs):
            assert time.monotonic() < deadline, "both runs should be waiting on the writer claim"
            assert all(p.poll() is None for p in procs), [log.read_text() for log in logs]
            time.sleep(0.2)
    for p in procs:
        p.wait(timeout=300)
    outputs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], outputs
    statuses = sorted(json.loads((tmp_path / f"s{i}.json").read_text())["stages"][0]["status"] for i in range(2))
    assert statuses == ["cached", "ran"]
    art = Artifact(workdir / "runs" / "integrity" / "read")
    ids = art.read_table(["id"]).column("id").to_pylist()
    assert len(ids) == len(set(ids)) == 40
    assert main(["verify", "--workdir", str(workdir)]) == 0
    assert not list((art.path / "shards").glob(".*")), "no temp files left behind"
