"""The one training loop (kd/training.py): resume equals an uninterrupted run, checkpoints hold
no pickles, early stopping keeps the best epoch; and every trainer stage (train, finetune,
train_seq2seq, train_lm) survives a kill -9 mid-training through it."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow as pa
import pytest
import torch

from kd.training import derive_seed, fit
from pipeline.testing import make_artifact

REPO = Path(__file__).resolve().parent.parent
ROWS, BS = 40, 8


class Crash(Exception):
    pass


def toy_run(scratch: Path, *, epochs: int = 3, checkpoint_every: int | None = None, crash_at: int | None = None,
            identity=None, evaluate=None, select=None, patience=None, on_epoch_end=None):
    """A dropout MLP on a fixed toy problem with AdamW and a scheduler; returns (model, result)."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.Dropout(0.3), torch.nn.Linear(16, 2))
    x = torch.randn(ROWS, 4, generator=torch.Generator().manual_seed(1))
    y = (x[:, 0] + x[:, 1] > 0).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1 / (1 + 0.1 * s))

    def batches(epoch: int, skip: int):
        order = random.Random(derive_seed(1, "batches", epoch)).sample(range(ROWS), ROWS)
        for start in range(skip * BS, ROWS, BS):
            yield order[start:start + BS]

    def on_step(step: int) -> None:
        if step == crash_at:
            raise Crash

    per_epoch = -(-ROWS // BS)
    result = fit(model, optimizer=optimizer, scheduler=scheduler, batches=batches,
                 loss_fn=lambda b, step: (F.cross_entropy(model(x[b]), y[b]), {"ce": 0.5}),
                 steps_per_epoch=per_epoch, total_steps=epochs * per_epoch, scratch=scratch, seed=3,
                 checkpoint_every=checkpoint_every, identity=identity, count=len, on_step=on_step,
                 evaluate=evaluate, select=select, patience=patience,
                 on_epoch_end=(lambda epoch: on_epoch_end(epoch, model)) if on_epoch_end else None)
    return model, result


def without_times(history):
    return [{k: v for k, v in r.items() if k not in ("seconds", "examples_per_s")} for r in history]


def test_resume_mid_epoch_after_a_crash_equals_an_uninterrupted_run(tmp_path):
    clean, expected = toy_run(tmp_path / "clean", checkpoint_every=3)
    with pytest.raises(Crash):
        toy_run(tmp_path / "crashed", checkpoint_every=3, crash_at=8)
    state = json.loads((tmp_path / "crashed" / "state.json").read_text())
    assert (state["step"], state["epoch"]) == (6, 1)  # mid-epoch 2: the update-6 checkpoint
    resumed, result = toy_run(tmp_path / "crashed", checkpoint_every=3)
    assert result.resumed_from == {"step": 6, "epoch": 1}
    for (name, a), b in zip(clean.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert result.curve == expected.curve and result.steps == expected.steps == 15
    assert without_times(result.history) == without_times(expected.history)
    assert [r["examples"] for r in result.history] == [ROWS] * 3 and result.history[0]["ce"] == 0.5


def test_checkpoints_are_safetensors_and_json_and_a_half_written_one_is_ignored(tmp_path):
    scratch = tmp_path / "s"
    with pytest.raises(Crash):
        toy_run(scratch, checkpoint_every=2, crash_at=7)
    files = sorted(str(p.relative_to(scratch)) for p in scratch.rglob("*") if p.is_file())
    assert files == ["state.json", "step-000000006/model.safetensors", "step-000000006/optimizer.safetensors",
                     "step-000000006/trainer.json"]
    for name in ("model.safetensors", "optimizer.safetensors"):  # loadable without unpickling
        from safetensors.torch import load_file

        assert load_file(scratch / "step-000000006" / name)
    # A crash while writing the next checkpoint leaves a .tmp directory that nothing names.
    (scratch / "step-000000008.tmp").mkdir()
    (scratch / "step-000000008.tmp" / "model.safetensors").write_bytes(b"half a file")
    resumed, result = toy_run(scratch, checkpoint_every=2)
    clean, _ = toy_run(tmp_path / "clean", checkpoint_every=2)
    assert result.resumed_from == {"step": 6, "epoch": 1}
    assert all(torch.equal(a, b) for a, b in zip(clean.state_dict().values(), resumed.state_dict().values()))
    assert not (scratch / "step-000000008.tmp").exists()


def test_early_stopping_ends_with_the_best_epochs_weights(tmp_path):
    scores = [0.5, 0.9, 0.7, 0.6, 0.95]
    snapshots = {}

    def remember(epoch: int, model) -> None:
        snapshots[epoch] = {k: v.clone() for k, v in model.state_dict().items()}

    model, result = toy_run(tmp_path / "s", epochs=5, evaluate=lambda epoch: {"score": scores[epoch - 1]},
                            select=lambda r: r["score"], patience=2, on_epoch_end=remember)
    assert result.best_epoch == 2 and result.stopped_early and len(result.history) == 4
    assert [r["score"] for r in result.history] == scores[:4]
    assert all(torch.equal(v, snapshots[2][k]) for k, v in model.state_dict().items())
    assert not all(torch.equal(v, snapshots[4][k]) for k, v in model.state_dict().items())


def test_scratch_of_another_configuration_is_never_resumed(tmp_path):
    with pytest.raises(Crash):
        toy_run(tmp_path / "s", checkpoint_every=3, identity="config a", crash_at=8)
    _, other = toy_run(tmp_path / "s", checkpoint_every=3, identity="config b")
    assert other.resumed_from is None
    _, again = toy_run(tmp_path / "s", checkpoint_every=3, identity="config b")
    assert again.resumed_from == {"step": 15, "epoch": 3} and again.steps == 15


# --- kill -9 of each trainer stage ------------------------------------------------------------

def run_child(tmp: Path, name: str, spec: dict, *, delay: float = 0.0, kill_when=None, state_file: str):
    """Run the stage in training_child.py. With kill_when, SIGKILL it once kill_when(state.json)
    holds and return that state; else wait for it to finish and return its summary."""
    spec_file = tmp / f"{name}-{'slow' if delay else 'run'}.json"
    spec_file.write_text(json.dumps({**spec, "tmp": str(tmp), "name": name, "delay": delay}))
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "training_child.py"), str(spec_file)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if kill_when is None:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-3000:]
        return json.loads((tmp / f"{name}-summary.json").read_text())
    state_path = tmp / f"{name}-out" / "scratch" / state_file
    deadline = time.monotonic() + 600
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                state = json.loads(state_path.read_text())
            except (OSError, ValueError):
                state = None
            if state is not None and kill_when(state):
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait(timeout=60)
                return state
            time.sleep(0.05)
        raise AssertionError(f"training ended (rc {proc.poll()}) before the kill: {proc.stderr.read()[-3000:]}")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.rglob("*.safetensors")):
        out.update({f"{f.name}:{k}": v for k, v in load_file(f).items()})
    return out


def kill_resume_and_compare(tmp: Path, spec: dict, *, model_folder: str, state_file: str, kill_when, total: int):
    clean = run_child(tmp, "clean", spec, state_file=state_file)
    state = run_child(tmp, "killed", spec, delay=0.3, kill_when=kill_when, state_file=state_file)
    assert state["step"] < total, "the kill came after training had finished"
    assert not (tmp / "killed-out" / "files" / model_folder).exists()
    resumed = run_child(tmp, "killed", spec, state_file=state_file)
    a, b = tensors(tmp / "clean-out" / "files" / model_folder), tensors(tmp / "killed-out" / "files" / model_folder)
    assert a.keys() == b.keys() and a
    for k in a:
        assert torch.equal(a[k], b[k]), k
    return clean, resumed, state


@pytest.mark.slow
def test_train_survives_kill_9_mid_training(tmp_path):
    from test_train import corpus, label_artifact, student_cfg, teacher_logits

    ids, texts, labels = corpus()
    data = make_artifact(tmp_path / "data", pa.table({"id": ids, "text": texts, "label": labels}),
                         rows_per_shard=10, metadata={"kdpipe.label_names": '["neg", "pos"]'})
    teacher = label_artifact(tmp_path / "labels", ids, teacher_logits(labels), rows_per_shard=10)
    cfg = student_cfg(losses={"ce": 1.0, "kl": 1.0}, epochs=4).model_dump(mode="json")
    spec = {"stage": "stages.train:TrainStage", "config": cfg,
            "inputs": {"data": [str(data.loc)], "labels": [str(teacher.loc)]}}
    clean, resumed, state = kill_resume_and_compare(tmp_path, spec, model_folder="student", state_file="state.json",
                                                    kill_when=lambda s: s["epoch"] >= 1, total=4 * 4)
    assert resumed["resumed_from_epoch"] == state["epoch"] >= 1
    assert resumed["epochs_run"] == clean["epochs_run"] == 4


@pytest.mark.slow
def test_finetune_survives_kill_9_mid_training(tmp_path):
    from factories import tiny_bert_encoder
    from test_finetune import artifacts

    train, dev = artifacts(tmp_path)
    encoder = tiny_bert_encoder(tmp_path / "enc")
    cfg = dict(base_model=str(encoder), epochs=3, lr=1e-2, batch_size=8, warmup=0.1, patience=5, num_cpus=1)
    spec = {"stage": "stages.finetune:FinetuneStage", "config": cfg,
            "inputs": {"data": [str(train.loc)], "dev": [str(dev.loc)]}}
    clean, resumed, state = kill_resume_and_compare(tmp_path, spec, model_folder="model", state_file="state.json",
                                                    kill_when=lambda s: s["epoch"] >= 1, total=3 * 6)
    assert resumed["resumed_from_epoch"] == state["epoch"] >= 1
    assert (resumed["best_epoch"], resumed["dev_accuracy"]) == (clean["best_epoch"], clean["dev_accuracy"])


@pytest.mark.slow
def test_train_seq2seq_survives_kill_9_mid_training(tmp_path):
    from test_seq2seq import parallel_table, tiny_schedule

    data = make_artifact(tmp_path / "data", parallel_table(), rows_per_shard=20)
    cfg = {"target": "reference", "vocab_size": 60, "train": tiny_schedule(max_steps=10), "checkpoint_every": 3}
    spec = {"stage": "stages.train_seq2seq:TrainSeq2SeqStage", "config": cfg, "inputs": {"data": [str(data.loc)]}}
    clean, resumed, state = kill_resume_and_compare(tmp_path, spec, model_folder="student",
                                                    state_file="train/state.json",
                                                    kill_when=lambda s: s["step"] >= 3, total=10)
    assert resumed["final_loss"] == clean["final_loss"] and resumed["steps"] == 10


@pytest.mark.slow
def test_train_lm_survives_kill_9_mid_training(tmp_path):
    from factories import tiny_causal_lm
    from test_lm_train import _labels

    teacher = tiny_causal_lm(tmp_path / "teacher")
    art = _labels(tmp_path / "lab", teacher, mode="topk", k=4)
    cfg = {"tokenizer": str(teacher), "checkpoint_every": 2, "train": {"epochs": 2, "batch_size": 4,
                                                                      "warmup_steps": 2}}
    spec = {"stage": "stages.train_lm:TrainLmStage", "config": cfg, "inputs": {"data": [str(art.loc)]}, "seed": 7}
    clean, resumed, state = kill_resume_and_compare(tmp_path, spec, model_folder="student",
                                                    state_file="train/state.json",
                                                    kill_when=lambda s: s["step"] >= 2, total=clean_total(art, 4, 2))
    assert resumed["resumed_from_step"] == state["step"] and clean["resumed_from_step"] is None
    assert resumed["final_loss"] == clean["final_loss"]


def clean_total(art, batch_size: int, epochs: int) -> int:
    from kd.lm.data import steps_per_epoch

    return epochs * steps_per_epoch([s["rows"] for s in art.manifest["shards"]], batch_size)
