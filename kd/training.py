"""The one training loop every trainer uses (seq2seq teacher and students, causal-LM teacher and
students, the classifier students of `train`, the `finetune` teacher).

A trainer builds its model, optimizer and (optionally) LR scheduler, says how to get an epoch's
batches and the loss of one batch, and calls `fit`. The core does the rest, the same way for all:

* steps and epochs: `total_steps` updates, `steps_per_epoch` per epoch (the last epoch may be
  cut short); `batches(epoch, skip)` yields that epoch's batches from the `skip`-th on.
* randomness: before each update the global torch RNG is seeded with
  `derive_seed(seed, "dropout", step)`, so dropout never depends on what ran before (a resumed
  run draws the same masks). Trainers derive their other seeds (init, batch order) with the same
  `derive_seed`.
* mixed precision (autocast for a reduced dtype on CUDA, loss scaling for float16), optional
  gradient clipping, the scheduler stepped once per update.
* history: one record per epoch (mean loss and loss parts, examples, seconds, and whatever
  `evaluate(epoch)` returns) and a loss curve (mean loss over fixed windows of updates).
* early stopping: with `select(record) -> score` (greater is better) the best epoch is kept,
  training stops after `patience` epochs without a better score, and the model ends with the
  best epoch's weights. Without `select` the last epoch is the best one.
* checkpoint + resume, one scheme: after every epoch and every `checkpoint_every` updates,
  `scratch/step-NNNNNNNNN/` gets the weights (`model.safetensors`), the optimizer's tensors
  (`optimizer.safetensors`) and the rest of the optimizer, scheduler and loss-scaler state as
  JSON (`trainer.json`); the directory is written under a temporary name and renamed, then
  `scratch/state.json` (the loop's position, history, best epoch) is replaced atomically to name
  it. Nothing is unpickled on resume. A crash at any point leaves the previous checkpoint intact
  and named; a rerun continues from it and ends with the same weights as an uninterrupted run.
  `identity` (e.g. a hash of the semantic config) is stored with the state: a scratch folder of
  another configuration is never resumed from.
* progress: a tqdm bar (shown when stderr is a terminal).

Example (a classifier with early stopping on dev accuracy)::

    from kd.training import derive_seed, fit

    torch.manual_seed(derive_seed(seed, "init"))
    model = make_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    order = lambda epoch: random.Random(derive_seed(seed, "batches", epoch)).sample(range(n), n)

    def batches(epoch, skip):
        idx = order(epoch)
        for start in range(skip * bs, n, bs):
            yield idx[start:start + bs]

    def loss_fn(batch, step):
        return F.cross_entropy(model(x[batch]), y[batch])

    result = fit(model, optimizer=optimizer, loss_fn=loss_fn, batches=batches,
                 steps_per_epoch=-(-n // bs), total_steps=epochs * -(-n // bs),
                 scratch=ctx.scratch_dir, seed=seed,
                 evaluate=lambda epoch: {"dev_accuracy": accuracy(model, dev)},
                 select=lambda record: record["dev_accuracy"], patience=2)
    result.history, result.best_epoch, result.resumed_from  # -> metrics.json
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Iterable

STATE_FILE = "state.json"


def derive_seed(*parts: Any) -> int:
    """A 63-bit seed from any parts (run seed, purpose, epoch, step ...), stable across processes
    and Python versions. The one seed derivation of kdpipe's trainers."""
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big") >> 1


@dataclasses.dataclass
class FitResult:
    steps: int                      # updates done in total (resumed ones included)
    history: list[dict[str, Any]]   # one record per finished epoch
    curve: list[list[float]]        # [step, mean loss of the window ending there]
    best_epoch: int | None          # 1-based; the last epoch when there is no `select`
    stopped_early: bool
    resumed_from: dict[str, int] | None  # {"step", "epoch"} of the checkpoint resumed from

    @property
    def final_loss(self) -> float | None:
        return self.curve[-1][1] if self.curve else None


def fit(model, *, optimizer, loss_fn: Callable[[Any, int], Any], batches: Callable[[int, int], Iterable[Any]],
        steps_per_epoch: int, total_steps: int, scratch: Path, seed: int, scheduler=None,
        device=None, dtype=None, clip_grad_norm: float | None = None, checkpoint_every: int | None = None,
        evaluate: Callable[[int], dict[str, Any]] | None = None, select: Callable[[dict], Any] | None = None,
        patience: int | None = None, identity: Any = None, count: Callable[[Any], int] | None = None,
        on_step: Callable[[int], None] | None = None, on_epoch_end: Callable[[int], None] | None = None,
        desc: str = "train") -> FitResult:
    """Train `model` in place (see the module docstring). `loss_fn(batch, step)` returns the loss
    tensor or (loss, {part: float}); `count(batch)` weighs a batch in the epoch means (default 1).
    `on_step(step)` and `on_epoch_end(epoch)` run after that point's checkpoint is written."""
    import torch

    if steps_per_epoch < 1 or total_steps < 1:
        raise ValueError(f"nothing to train: {steps_per_epoch} steps per epoch, {total_steps} in total")
    device = device if device is not None else next(model.parameters()).device
    dtype = dtype or torch.float32
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)
    store = Checkpoints(Path(scratch), identity=identity)
    loop = _Loop.start(total_steps)
    saved = store.load(model, optimizer=optimizer, scheduler=scheduler, scaler=scaler, device=device)
    resumed_from = None
    if saved is not None:
        loop = _Loop(**saved["loop"])
        resumed_from = {"step": loop.step, "epoch": len(loop.history)}
    bar = _progress(total_steps, loop.step, desc)
    step_fn = functools.partial(_update, model, optimizer, scheduler, scaler, loss_fn, seed=seed, device=device,
                                dtype=dtype, clip_grad_norm=clip_grad_norm)
    save = functools.partial(store.save, loop, model, optimizer=optimizer, scheduler=scheduler, scaler=scaler)
    try:
        while loop.step < total_steps and not loop.stopped_early:
            epoch, skip = divmod(loop.step, steps_per_epoch)
            end = min(total_steps, (epoch + 1) * steps_per_epoch)
            model.train()
            _run_epoch(loop, batches(epoch, skip), step_fn, end=end, count=count, bar=bar, save=save,
                       checkpoint_every=checkpoint_every, on_step=on_step)
            if loop.step != end:
                raise RuntimeError(f"epoch {epoch + 1} ran out of batches after update {loop.step}; "
                                   f"{steps_per_epoch} per epoch were promised")
            record = loop.end_epoch(epoch + 1, evaluate(epoch + 1) if evaluate else {}, select, patience)
            bar.set_postfix(loss=f"{record['loss']:.4f}", refresh=False)
            save()
            if on_step is not None:
                on_step(loop.step)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
    finally:
        bar.close()
    if select is not None and loop.best_dir:
        store.load_weights(model, loop.best_dir, device=device)
    model.eval()
    return FitResult(steps=loop.step, history=loop.history, curve=loop.curve, best_epoch=loop.best_epoch,
                     stopped_early=loop.stopped_early, resumed_from=resumed_from)


def _run_epoch(loop: "_Loop", batches: Iterable[Any], step_fn, *, end: int, count, bar, save,
               checkpoint_every: int | None, on_step) -> None:
    """Updates until the epoch's batches run out or the update count reaches `end`."""
    epoch_batches = iter(batches)
    try:
        for batch in epoch_batches:
            loss, parts = step_fn(batch, loop.step)
            loop.add(loss, parts, count(batch) if count else 1)
            bar.update(1)
            if loop.step == end:
                return
            if checkpoint_every and loop.step % checkpoint_every == 0:
                save()
            if on_step is not None:
                on_step(loop.step)
    finally:
        getattr(epoch_batches, "close", lambda: None)()  # stops a prefetching producer now


def _update(model, optimizer, scheduler, scaler, loss_fn, batch, step: int, *, seed: int, device, dtype,
            clip_grad_norm: float | None) -> tuple[float, dict[str, float]]:
    import torch

    from pipeline.devices import autocast

    torch.manual_seed(derive_seed(seed, "dropout", step))
    with autocast(device, dtype):
        out = loss_fn(batch, step)
    loss, parts = out if isinstance(out, tuple) else (out, {})
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad_norm is not None:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
    scaler.step(optimizer)
    scaler.update()
    if scheduler is not None:
        scheduler.step()
    return loss.item(), parts


@dataclasses.dataclass
class _Loop:
    """Where training is, all of it JSON: saved with every checkpoint."""

    step: int
    curve_every: int
    history: list = dataclasses.field(default_factory=list)
    curve: list = dataclasses.field(default_factory=list)
    window: list = dataclasses.field(default_factory=lambda: [0.0, 0])      # loss sum, updates
    epoch_sums: dict = dataclasses.field(default_factory=dict)             # weighted loss parts
    epoch_examples: int = 0
    epoch_seconds: float = 0.0
    best_epoch: int | None = None
    best_score: Any = None
    best_dir: str | None = None
    stale: int = 0
    stopped_early: bool = False
    total_steps: int = 0

    @classmethod
    def start(cls, total_steps: int) -> "_Loop":
        # Loss curve windows never depend on checkpoint_every (a throughput knob).
        return cls(step=0, curve_every=max(1, min(50, total_steps // 10)), total_steps=total_steps)

    def add(self, loss: float, parts: dict[str, float], n: int) -> None:
        if getattr(self, "_t0", None) is None:
            self._t0 = time.perf_counter()
        self.step += 1
        self.window = [self.window[0] + loss, self.window[1] + 1]
        if self.step % self.curve_every == 0 or self.step == self.total_steps:
            self.curve.append([self.step, round(self.window[0] / self.window[1], 4)])
            self.window = [0.0, 0]
        for key, value in {"loss": loss, **parts}.items():
            self.epoch_sums[key] = self.epoch_sums.get(key, 0.0) + float(value) * n
        self.epoch_examples += n

    def seconds(self) -> float:
        t0 = getattr(self, "_t0", None)
        return self.epoch_seconds + (time.perf_counter() - t0 if t0 is not None else 0.0)

    def end_epoch(self, epoch: int, metrics: dict[str, Any], select, patience: int | None) -> dict[str, Any]:
        seconds, seen = self.seconds(), self.epoch_examples
        record = {"epoch": epoch, "step": self.step, "examples": seen, "seconds": round(seconds, 3),
                  "examples_per_s": round(seen / max(seconds, 1e-9), 2),
                  **{k: v / max(seen, 1) for k, v in self.epoch_sums.items()}, **metrics}
        self.history.append(record)
        self.epoch_sums, self.epoch_examples, self.epoch_seconds = {}, 0, 0.0
        self._t0 = None
        score = select(record) if select is not None else None
        if select is None or self.best_epoch is None or score > self.best_score:
            self.best_epoch, self.best_score, self.stale = epoch, score, 0
            # Kept on disk only when the model is to end with it (not simply the last epoch).
            self.best_dir = _step_dir(self.step) if select is not None else None
        else:
            self.stale += 1
        self.stopped_early = bool(patience and self.stale >= patience)
        return record

    def to_json(self) -> dict[str, Any]:
        state = dataclasses.asdict(self)
        state["epoch_seconds"] = round(self.seconds(), 3)
        return state


def _step_dir(step: int) -> str:
    return f"step-{step:09d}"


def _progress(total: int, initial: int, desc: str):
    from tqdm.auto import tqdm

    # disable=None: a bar on a terminal, nothing in logs (Ray workers, CI).
    return tqdm(total=total, initial=initial, desc=desc, unit="step", disable=None, mininterval=2.0,
                leave=False, dynamic_ncols=True)


class Checkpoints:
    """The checkpoint scheme (see the module docstring): step directories + state.json."""

    def __init__(self, scratch: Path, *, identity: Any = None):
        self.dir = Path(scratch)
        self.identity = identity

    def load(self, model, *, optimizer, scheduler, scaler, device) -> dict[str, Any] | None:
        """Restore model, optimizer, scheduler and scaler from the named checkpoint; the saved
        state (None when there is nothing to resume from)."""
        from safetensors.torch import load_file

        path = self.dir / STATE_FILE
        if not path.is_file():
            return None
        state = json.loads(path.read_text(encoding="utf-8"))
        if state.get("identity") != self.identity or "loop" not in state:
            return None  # scratch of another configuration (or scheme): start afresh
        ckpt = self.dir / state["dir"]
        self.load_weights(model, state["dir"], device=device)
        rest = json.loads((ckpt / "trainer.json").read_text(encoding="utf-8"))
        optimizer.load_state_dict(_optimizer_state(load_file(ckpt / "optimizer.safetensors"), rest["optimizer"],
                                                   optimizer))
        if scheduler is not None:
            scheduler.load_state_dict(rest["scheduler"])
        if rest.get("scaler"):
            scaler.load_state_dict(rest["scaler"])
        return state

    def load_weights(self, model, name: str, *, device) -> None:
        from safetensors.torch import load_model

        load_model(model, str(self.dir / name / "model.safetensors"), device=str(device))

    def save(self, loop: _Loop, model, *, optimizer, scheduler, scaler) -> None:
        from safetensors.torch import save_file, save_model

        from pipeline.artifact import atomic_write_text

        self.dir.mkdir(parents=True, exist_ok=True)
        name = _step_dir(loop.step)
        tmp = self.dir / f"{name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_model(model, str(tmp / "model.safetensors"))
        tensors, rest = _split_optimizer_state(optimizer.state_dict())
        save_file(tensors, str(tmp / "optimizer.safetensors"))
        (tmp / "trainer.json").write_text(json.dumps({
            "optimizer": rest, "scheduler": scheduler.state_dict() if scheduler is not None else None,
            "scaler": scaler.state_dict() or None}))
        shutil.rmtree(self.dir / name, ignore_errors=True)
        tmp.rename(self.dir / name)
        # Written last: state.json only ever names a complete directory.
        atomic_write_text(self.dir / STATE_FILE, json.dumps(
            {"identity": self.identity, "step": loop.step, "epoch": len(loop.history), "dir": name,
             "loop": loop.to_json()}))
        keep = {name, loop.best_dir}
        for old in self.dir.glob("step-*"):
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)


def _split_optimizer_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """An optimizer state_dict as safetensors tensors ("<param>.<name>") + JSON for the rest."""
    import torch

    tensors, scalars = {}, {}
    for pid, values in state["state"].items():
        for key, value in values.items():
            if isinstance(value, torch.Tensor):
                tensors[f"{pid}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(pid), {})[key] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def _optimizer_state(tensors: dict[str, Any], rest: dict[str, Any], optimizer) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        pid, name = key.split(".", 1)
        state.setdefault(int(pid), {})[name] = value
    for pid, values in rest["scalars"].items():
        state.setdefault(int(pid), {}).update(values)
    groups = []
    for saved, current in zip(rest["param_groups"], optimizer.state_dict()["param_groups"]):
        # JSON turns tuples (AdamW's betas) into lists: give them back their type.
        groups.append({k: tuple(v) if isinstance(current.get(k), tuple) else v for k, v in saved.items()})
    return {"state": state, "param_groups": groups}
