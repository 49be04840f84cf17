"""Crash survival: SIGKILL the driver (and its embedded Ray) during augment, label and train; kill
a map actor and a training worker mid-stage. Every rerun finishes only the missing work, and every
final artifact equals an uninterrupted run's (same ids, equal values, equal student weights)."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import pyarrow.parquet as pq
import pytest
import yaml

from factories import tiny_bert_classifier

REPO = Path(__file__).resolve().parent.parent
POS = ["a warm , funny and touching film", "the cast is terrific", "an absolute joy to watch",
       "smart and beautifully made", "one of the best films of the year", "i loved every minute of it"]
NEG = ["a dull , lifeless mess", "the plot makes no sense", "painfully boring from start to finish",
       "the worst acting i have seen", "a waste of a good cast", "i wanted my money back"]
MAP_STAGES = ("read", "tag", "aug", "label")
ROWS, ROWS_PER_SHARD, SHARDS, EPOCHS = 200, 5, 40, 6


def write_corpus(path: Path, rows: int) -> Path:
    lines = ["sentence\tlabel"]
    for i in range(rows):
        text = (POS if i % 2 else NEG)[i // 2 % 6]
        lines.append(f"{text} number {i}\t{i % 2}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def pipeline_manifest(workdir: Path, corpus: Path, teacher: Path, *, rows_per_shard: int = ROWS_PER_SHARD,
                      epochs: int = EPOCHS) -> dict:
    """read -> pos_tag -> unigram -> augment -> label -> train, many small shards."""
    return {"name": "crash", "workdir": str(workdir), "seed": 7, "stages": [
        {"name": "read", "type": "read", "config": {"path": str(corpus), "text_column": "sentence",
                                                    "label_column": "label", "label_names": ["neg", "pos"],
                                                    "rows_per_shard": rows_per_shard}},
        {"name": "tag", "type": "pos_tag", "inputs": {"data": "read"}},
        {"name": "uni", "type": "unigram", "inputs": {"data": "tag"}},
        {"name": "aug", "type": "augment", "inputs": {"data": "tag", "table": "uni"},
         "config": {"n_iter": 3, "p_mask": 0.2, "p_pos": 0.2}},
        {"name": "label", "type": "label", "inputs": {"data": "aug"},
         "config": {"teacher": str(teacher), "device": "cpu", "batch_size": 64}},
        {"name": "train", "type": "train", "inputs": {"data": "aug", "labels": ["label"]},
         "config": {"student": {"type": "bilstm", "embedding_dim": 16, "hidden_dim": 16, "mlp_dim": 16},
                    "losses": {"ce": 0.0, "mse": 1.0}, "epochs": epochs, "batch_size": 16, "lr": 3e-3}},
    ]}


# --- driving `kdpipe run` as a killable subprocess ------------------------------------------------

RAY_TMP = f"/tmp/kdx{os.getpid()}"  # Ray's socket paths must stay short: not under tmp_path


@pytest.fixture(scope="module", autouse=True)
def _remove_ray_temp_dirs():
    yield
    import glob
    import shutil

    for path in glob.glob(f"{RAY_TMP}*"):
        shutil.rmtree(path, ignore_errors=True)


def _env(tag: str) -> dict[str, str]:
    return {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
            "KDPIPE_RAY_TMPDIR": f"{RAY_TMP}{tag}"}


def _cmd(manifest: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--no-progress", *extra]


def _session_processes(session_id: int) -> list[int]:
    """PIDs still alive in a session (the killed driver's Ray daemons would show up here)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == session_id and fields[0] != "Z":
            pids.append(int(stat.parent.name))
    return pids


def run_until_killed(cmd: list[str], env: dict[str, str], ready: Callable[[], bool], *,
                     timeout: float = 600) -> None:
    """Start cmd in its own session, SIGKILL the whole group once ready() holds, and check that
    no process of it (driver, raylet, GCS, workers) survives."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    reached = False
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ready():
                reached = True
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None:
            # The whole session, as a lost machine would: Ray workers run in process groups of
            # their own and would otherwise keep computing until they notice the raylet died.
            os.killpg(proc.pid, signal.SIGKILL)
            for pid in _session_processes(proc.pid):
                _kill(pid)
        output = proc.communicate()[0].decode(errors="replace")
    assert reached, f"the kill point was never reached (exit {proc.returncode}):\n{output[-3000:]}"
    for _ in range(100):
        if not _session_processes(proc.pid):
            break
        time.sleep(0.1)
    stray = _session_processes(proc.pid)
    for pid in stray:  # do not leak them into other tests, but fail
        _kill(pid)
    assert not stray, f"processes of the killed run survived: {stray}"


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_to_end(cmd: list[str], env: dict[str, str], summary: Path) -> dict[str, dict]:
    done = subprocess.run(cmd + ["--summary-json", str(summary)], cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=900)
    assert done.returncode == 0, done.stdout.decode(errors="replace")[-3000:]
    return {s["name"]: s for s in json.loads(summary.read_text())["stages"]}


def _art(workdir: Path, stage_type: str) -> Path | None:
    found = [p for p in (workdir / "artifacts" / stage_type).glob("*") if p.is_dir()] \
        if (workdir / "artifacts" / stage_type).is_dir() else []
    return found[0] if len(found) == 1 else None


def _markers(workdir: Path, stage_type: str) -> dict[str, tuple[int, int]]:
    """Completion marker -> (inode, mtime_ns) of its shard: proof a shard was not rewritten."""
    art = _art(workdir, stage_type)
    if art is None or not (art / "completions").is_dir():
        return {}
    out = {}
    for marker in (art / "completions").glob("*.json"):
        shard = art / "shards" / f"{marker.stem}.parquet"
        try:
            st = shard.stat()
        except FileNotFoundError:
            continue
        out[marker.stem] = (st.st_ino, st.st_mtime_ns)
    return out


def _ready_markers(workdir: Path, stage_type: str, k: int) -> Callable[[], bool]:
    return lambda: len(_markers(workdir, stage_type)) >= k


def _train_epoch(workdir: Path) -> int:
    art = _art(workdir, "train")
    try:
        return json.loads((art / "scratch" / "state.json").read_text())["epoch"] if art else 0
    except (OSError, ValueError, KeyError):
        return 0


def _table(workdir: Path, stage: str):
    return pq.read_table(workdir / "runs" / "crash" / stage / "shards").sort_by("id")


def _student_tensors(workdir: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(workdir / "runs" / "crash" / "train" / "files" / "student" / "model.safetensors"))


@pytest.fixture(scope="module")
def crash_inputs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("crash")
    corpus = write_corpus(tmp / "corpus.tsv", ROWS)
    teacher = tiny_bert_classifier(tmp / "teacher", num_labels=2, label_names=["neg", "pos"])
    return tmp, corpus, teacher


@pytest.fixture(scope="module")
def clean_run(crash_inputs) -> Path:
    """The reference: the same manifest run once without interruption (its workdir)."""
    tmp, corpus, teacher = crash_inputs
    clean_wd, clean = tmp / "clean", tmp / "clean.yaml"
    clean.write_text(yaml.safe_dump(pipeline_manifest(clean_wd, corpus, teacher)))
    summary = run_to_end(_cmd(clean), _env("c"), tmp / "clean.json")
    assert all(s["status"] == "ran" for s in summary.values())
    return clean_wd


def copy_store_without(src: Path, dst: Path, *stage_types: str) -> None:
    """A workdir holding the reference's upstream artifacts, minus the stages under test."""
    import shutil

    shutil.copytree(src, dst, symlinks=True)
    for stage_type in stage_types:
        shutil.rmtree(dst / "artifacts" / stage_type)


@pytest.mark.slow
def test_sigkill_during_augment_label_and_train_then_resume_equals_clean_run(crash_inputs, clean_run):
    tmp, corpus, teacher = crash_inputs
    crashed_wd, clean_wd = tmp / "crashed", clean_run
    crashed = tmp / "crashed.yaml"
    crashed.write_text(yaml.safe_dump(pipeline_manifest(crashed_wd, corpus, teacher)))
    env = _env("a")
    faults = 0

    # 1-2. Kill during augment; the rerun (up to augment) writes exactly the missing shards.
    for stage, stage_type in (("aug", "augment"), ("label", "label")):
        run_until_killed(_cmd(crashed, "--to", stage), env, _ready_markers(crashed_wd, stage_type, 3))
        faults += 1
        before = _markers(crashed_wd, stage_type)
        summary = run_to_end(_cmd(crashed, "--to", stage), env, tmp / f"{stage}.json")
        entry = summary[stage]
        assert entry["status"] == "resumed", entry
        assert entry["shards_total"] == SHARDS and len(before) < SHARDS
        assert entry["shards_run"] == entry["shards_total"] - len(before)
        after = _markers(crashed_wd, stage_type)
        assert len(after) == SHARDS
        assert {k: after[k] for k in before} == before, "a finished shard was rewritten"
        assert all(summary[s]["status"] == "cached" for s in MAP_STAGES[: MAP_STAGES.index(stage)])

    # 3. Kill the training task after its second epoch checkpoint; the rerun resumes from it.
    run_until_killed(_cmd(crashed), env, lambda: _train_epoch(crashed_wd) >= 2)
    faults += 1
    epoch_at_kill = _train_epoch(crashed_wd)
    assert 2 <= epoch_at_kill < EPOCHS, "training was not interrupted mid-way"
    summary = run_to_end(_cmd(crashed), env, tmp / "train.json")
    assert summary["train"]["status"] == "resumed"
    assert all(summary[s]["status"] == "cached" for s in MAP_STAGES)
    metrics = json.loads((crashed_wd / "runs" / "crash" / "train" / "files" / "metrics.json").read_text())
    assert metrics.get("resumed_from_epoch") == epoch_at_kill, metrics

    # The uninterrupted run in another workdir gave the same artifacts.
    rows = 0
    for stage in MAP_STAGES:
        a, b = _table(crashed_wd, stage), _table(clean_wd, stage)
        ids = a.column("id").to_pylist()
        assert len(ids) == len(set(ids)), f"{stage}: duplicated rows"
        assert a.num_rows == b.num_rows and a.equals(b), f"{stage} differs from the uninterrupted run"
        rows += a.num_rows
    ta, tb = _student_tensors(crashed_wd), _student_tensors(clean_wd)
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta), "student weights differ"
    assert faults == 3 and rows > 3 * ROWS
    from pipeline.cli import main

    assert main(["verify", "crash", "--workdir", str(crashed_wd)]) == 0


# --- killing workers inside a live run ------------------------------------------------------------

def _children(ppid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == ppid:
            out.append(int(stat.parent.name))
    return out


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def worker_pids(ray, marker: str) -> list[int]:
    """PIDs of this Ray session's worker processes whose title contains `marker` (Ray names them
    `ray::<Class>.<method>`): only children of our own raylet, never another session's."""
    node = ray._private.worker.global_worker.node
    raylet = node.all_processes["raylet"][0].process.pid
    return [pid for pid in _children(raylet) if marker in _cmdline(pid)]


class Killer(threading.Thread):
    """Once `ready()` holds, SIGKILL one worker process whose title contains `marker`."""

    def __init__(self, ray, marker: str, ready: Callable[[], bool], when: Callable[[], str]):
        super().__init__(daemon=True)
        self.ray, self.marker, self.ready, self.when = ray, marker, ready, when
        self.killed: int | None = None
        self.state_at_kill: str | None = None
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            if self.ready():
                pids = worker_pids(self.ray, self.marker)
                if pids:
                    self.state_at_kill = self.when()
                    os.kill(pids[0], signal.SIGKILL)
                    self.killed = pids[0]
                    return
            time.sleep(0.01)


def _run_in_process(manifest: dict):
    from pipeline.graph import build_graph
    from pipeline.manifest import parse_manifest
    from pipeline.runner import run_graph

    return {s["name"]: s for s in run_graph(build_graph(parse_manifest(manifest)), progress=False,
                                            log=lambda *a: None)}


def _map_only(manifest: dict, last: str) -> dict:
    names = [s["name"] for s in manifest["stages"]]
    return {**manifest, "stages": manifest["stages"][: names.index(last) + 1]}


@pytest.mark.ray
@pytest.mark.slow
def test_killed_map_actor_is_replaced_and_the_stage_completes(crash_inputs, clean_run, ray_session, tmp_path):
    _, corpus, teacher = crash_inputs
    killed_wd, clean_wd = tmp_path / "killed", clean_run
    copy_store_without(clean_wd, killed_wd, "augment", "label", "train")
    manifest = _map_only(pipeline_manifest(killed_wd, corpus, teacher), "aug")

    killer = Killer(ray_session, "_ShardWorkerImpl", _ready_markers(killed_wd, "augment", 3),
                    lambda: str(len(_markers(killed_wd, "augment"))))
    killer.start()
    try:
        summary = _run_in_process(manifest)
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "no augment actor was killed"
    assert int(killer.state_at_kill) < SHARDS, "the actor was killed after the stage had finished"
    assert not Path(f"/proc/{killer.killed}").exists() or "_ShardWorkerImpl" not in _cmdline(killer.killed)
    assert summary["aug"]["status"] == "ran" and summary["aug"]["shards_total"] == SHARDS

    assert all(summary[s]["status"] == "cached" for s in ("read", "tag", "uni"))
    a = pq.read_table(killed_wd / "runs" / "crash" / "aug" / "shards").sort_by("id")
    b = pq.read_table(clean_wd / "runs" / "crash" / "aug" / "shards").sort_by("id")
    assert len(set(a.column("id").to_pylist())) == a.num_rows and a.equals(b)


@pytest.mark.ray
@pytest.mark.slow
def test_killed_training_worker_is_retried_and_resumes_from_its_checkpoint(crash_inputs, clean_run, ray_session,
                                                                          tmp_path):
    _, corpus, teacher = crash_inputs
    killed_wd, clean_wd = tmp_path / "killed", clean_run
    copy_store_without(clean_wd, killed_wd, "train")
    killer = Killer(ray_session, "_run_task_impl", lambda: _train_epoch(killed_wd) >= 2,
                    lambda: str(_train_epoch(killed_wd)))
    killer.start()
    try:
        summary = _run_in_process(pipeline_manifest(killed_wd, corpus, teacher))
    finally:
        killer.stop.set()
        killer.join()
    assert killer.killed is not None, "the training worker was never killed"
    epoch_at_kill = int(killer.state_at_kill)
    assert 2 <= epoch_at_kill < EPOCHS
    assert summary["train"]["status"] == "ran"
    metrics = json.loads((killed_wd / "runs" / "crash" / "train" / "files" / "metrics.json").read_text())
    assert metrics.get("resumed_from_epoch") == epoch_at_kill, metrics

    assert all(summary[s]["status"] == "cached" for s in MAP_STAGES)
    ta, tb = _student_tensors(killed_wd), _student_tensors(clean_wd)
    assert ta.keys() == tb.keys() and all((ta[k] == tb[k]).all() for k in ta), "student weights differ"


@pytest.mark.ray
@pytest.mark.slow
def test_worker_setup_that_always_fails_ends_the_run_with_exit_1(crash_inputs, ray_session, tmp_path, capsys):
    """Damaged teacher weights pass validation (the files exist) but fail in every actor's setup:
    the run stops after 3 attempts with one error line, and the label artifact is not completed."""
    import shutil

    from pipeline.cli import main

    _, corpus, teacher = crash_inputs
    broken = tmp_path / "broken_teacher"
    shutil.copytree(teacher, broken)
    (broken / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    manifest = pipeline_manifest(tmp_path / "wd", corpus, broken)
    manifest["stages"] = [s for s in manifest["stages"] if s["name"] in ("read", "label")]
    manifest["stages"][1]["inputs"] = {"data": "read"}
    manifest["stages"][1]["config"]["text_column"] = "text"
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    code = main(["run", str(path), "--no-progress"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert code == 1 and len(err) == 1 and "label" in err[0] and "failed to start 3 times" in err[0], err
    (label_dir,) = (tmp_path / "wd" / "artifacts" / "label").iterdir()
    assert not (label_dir / "manifest.json").exists()
    assert not any((label_dir / "completions").glob("*.json"))
