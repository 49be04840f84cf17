"""GPU placement on a real two-node Ray cluster whose driver has no CUDA: a CPU-only head and a
worker node that advertises one GPU (`ray start --num-gpus 1`; this machine has no CUDA, so the
GPU is a resource, not a device).

`label` with `num_gpus: 1` must ask Ray for the GPU (so its actor lands on the worker node and is
assigned the GPU), whatever the driver sees. The actor then finds no CUDA device on that node and
fails the run honestly with DeviceUnavailable naming the node and what Ray assigned it, instead of
labeling on the CPU under a CUDA cache key. The same manifest with `num_gpus: 0` runs on CPUs.
"""
from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from factories import tiny_bert_classifier
from test_multinode import Cluster

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent


class GpuWorkerCluster(Cluster):
    """Head: 1 CPU, no GPU. Worker: 1 CPU, 1 (fake) GPU."""

    def start(self) -> None:
        self._start("head", ["--head", f"--port={self.port}", "--include-dashboard=false", "--num-gpus=0"])
        self.wait_started("head")
        self.wait_nodes(1)
        self._start("worker", [f"--address={self.address}", "--num-gpus=1"])
        self.wait_started("worker")
        self.wait_nodes(2)


@pytest.fixture(scope="module")
def gpu_cluster():
    import torch

    if torch.cuda.is_available():
        pytest.skip("this host has CUDA; the test proves placement on a node without it")
    c = GpuWorkerCluster()
    try:
        c.start()
        yield c
    finally:
        c.teardown()


def _manifest(tmp: Path, num_gpus: float) -> Path:
    corpus = tmp / "corpus.tsv"
    corpus.write_text("sentence\tlabel\n" + "".join(f"a warm funny film {i}\t{i % 2}\n" for i in range(12)))
    teacher = tmp / "teacher"
    if not teacher.exists():
        tiny_bert_classifier(teacher, 2, ["negative", "positive"], sentences=["a warm funny film"])
    path = tmp / f"m{num_gpus:g}.yaml"
    path.write_text(yaml.safe_dump({"name": "gpu", "workdir": str(tmp / f"work{num_gpus:g}"), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(corpus), "text_column": "sentence",
                                                    "label_column": "label", "rows_per_shard": 6}},
        {"name": "label", "type": "label", "inputs": {"data": "read"},
         "config": {"teacher": str(teacher), "num_gpus": num_gpus, "concurrency": 1}},
    ]}))
    return path


def _run(manifest: Path, cluster: Cluster) -> tuple[int, str]:
    import subprocess

    proc = subprocess.run([sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--no-progress",
                           "--address", cluster.address], cwd=REPO, env=cluster.env, capture_output=True,
                          text=True, timeout=600)
    return proc.returncode, proc.stdout + proc.stderr


def test_label_asks_for_the_gpu_and_fails_honestly_without_cuda(gpu_cluster, tmp_path):
    code, out = _run(_manifest(tmp_path, 1), gpu_cluster)
    assert code == 1, out[-3000:]
    assert "stage 'label' was planned for CUDA (cuda/bfloat16)" in out, out[-3000:]
    assert "torch there sees no CUDA device" in out
    # What Ray assigned inside the label actor (get_assigned_resources), as reported by the actor.
    assigned = ast.literal_eval(re.search(r"assigned (\{[^}]*\})", out).group(1))
    assert assigned.get("GPU") == 1.0 and assigned.get("CPU") == 1.0, assigned
    assert not (tmp_path / "work1" / "runs" / "gpu" / "label").exists()  # no label artifact under any key


def test_without_a_gpu_request_label_runs_on_cpus(gpu_cluster, tmp_path):
    code, out = _run(_manifest(tmp_path, 0), gpu_cluster)
    assert code == 0, out[-3000:]
    shards = tmp_path / "work0" / "runs" / "gpu" / "label" / "shards"
    md = pq.read_schema(next(shards.glob("*.parquet"))).metadata
    assert md[b"kdpipe.device"] == b"cpu" and md[b"kdpipe.dtype"] == b"float32"
    assert yaml.safe_load(md[b"kdpipe.numerics"]) == {"device": "cpu", "dtype": "float32"}


def test_a_gpu_actor_prefetches_its_next_shard_and_a_cpu_actor_does_not(gpu_cluster, tmp_path):
    """While a GPU actor works on a shard it already holds the next one (read, then written, while
    the device computes); a CPU actor holds one, as prefetching would take the model's cores."""
    corpus = tmp_path / "corpus.tsv"
    corpus.write_text("sentence\tlabel\n" + "".join(f"row {i}\t{i % 2}\n" for i in range(40)))
    held = {}
    for num_gpus in (1, 0):
        path = tmp_path / f"split{num_gpus}.yaml"
        work = tmp_path / f"split_work{num_gpus}"
        path.write_text(yaml.safe_dump({"name": "split", "workdir": str(work), "stages": [
            {"name": "read", "type": "read", "config": {"path": str(corpus), "text_column": "sentence",
                                                        "label_column": "label", "rows_per_shard": 4}},
            {"name": "keep", "type": "split", "inputs": {"data": "read"},
             "config": {"fraction": 0.5, "num_gpus": num_gpus, "concurrency": 1}},
        ]}))
        code, out = _run(path, gpu_cluster)
        assert code == 0, out[-3000:]
        manifest = yaml.safe_load((work / "runs" / "split" / "keep" / "manifest.json").read_text())
        held[num_gpus] = manifest["timing"]["most_shards_held_by_an_actor"]
    assert held == {1: 2, 0: 1}
