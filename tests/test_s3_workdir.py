"""End to end on an s3:// workdir (moto's S3 server on loopback, reached through the standard
AWS_* variables only): the crash manifest completes; a kill -9 of the driver mid-label and a
rerun give exactly the output of an uninterrupted local run; the next rerun is fully cached;
verify, ls, inspect and gc work on the bucket; two concurrent runs sharing one label artifact
train different students at the same time."""
from __future__ import annotations

import json
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import yaml

from crash_helpers import crash_manifest_file
from pipeline import storage
from pipeline.artifact import read_alias
from pipeline.cli import main
from test_crash import REPO, _cmd, _env, run_to_end, run_until_killed

pytestmark = pytest.mark.slow
EPOCHS = 2


def _label_markers(workdir: str) -> int:
    root = storage.join(workdir, "artifacts", "label")
    return sum(len(storage.list_files(storage.join(root, key, "completions")))
               for key in storage.list_dir(root))


def _every(seconds: float, check):
    """check() at most every `seconds` (each S3 listing is an HTTP round trip)."""
    last = [0.0, False]

    def ready() -> bool:
        if time.monotonic() - last[0] >= seconds:
            last[0], last[1] = time.monotonic(), check()
        return last[1]
    return ready


def _student(workdir: str):
    from safetensors.numpy import load_file

    art = read_alias(workdir, "crash", "train")
    return load_file(str(art.files_dir / "student" / "model.safetensors"))


def test_s3_workdir_end_to_end_with_a_kill_mid_label(tmp_path, s3_workdir, capsys):
    wd = s3_workdir
    clean_wd = tmp_path / "clean"
    clean = crash_manifest_file(tmp_path, clean_wd, name="crash", epochs=EPOCHS)
    shutil.copy(clean, tmp_path / "clean.yaml")
    run_to_end(_cmd(tmp_path / "clean.yaml"), _env("l"), tmp_path / "clean.json")
    manifest = crash_manifest_file(tmp_path, wd, name="crash", epochs=EPOCHS)
    env = _env("s")

    run_until_killed(_cmd(manifest), env, _every(0.3, lambda: _label_markers(wd) >= 3))
    done_at_kill = _label_markers(wd)
    assert 3 <= done_at_kill < 40
    summary = run_to_end(_cmd(manifest), env, tmp_path / "resumed.json")
    assert summary["label"]["status"] == "resumed"
    assert summary["label"]["shards_run"] == 40 - done_at_kill
    assert all(summary[s]["status"] == "cached" for s in ("read", "tag", "uni", "aug"))
    assert summary["train"]["status"] == "ran"

    again = run_to_end(_cmd(manifest), env, tmp_path / "again.json")
    assert {s["status"] for s in again.values()} == {"cached"}, again

    for stage in ("read", "tag", "aug", "label"):
        a = read_alias(wd, "crash", stage).read_table().sort_by("id")
        b = read_alias(clean_wd, "crash", stage).read_table().sort_by("id")
        assert a.num_rows == b.num_rows and a.equals(b), f"{stage}: S3 run differs from the local run"
    ta, tb = _student(wd), _student(str(clean_wd))
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta), "student weights differ"

    # The CLI on the bucket.
    capsys.readouterr()
    assert main(["verify", "--workdir", wd]) == 0
    assert main(["ls", "--workdir", wd]) == 0
    assert "label" in capsys.readouterr().out
    assert main(["inspect", "crash/label", "--workdir", wd]) == 0
    assert "logits" in capsys.readouterr().out
    stale = storage.join(wd, "artifacts", "read", "0" * 20)
    storage.write_json(storage.join(stale, "manifest.json"), {})
    assert main(["gc", "--workdir", wd]) == 0
    assert not storage.exists(storage.join(stale, "manifest.json"))
    assert main(["verify", "--workdir", wd]) == 0, "gc removed something a run alias points to"
    bad = read_alias(wd, "crash", "label").shard_path(5)
    storage.write_bytes(bad, storage.read_bytes(bad)[:100])
    assert main(["verify", "crash/label", "--workdir", wd]) == 1
    assert str(bad) in capsys.readouterr().err


def _sweep_manifest(tmp: Path, workdir: str, name: str, hidden: int) -> Path:
    base = yaml.safe_load(crash_manifest_file(tmp, workdir, name=name).read_text())
    read, label, train = base["stages"][0], base["stages"][4], base["stages"][5]
    label["inputs"] = {"data": "read"}
    train["inputs"] = {"data": "read", "labels": ["label"]}
    train["config"]["student"].update(hidden_dim=hidden)
    train["config"]["epochs"] = 30
    base["stages"] = [read, label, train]
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


def test_two_runs_share_one_label_artifact_and_train_students_in_parallel(tmp_path, s3_workdir):
    manifests = [_sweep_manifest(tmp_path, s3_workdir, f"sweep{i}", hidden) for i, hidden in enumerate((16, 24))]
    procs, logs = [], []
    for i, manifest in enumerate(manifests):
        logs.append(tmp_path / f"sweep{i}.log")
        procs.append(subprocess.Popen(_cmd(manifest, "--summary-json", str(tmp_path / f"sweep{i}.json")),
                                      cwd=REPO, env=_env(f"w{i}"), stdout=logs[-1].open("w"),
                                      stderr=subprocess.STDOUT, start_new_session=True))
    try:
        for proc, log in zip(procs, logs):
            assert proc.wait(timeout=900) == 0, log.read_text()[-3000:]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    runs = [{s["name"]: s for s in json.loads((tmp_path / f"sweep{i}.json").read_text())["stages"]}
            for i in range(2)]
    assert sorted(r["label"]["status"] for r in runs) == ["cached", "ran"], "label computed once"
    assert runs[0]["label"]["key"] == runs[1]["label"]["key"]
    assert all(r["train"]["status"] == "ran" for r in runs)
    assert runs[0]["train"]["key"] != runs[1]["train"]["key"]
    a, b = runs[0]["train"], runs[1]["train"]
    assert a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"], \
        f"the two trainings did not overlap: {a['started_at']}-{a['finished_at']} vs {b['started_at']}-{b['finished_at']}"
    assert main(["verify", "--workdir", s3_workdir]) == 0
