"""A real two-node Ray cluster (`ray start` head + worker, one CPU each) on an s3:// workdir (moto on
loopback), with a hub teacher pinned by revision that only the driver has in its HF cache: the
nodes run with an empty HF cache, as GPU workers that share no disk would.

* The teacher is stored once in the bucket (`models/<digest>/`, shared by `label` and by
  `finetune`, whose base model it also is) and the actors on both nodes load it from there;
  before teachers were stored, every actor failed to find it. The fine-tuned teacher, which
  exists only in the bucket, is loaded by label actors on both nodes.
* The worker node killed (kill -9 of its raylet and workers) mid-label: the run completes on the
  head and its label output is identical to the uninterrupted run's.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from factories import tiny_bert_classifier
from test_model_store import SHA, fake_hub_cache
from test_multinode import Cluster, _finish

from pipeline import storage
from pipeline.artifact import read_alias

pytestmark = [pytest.mark.multinode, pytest.mark.slow]

REPO = Path(__file__).resolve().parent.parent
REPO_ID = "kdpipe-test/tiny-teacher"
SHARDS, ROWS = 60, 4


@pytest.fixture(scope="module")
def s3_cluster(s3_server, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("s3c")
    (tmp / "empty-hf").mkdir()
    teacher = tiny_bert_classifier(tmp / "teacher", 2, ["negative", "positive"], sentences=["a warm funny film"])
    driver_hf = fake_hub_cache(tmp / "driver-hf", REPO_ID, teacher)
    c = Cluster()  # after s3_server: the nodes inherit AWS_ENDPOINT_URL and the dummy keys
    c.env.update(HF_HUB_CACHE=str(tmp / "empty-hf"), KDPIPE_CACHE_DIR=str(tmp / "node-cache"))
    try:
        c.start()
        yield c, tmp, {**c.env, "HF_HUB_CACHE": str(driver_hf)}
    finally:
        c.teardown()


def _manifest(tmp: Path, workdir: str, name: str, *, finetune: bool = False) -> Path:
    corpus = tmp / "corpus.tsv"
    if not corpus.exists():
        words = ["a warm funny film", "the plot makes no sense", "two dogs play in the snow", "a dull mess"]
        corpus.write_text("sentence\tlabel\n" + "".join(f"{words[i % 4]} number {i}\t{i % 2}\n"
                                                         for i in range(SHARDS * ROWS)))
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump({"name": "s3c", "workdir": workdir, "stages": [
        {"name": "read", "type": "read", "config": {"path": str(corpus), "text_column": "sentence",
                                                    "label_column": "label", "rows_per_shard": ROWS}},
        {"name": "label", "type": "label", "inputs": {"data": "read"},
         "config": {"teacher": REPO_ID, "revision": SHA, "concurrency": 2}},
    ] + ([  # the same hub model as a base to fine-tune, and the fine-tuned teacher labeling
        {"name": "ft", "type": "finetune", "inputs": {"data": "read"},
         "config": {"base_model": REPO_ID, "revision": SHA, "epochs": 1, "num_cpus": 1}},
        {"name": "label_ft", "type": "label", "inputs": {"data": "read", "teacher": "ft"},
         "config": {"concurrency": 2}},
    ] if finetune else [])}))
    return path


def _start(manifest: Path, summary: Path, cluster: Cluster, env: dict) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline.cli", "run", str(manifest), "--no-progress",
                             "--summary-json", str(summary), "--address", cluster.address],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)


def _label_markers(workdir: str) -> int:
    root = storage.join(workdir, "artifacts", "label")
    return sum(len(storage.list_files(storage.join(root, key, "completions"))) for key in storage.list_dir(root))


@pytest.fixture(scope="module")
def reference(s3_cluster):
    cluster, tmp, env = s3_cluster
    workdir = "s3://kdpipe-test/cluster-ref"
    summary = _finish(_start(_manifest(tmp, workdir, "ref", finetune=True), tmp / "ref.json", cluster, env),
                      tmp / "ref.json")
    return workdir, summary, read_alias(workdir, "s3c", "label").read_table().sort_by("id")


def test_hub_teacher_is_stored_once_and_every_node_loads_it_from_the_bucket(reference):
    workdir, summary, table = reference
    assert summary["label"]["status"] == "ran" and summary["label"]["shards_total"] == SHARDS
    assert len(set(summary["label"]["nodes"])) == 2, summary["label"]  # actors on both nodes
    assert table.num_rows == SHARDS * ROWS
    # finetune's base model is the same hub snapshot: stored once for both stages.
    stored = storage.list_dir(storage.join(workdir, "models"))
    assert len(stored) == 1, stored
    digest = next(iter(stored))
    manifest = storage.read_json(storage.join(workdir, "models", digest, "manifest.json"))
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(manifest["files"])
    fingerprint = read_alias(workdir, "s3c", "label").manifest["key_parts"]["fingerprint"]
    assert list(fingerprint) == ["teacher tiny-teacher"]  # the snapshot's content stays in the key


def test_fine_tuned_teacher_is_read_from_the_bucket_on_both_nodes(reference):
    """The finetune artifact exists only in the bucket (its task's local folder is removed when it
    is uploaded): label actors on both nodes load it through the storage layer."""
    workdir, summary, _ = reference
    assert summary["ft"]["status"] == "ran" and summary["label_ft"]["status"] == "ran"
    assert len(set(summary["label_ft"]["nodes"])) == 2, summary["label_ft"]
    assert storage.is_file(storage.join(summary["ft"]["path"], "files", "model", "model.safetensors"))
    labels = read_alias(workdir, "s3c", "label_ft").read_table()
    assert labels.num_rows == SHARDS * ROWS and "logits" in labels.column_names


def test_worker_node_killed_mid_label_on_s3_run_completes_with_identical_output(s3_cluster, reference):
    cluster, tmp, env = s3_cluster
    workdir = "s3://kdpipe-test/cluster-killed"
    proc = _start(_manifest(tmp, workdir, "killed"), tmp / "killed.json", cluster, env)
    done_at_kill = None
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and proc.poll() is None:
            done = _label_markers(workdir)
            if done >= 2:
                cluster.kill("worker")  # SIGKILL to the node's process group: raylet and workers
                done_at_kill = done
                break
            time.sleep(0.1)
        assert done_at_kill is not None and done_at_kill < SHARDS, "the worker node was not killed mid-label"
        summary = _finish(proc, tmp / "killed.json")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert summary["label"]["shards_total"] == SHARDS
    got = read_alias(workdir, "s3c", "label").read_table().sort_by("id")
    ids = got.column("id").to_pylist()
    assert len(ids) == len(set(ids)) == SHARDS * ROWS
    assert got.equals(reference[2]), "label output differs from the uninterrupted run"
    from pipeline.cli import main

    assert main(["verify", "s3c", "--workdir", workdir]) == 0
