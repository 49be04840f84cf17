"""A real two-node Ray cluster on this machine (`ray start` head + worker, separate processes with
one CPU each): `kdpipe run --address` spreads a map stage over both nodes, gives the same output
as a single-node run, and still completes correctly when the worker node is killed mid-stage.

Teardown kills exactly the process groups this test started (and any process carrying its
private temp dir), not `ray stop --force`, which would also stop other Ray sessions on the host.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
RAY = Path(sys.executable).with_name("ray")
SHARDS = 30


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ports() -> list[str]:
    """Distinct agent ports per node: two nodes on one host must not share the defaults."""
    return ["--dashboard-agent-listen-port", str(_free_port()), "--dashboard-agent-grpc-port", str(_free_port()),
            "--runtime-env-agent-port", str(_free_port()), "--metrics-export-port", str(_free_port()),
            "--node-manager-port", str(_free_port()), "--object-manager-port", str(_free_port())]


def _procs_with(text: str) -> list[int]:
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if text.encode() in cmdline.read_bytes():
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return [p for p in pids if p != os.getpid()]


class Cluster:
    def __init__(self):
        self.temp_dir = tempfile.mkdtemp(prefix="kdmn", dir="/tmp")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0"}
        self.groups: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, args: list[str]) -> None:
        log = open(Path(self.temp_dir) / f"{name}.log", "wb")
        self.groups[name] = subprocess.Popen(
            [str(RAY), "start", "--block", "--num-cpus=1", "--disable-usage-stats", "--node-ip-address=127.0.0.1",
             f"--temp-dir={self.temp_dir}", *_ports(), *args],
            env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def start(self) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false",
                             '--resources={"kd_head": 1}'])
        self.wait_started("head")
        self.wait_nodes(1)
        self._start("worker", [f"--address={self.address}", '--resources={"kd_worker": 1}'])
        self.wait_started("worker")
        self.wait_nodes(2)

    def wait_started(self, name: str, timeout: float = 300) -> None:
        """`ray start --block` prints this once the node's processes are up."""
        deadline = time.monotonic() + timeout
        while "Ray runtime started" not in self.log(name, tail=None):
            assert self.groups[name].poll() is None, f"ray {name} exited: {self.log(name)}"
            assert time.monotonic() < deadline, f"ray {name} did not start: {self.log(name)}"
            time.sleep(0.5)

    def alive_nodes(self) -> int:
        code = ("import ray, json; ray.init(address='%s', logging_level='ERROR');"
                "print(json.dumps(sum(1 for n in ray.nodes() if n['Alive'])))" % self.address)
        try:
            out = subprocess.run([sys.executable, "-c", code], env=self.env, capture_output=True, timeout=120)
        except subprocess.TimeoutExpired:
            return 0
        return int(out.stdout.decode().strip().splitlines()[-1]) if out.returncode == 0 else 0

    def wait_nodes(self, n: int, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for name, proc in self.groups.items():
                assert proc.poll() is None, f"ray {name} exited: {self.log(name)}"
            if self.alive_nodes() >= n:
                return
            time.sleep(1)
        raise AssertionError(f"cluster did not reach {n} nodes: {self.log('head')}")

    def log(self, name: str, tail: int | None = 2000) -> str:
        path = Path(self.temp_dir) / f"{name}.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return text[-tail:] if tail else text

    def kill(self, name: str) -> None:
        proc = self.groups.pop(name, None)
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    def teardown(self) -> None:
        for name in list(self.groups):
            self.kill(name)
        time.sleep(0.5)
        for pid in _procs_with(self.temp_dir):  # daemons that left the group, if any
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(self.temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        c.start()
        yield c
    finally:
        c.teardown()


def _manifest(tmp: Path, name: str) -> Path:
    corpus = tmp / "corpus.tsv"
    if not corpus.exists():
        words = ["a warm funny film", "the plot makes no sense", "two dogs play in the snow", "a woman reads a book"]
        corpus.write_text("sentence\tlabel\n" + "".join(f"{words[i % 4]} number {i}\t{i % 2}\n"
                                                         for i in range(SHARDS * 4)))
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": "mn", "workdir": str(tmp / name), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(corpus), "text_column": "sentence",
                                                    "label_column": "label", "rows_per_shard": 4}},
        {"name": "tag", "type": "pos_tag", "inputs": {"data": "read"}, "config": {"num_cpus": 1}},
        {"name": "keep", "type": "split", "inputs": {"data": "tag"}, "config": {"fraction": 0.7}},
    ]}))
    return path


def _run(manifest: Path, summary: Path, *, address: str | None, env: dict) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--no-progress",
           "--summary-json", str(summary)] + (["--address", address] if address else [])
    return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _finish(proc: subprocess.Popen, summary: Path, timeout: float = 600) -> dict[str, dict]:
    try:
        out = proc.communicate(timeout=timeout)[0].decode(errors="replace")
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out = proc.communicate()[0].decode(errors="replace")
        raise AssertionError(f"kdpipe run hung:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return {s["name"]: s for s in json.loads(summary.read_text())["stages"]}


def _tables(workdir: Path) -> dict:
    return {s: pq.read_table(workdir / "runs" / "mn" / s / "shards").sort_by("id") for s in ("read", "tag", "keep")}


@pytest.fixture(scope="module")
def single_node(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("mn")
    ray_tmp = tempfile.mkdtemp(prefix="kdms", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "KDPIPE_RAY_TMPDIR": ray_tmp}
    try:
        summary = _finish(_run(_manifest(tmp, "single"), tmp / "single.json", address=None, env=env),
                          tmp / "single.json")
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert summary["tag"]["status"] == "ran"
    return tmp, _tables(tmp / "single")


def test_stage_runs_on_both_nodes_and_equals_single_node(cluster, single_node):
    tmp, reference = single_node
    summary = _finish(_run(_manifest(tmp, "two"), tmp / "two.json", address=cluster.address, env=cluster.env),
                      tmp / "two.json")
    assert len(set(summary["tag"]["nodes"])) == 2, summary["tag"]
    assert summary["tag"]["shards_total"] == SHARDS
    got = _tables(tmp / "two")
    for stage, table in reference.items():
        assert got[stage].equals(table), f"{stage} differs from the single-node run"


def test_worker_node_killed_mid_stage_run_still_completes(cluster, single_node):
    tmp, reference = single_node
    workdir = tmp / "killed"
    proc = _run(_manifest(tmp, "killed"), tmp / "killed.json", address=cluster.address, env=cluster.env)
    deadline = time.monotonic() + 300
    done_at_kill = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            markers = list((workdir / "artifacts" / "pos_tag").glob("*/completions/*.json"))
            if len(markers) >= 3:
                cluster.kill("worker")
                done_at_kill = len(markers)
                break
            time.sleep(0.02)
        assert done_at_kill is not None and done_at_kill < SHARDS, "the worker node was not killed mid-stage"
        summary = _finish(proc, tmp / "killed.json")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert summary["tag"]["shards_total"] == SHARDS
    got = _tables(workdir)
    for stage, table in reference.items():
        ids = got[stage].column("id").to_pylist()
        assert len(ids) == len(set(ids)), f"{stage}: duplicated rows"
        assert got[stage].equals(table), f"{stage} differs from the single-node run"
    from pipeline.cli import main

    assert main(["verify", "mn", "--workdir", str(workdir)]) == 0
