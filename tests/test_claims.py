"""Claims instead of a workdir lock: exclusive writer claims with expiry and dead-owner takeover,
gc that never deletes what a running stage reads or writes, and map stages that address their
input shards by the upstream manifest's index."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline import storage
from pipeline.claims import Claims, live_uses

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["local", "s3"])
def workdir(request, tmp_path) -> str:
    return str(tmp_path / "wd") if request.param == "local" else request.getfixturevalue("s3_workdir")


def test_writer_claim_is_exclusive_and_released(workdir):
    art = storage.join(workdir, "artifacts", "label", "k1")
    with Claims(workdir, run="a") as a, Claims(workdir, run="b") as b:
        assert a._try_take(a.writer_loc(art)) is None
        other = b._try_take(b.writer_loc(art))
        assert other is not None and other["run"] == "a"
        assert live_uses(workdir) == {"label/k1": "a"}
        a.release_writer(art)
        assert b._try_take(b.writer_loc(art)) is None
    assert live_uses(workdir) == {}
    assert storage.list_files(storage.join(workdir, "claims")) == {}, "claims are removed on exit"


def test_expired_lease_of_a_dead_owner_is_taken_over(workdir):
    art = storage.join(workdir, "artifacts", "label", "k2")
    a = Claims(workdir, run="a", ttl_s=1.0)
    loc = a.writer_loc(art)
    # A lease of an owner on another host that stopped renewing it (no heartbeat thread).
    storage.write_json(loc, {"owner": "other-host-1", "host": "elsewhere", "pid": 1, "run": "dead",
                             "expires_at": time.time() + 1.0})
    with Claims(workdir, run="b", ttl_s=1.0) as b:
        assert b._try_take(loc)["run"] == "dead"
        t0 = time.monotonic()
        b.acquire(loc, what="test")
        assert time.monotonic() - t0 < 10
        assert json.loads(storage.read_bytes(loc))["run"] == "b"


def test_lease_of_a_dead_process_on_this_host_is_void_at_once(tmp_path):
    import socket

    workdir = str(tmp_path / "wd")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    with Claims(workdir, run="b", ttl_s=3600) as b:
        loc = b.writer_loc(storage.join(workdir, "artifacts", "t", "k"))
        storage.write_json(loc, {"owner": "x", "host": socket.gethostname(), "pid": dead.pid, "run": "killed",
                                 "expires_at": time.time() + 3600})
        assert b._try_take(loc) is None


def test_heartbeat_keeps_a_lease_alive_past_its_ttl(workdir):
    with Claims(workdir, run="a", ttl_s=1.0) as a:
        a.declare([storage.join(workdir, "artifacts", "train", "k3")])
        time.sleep(2.5)
        assert live_uses(workdir) == {"train/k3": "a"}


# --- gc against a concurrent run, shards by index (local workdir; both fail on 97763dc) ---------

def _ray_env(tag: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "KDPIPE_RAY_TMPDIR": f"/tmp/kdc{os.getpid()}{tag}"}


@pytest.mark.slow
def test_gc_during_a_run_keeps_what_the_running_stage_writes(tmp_path):
    """gc runs while label is half done (its artifact has no alias yet): it must keep it, and the
    run must finish with a complete, verified artifact. On 97763dc gc deleted it mid-stage."""
    import shutil

    from crash_helpers import crash_manifest_file
    from pipeline.cli import main
    from pipeline.model_store import folder_digest, store_model

    wd = tmp_path / "wd"
    manifest = crash_manifest_file(tmp_path, wd)
    env = _ray_env("gc")
    log = tmp_path / "run.log"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--no-progress"],
                            cwd=REPO, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        label_root = wd / "artifacts" / "label"
        deadline = time.monotonic() + 600
        while not (label_root.is_dir() and any(len(list((a / "completions").glob("*.json"))) >= 2
                                               for a in label_root.iterdir())):
            assert proc.poll() is None, log.read_text()[-3000:]
            assert time.monotonic() < deadline, "label never started"
            time.sleep(0.1)
        (label_art,) = list(label_root.iterdir())
        stale = wd / "artifacts" / "read" / ("0" * 20)
        stale.mkdir(parents=True)  # an unreferenced artifact gc must still remove
        (stale / "manifest.json").write_text("{}")
        orphan = tmp_path / "orphan"  # a stored model no artifact loaded
        orphan.mkdir()
        (orphan / "config.json").write_text("{}")
        orphan_loc = store_model(orphan, wd)
        assert main(["gc", "--workdir", str(wd)]) == 0
        assert label_art.is_dir() and (label_art / "completions").is_dir(), "gc deleted the running stage's artifact"
        assert not stale.exists()
        assert Path(orphan_loc).is_dir(), "gc removed a stored model while a run was live"
        assert proc.wait(timeout=600) == 0, log.read_text()[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(env["KDPIPE_RAY_TMPDIR"], ignore_errors=True)
    teacher = folder_digest(tmp_path / "teacher")
    assert json.loads((label_art / "manifest.json").read_text())["models"] == {"teacher teacher": teacher}
    assert main(["gc", "--workdir", str(wd)]) == 0
    assert sorted(p.name for p in (wd / "models").iterdir()) == [teacher], \
        "gc must remove the model no artifact loaded and keep the teacher the aliased label artifact loaded"
    assert main(["verify", "--workdir", str(wd)]) == 0


@pytest.mark.ray
def test_missing_input_shard_of_an_external_artifact_is_an_error_naming_it(tmp_path, sentiment_tsv, ray_session):
    """@RUN/STAGE input with shard 00001 deleted: on 97763dc every later shard shifted silently."""
    from pipeline.errors import StageFailed
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    wd = tmp_path / "wd"
    first = {"name": "src", "workdir": str(wd), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(sentiment_tsv), "text_column": "sentence",
                                                    "label_column": "label", "rows_per_shard": 10}}]}
    (read,) = run_graph(build_graph(parse_manifest(first)), progress=False, log=lambda *a: None)
    assert read["shards_total"] == 4
    (Path(read["path"]) / "shards" / "00001.parquet").unlink()
    second = {"name": "use", "workdir": str(wd), "stages": [
        {"name": "half", "type": "split", "inputs": {"data": "@src/read"}, "config": {"fraction": 0.5}}]}
    with pytest.raises(StageFailed, match=r"00001\.parquet"):
        run_graph(build_graph(parse_manifest(second)), progress=False, log=lambda *a: None)
    assert not list((wd / "artifacts" / "split").glob("*/manifest.json")), "nothing half-made is committed"
