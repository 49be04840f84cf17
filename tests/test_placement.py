"""Resources per stage, decided by config and the cluster (never by the driver's hardware):
GPU requests that no node can hold fail at once and write nothing, busy clusters are waited on
for at most `ray.placement_timeout`, resolved device/dtype are part of the cache key, and a
worker planned for CUDA that has none fails instead of computing on the CPU under a CUDA key."""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest
import yaml
from factories import tiny_bert_classifier

# Only modules that predate this feature at top level: the behaviour tests must fail, not
# crash on import, when run against the code before it (97763dc).
from pipeline.errors import ManifestError
from pipeline.graph import build_graph
from pipeline.manifest import parse_manifest
from pipeline.plan import make_plan
from pipeline.registry import get_stage_class, stage_types

REPO = Path(__file__).resolve().parent.parent
NUMERIC_STAGES = {"label", "finetune", "train", "seq2seq_teacher", "train_seq2seq", "lm_label", "lm_generate",
                  "train_multitask"}


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    return tiny_bert_classifier(tmp_path_factory.mktemp("t") / "clf", 2, ["negative", "positive"],
                                sentences=["a warm funny film", "the plot makes no sense"])


def _manifest(tmp_path: Path, sentiment_tsv: Path, teacher: Path, *, label: dict | None = None,
              ray: dict | None = None) -> dict:
    return {"name": "place", "workdir": str(tmp_path / "work"), **({"ray": ray} if ray else {}), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(sentiment_tsv), "text_column": "sentence",
                                                    "label_column": "label", "rows_per_shard": 20}},
        {"name": "label", "type": "label", "inputs": {"data": "read"},
         "config": {"teacher": str(teacher), **(label or {})}},
    ]}


def _keys(raw: dict) -> dict[str, str]:
    return {p.name: p.key for p in make_plan(build_graph(parse_manifest(raw)))}


def _cli(args: list[str], tmp_path: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    ray_tmp = tempfile.mkdtemp(prefix="kdpl", dir="/tmp")  # short: Unix socket paths
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "KDPIPE_RAY_TMPDIR": ray_tmp,
           "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    try:
        return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)


# --- config: every stage takes resources; device/dtype validated with the GPU request ---------
def test_every_stage_config_accepts_resources():
    from pipeline.devices import NumericsConfig

    for type_key in stage_types():
        fields = get_stage_class(type_key).Config.model_fields
        assert {"num_cpus", "num_gpus", "memory"} <= set(fields), type_key
        assert (type_key in NUMERIC_STAGES) == issubclass(get_stage_class(type_key).Config, NumericsConfig), type_key


def test_resources_come_from_the_config_only(tmp_path, teacher):
    from stages.label import LabelConfig, LabelStage
    from stages.split import SplitConfig, SplitStage

    stage = LabelStage(config=LabelConfig(teacher=str(teacher), num_gpus=1, memory="2GiB"))
    assert stage.resources() == {"num_cpus": 1.0, "num_gpus": 1.0, "memory": float(2 * 2**30)}
    assert LabelStage(config=LabelConfig(teacher=str(teacher))).resources() == {"num_cpus": 1.0}
    assert SplitStage(config=SplitConfig(fraction=0.5, num_gpus=0.5)).resources()["num_gpus"] == 0.5
    with pytest.raises(ValueError, match="amount of memory"):
        SplitConfig(fraction=0.5, memory="lots")


def test_float16_on_cpu_is_a_validation_error(tmp_path, sentiment_tsv, teacher):
    for dtype in ("float16", "bfloat16"):
        with pytest.raises(ManifestError) as err:
            build_graph(parse_manifest(_manifest(tmp_path, sentiment_tsv, teacher, label={"dtype": dtype})))
        assert any(p.startswith("stages[1].config") and f"dtype: {dtype} needs CUDA" in p for p in err.value.problems)
    with pytest.raises(ManifestError, match="device: cuda needs num_gpus > 0"):
        build_graph(parse_manifest(_manifest(tmp_path, sentiment_tsv, teacher, label={"device": "cuda"})))
    with pytest.raises(ManifestError, match=r"stages\[0\].config: .*dtype: float16 needs CUDA"):
        build_graph(parse_manifest({"name": "x", "stages": [{"name": "t", "type": "train", "config": {"dtype": "float16"}}]}))


def test_key_follows_the_resolved_device_and_dtype(tmp_path, sentiment_tsv, teacher):
    def label_key(**cfg) -> str:
        return _keys(_manifest(tmp_path, sentiment_tsv, teacher, label=cfg))["label"]

    cpu = label_key()
    assert label_key(dtype="float32") == cpu  # auto resolves to float32 on CPU: same numbers, same key
    assert label_key(num_cpus=2, memory="1GiB") == cpu  # placement only
    gpu = label_key(num_gpus=1)
    assert gpu != cpu  # a GPU request means CUDA + bf16: other numbers
    assert label_key(num_gpus=0.5) == gpu == label_key(num_gpus=1, dtype="bfloat16", device="cuda")
    assert label_key(num_gpus=1, dtype="float16") not in (cpu, gpu)
    assert label_key(num_gpus=1, dtype="float32") not in (cpu, gpu)
    parts = next(p for p in make_plan(build_graph(parse_manifest(
        _manifest(tmp_path, sentiment_tsv, teacher, label={"num_gpus": 1})))) if p.name == "label").key_parts
    assert parts["numerics"] == {"device": "cuda", "dtype": "bfloat16"}
    # the other model stages resolve the same way (and so key the same way)
    for type_key in sorted(NUMERIC_STAGES):
        cls = get_stage_class(type_key)
        fields = {"label": {"teacher": str(teacher)},
                  "train_multitask": {"tasks": [{"name": "sst2", "data": "train"}]}}.get(type_key, {})
        assert str(cls(config=cls.Config(num_gpus=1, **fields)).numerics()) == "cuda/bfloat16", type_key
        assert str(cls(config=cls.Config(**fields)).numerics()) == "cpu/float32", type_key


def test_worker_planned_for_cuda_without_cuda_fails_honestly(tmp_path, teacher):
    import torch

    from pipeline.devices import DeviceUnavailable
    from pipeline.testing import make_context
    from stages.label import LabelConfig, LabelStage

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    stage = LabelStage(config=LabelConfig(teacher=str(teacher), num_gpus=1))
    with pytest.raises(DeviceUnavailable, match="planned for CUDA .* sees no CUDA device"):
        stage.setup(make_context(tmp_path, name="label"))


# --- placement ------------------------------------------------------------------------------
def test_unplaceable_names_the_missing_resources():
    from pipeline.placement import unplaceable

    cpu_only = [{"CPU": 2.0, "memory": 8 * 2**30}]
    msg = unplaceable("label", {"num_cpus": 1, "num_gpus": 1}, cpu_only, kind="map")
    assert msg.startswith("label asks 1 GPU per actor; the cluster has 0 GPUs")
    assert unplaceable("label", {"num_cpus": 2}, cpu_only, kind="map") is None
    two = [{"CPU": 1.0, "GPU": 1.0}, {"CPU": 1.0}]
    assert "no node has 2 CPUs (the largest has 1 CPU)" in unplaceable("train", {"num_cpus": 2}, two, kind="task")
    apart = [{"CPU": 4.0}, {"CPU": 0.5, "GPU": 1.0}]
    assert "no node has them together" in unplaceable("label", {"num_cpus": 1, "num_gpus": 1}, apart, kind="map")


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_gpu_request_without_gpus_exits_at_once_and_writes_nothing(tmp_path, sentiment_tsv, teacher):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(_manifest(tmp_path, sentiment_tsv, teacher, label={"num_gpus": 1})))
    # Old behaviour: the read stage runs, then label actors wait for a GPU forever.
    try:
        proc = _cli(["run", str(manifest), "--no-progress"], tmp_path, timeout=150)
    except subprocess.TimeoutExpired:
        pytest.fail("kdpipe run waited for a GPU the cluster does not have")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "label asks 1 GPU per actor; the cluster has 0 GPUs" in proc.stderr
    work = tmp_path / "work"
    assert not (work / "artifacts").exists() and not (work / "runs").exists()


def _run_with_every_cpu_held(ray, raw: dict, hang_message: str) -> dict:
    """Run the manifest in a thread while an actor holds every CPU; {"ok": True} or {"error": e}.
    The run must end (with an error, or done) within 120 s."""
    from pipeline.runner import run_graph

    hold = ray.remote(num_cpus=ray.cluster_resources()["CPU"])(type("Hold", (), {})).remote()
    ray.get(hold.__ray_ready__.remote())
    outcome: dict = {}

    def run() -> None:
        try:
            run_graph(build_graph(parse_manifest(raw)), progress=False, log=lambda *a: None)
            outcome["ok"] = True
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    try:
        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        thread.join(120)
        assert not thread.is_alive(), hang_message
    finally:
        ray.kill(hold)
    return outcome


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_busy_cluster_waits_at_most_placement_timeout(tmp_path, sentiment_tsv, teacher, ray_session):
    from pipeline.placement import PlacementError
    from pipeline.runner import run_graph

    raw = _manifest(tmp_path, sentiment_tsv, teacher, ray={"placement_timeout": 3})
    raw["stages"][1] = {"name": "keep", "type": "split", "inputs": {"data": "read"}, "config": {"fraction": 0.5}}
    run_graph(build_graph(parse_manifest(raw)), only=["read"], progress=False, log=lambda *a: None)

    # every CPU busy: the split actor can be placed later, not now
    outcome = _run_with_every_cpu_held(ray_session, raw, "the stage waited for placement without a deadline")
    assert isinstance(outcome.get("error"), PlacementError), outcome
    assert "keep: no actor was placed within ray.placement_timeout = 3 s" in str(outcome["error"])
    assert not (tmp_path / "work" / "runs" / "place" / "keep").exists()
    # Free again: it runs (a worker process takes seconds to start, more than the 3 s above).
    run_graph(build_graph(parse_manifest({**raw, "ray": {"placement_timeout": 300}})), progress=False,
              log=lambda *a: None)
    assert (tmp_path / "work" / "runs" / "place" / "keep" / "manifest.json").exists()


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_a_source_read_in_parts_waits_at_most_placement_timeout(tmp_path, sentiment_tsv, ray_session):
    """read_tasks > 1 launched its tasks without a reservation: on a busy cluster they queued
    with no deadline, while every other stage fails after placement_timeout."""
    from pipeline.placement import PlacementError
    from pipeline.runner import run_graph

    raw = {"name": "parts", "workdir": str(tmp_path / "work"), "ray": {"placement_timeout": 3}, "stages": [
        {"name": "read", "type": "read", "config": {"path": str(sentiment_tsv), "text_column": "sentence",
                                                    "label_column": "label", "rows_per_shard": 10, "read_tasks": 2}}]}
    outcome = _run_with_every_cpu_held(ray_session, raw, "the read tasks waited for placement without a deadline")
    assert isinstance(outcome.get("error"), PlacementError), outcome
    assert "read" in str(outcome["error"]) and "placement_timeout = 3 s" in str(outcome["error"])
    assert not (tmp_path / "work" / "runs" / "parts" / "read").exists()
    run_graph(build_graph(parse_manifest({**raw, "ray": {"placement_timeout": 300}})), progress=False,
              log=lambda *a: None)
    assert (tmp_path / "work" / "runs" / "parts" / "read" / "manifest.json").exists()


# --- ray:// ---------------------------------------------------------------------------------
def test_ray_client_address_is_refused_up_front(tmp_path, sentiment_tsv, teacher):
    manifest = tmp_path / "m.yaml"
    manifest.write_text(yaml.safe_dump(_manifest(tmp_path, sentiment_tsv, teacher)))
    proc = _cli(["run", str(manifest), "--no-progress", "--address", "ray://127.0.0.1:10001"], tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "--address: 'ray://127.0.0.1:10001' is a Ray Client address" in proc.stderr
    assert "ray job submit" in proc.stderr
    raw = _manifest(tmp_path, sentiment_tsv, teacher, ray={"address": "ray://head:10001"})
    with pytest.raises(ManifestError, match="ray.address: .*Ray Client address"):
        parse_manifest(raw)
    assert not (tmp_path / "work").exists()
