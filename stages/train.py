"""`train`: fit a small student (bilstm, cnn, transformer) on gold labels and/or teacher logits.

Inputs: `data` (shards with id, the student's text column(s), gold `label`), `labels` (label
artifacts, optional and possibly several: without them this is the no-KD baseline), `tokenizer`
(an `spm` artifact, optional), `dev` (optional, for epoch selection; never the test set).

Streaming: one data shard is in memory at a time. Shards are visited in a seeded order per epoch,
rows within a shard are ordered by a hash of (seed, epoch, id), and a batch never crosses a shard
boundary. Teacher logits are joined to the shard by id (the label shard with the same index is
tried first, then every label shard is scanned). So the result does not depend on the worker
count nor on how the label artifacts are sharded, but it does depend on the `data` artifact's
shard layout (its source's `rows_per_shard`): which rows share a batch changes with it.

Gold labels on augmented rows (`aug_index >= 0`) are ignored when a teacher is present, as in
Tang et al. 2019: an augmented sentence may no longer carry its parent's label, and the teacher's
logits are its only trustworthy target. Without a teacher (the baseline) the parent label is used.

Resume: after every epoch the weights, optimizer state and a small state.json go to
ctx.scratch_dir; an interrupted run continues from the last finished epoch and ends with the
same weights as an uninterrupted one (dropout and shuffling are seeded per epoch).
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from pipeline.artifact import write_json
from pipeline.devices import NumericsConfig, autocast, move, worker_device
from pipeline.hashing import hash_obj, hash_tree
from pipeline.stage import InputRole, Problem, StageConfig, StageContext, TaskStage, throughput_fields
from kd.train_data import ShardStream, label_sources, read_eval_table, resolve_label_names


class StudentSpec(StageConfig):
    type: Literal["bilstm", "cnn", "transformer"] = "bilstm"
    embedding_dim: int = Field(128, gt=0)
    hidden_dim: int = Field(128, gt=0, description="bilstm: LSTM units per direction")
    mlp_dim: int = Field(128, gt=0, description="bilstm: ReLU hidden layer")
    dropout: float = Field(0.1, ge=0, lt=1)
    num_filters: int = Field(100, gt=0, description="cnn: filters per width")
    filter_sizes: list[int] = Field(default_factory=lambda: [3, 4, 5], description="cnn: filter widths")
    hf_config: dict[str, Any] | None = Field(None, description="transformer: {model_type: bert, hidden_size: ...}")
    architecture_from: str | None = Field(None, description="transformer: HF dir whose architecture to copy (born-again)")


class TokenizerSpec(StageConfig):
    kind: Literal["word", "spm", "hf"] | None = Field(
        None, description="default: spm when a `tokenizer` input is given, else word")
    path: str | None = Field(None, description="hf: a local tokenizer directory")
    vocab_size: int = Field(30_000, gt=3, description="word: vocabulary size")
    min_freq: int = Field(1, ge=1)
    lowercase: bool = True


class LossWeights(StageConfig):
    ce: float = Field(1.0, ge=0, description="cross-entropy on gold labels (annealed with `anneal`)")
    mse: float = Field(0.0, ge=0, description="MSE between student and teacher logits (Tang et al.)")
    kl: float = Field(0.0, ge=0, description="KL at `temperature`, times T^2 (Hinton et al.)")


class EnsembleSpec(StageConfig):
    mode: Literal["mean", "weighted"] = "mean"
    weights: list[float] | None = None


class TrainConfig(NumericsConfig):
    task: Literal["classification", "token_classification"] = Field(
        "classification", description="token_classification: a bilstm tagger over a word-list "
        "student_column (e.g. words), gold tag lists in label_column, token-level KD")
    student: StudentSpec = Field(StudentSpec(), description="student type and its hyperparameters")
    tokenizer: TokenizerSpec = Field(TokenizerSpec(), description="word vocab (default), spm input, or hf dir")
    student_column: str = "text"
    student_pair_column: str | None = None
    label_column: str = "label"
    losses: LossWeights = Field(LossWeights(), description="weights: {ce, mse, kl}")
    temperature: float | None = Field(None, gt=0, description="default: the label artifact's, else 1")
    anneal: bool = Field(False, description="BAM! teacher annealing of the ce target")
    ensemble: EnsembleSpec = Field(EnsembleSpec(), description="how several teachers' logits combine")
    gold_on_augmented: bool = False
    epochs: int = Field(3, gt=0)
    lr: float = Field(1e-3, gt=0)
    optimizer: Literal["adam", "adamw", "sgd", "adadelta"] = "adam"
    weight_decay: float = Field(0.0, ge=0)
    batch_size: int = Field(32, gt=0, description="semantic: changes the result")
    max_length: int = Field(64, gt=0)
    patience: int | None = Field(None, gt=0, description="stop after this many epochs without dev gain")
    seed: int = 0


def derive_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


class TrainStage(TaskStage):
    type = "train"
    Config = TrainConfig
    seeded = True
    inputs = {
        "data": InputRole(required=True, doc="transfer set with id, text and gold label"),
        "labels": InputRole(required=False, many=True, doc="teacher label artifact(s)"),
        "tokenizer": InputRole(required=False, kind="files", doc="an spm stage"),
        "dev": InputRole(required=False, doc="dev set for epoch selection"),
    }
    config: TrainConfig
    model_folder = "student"

    @classmethod
    def report_section(cls, *, name: str, files_dir: Path, manifest: dict[str, Any]):
        """One student row (dev accuracy from training, no speed) and its training curves."""
        from pipeline.stage import ReportSection

        m = json.loads((files_dir / "metrics.json").read_text())
        row = {"model": name, "role": "student", "type": m.get("student"), "params": m.get("parameters"),
               "size_bytes": sum(f.stat().st_size for f in (files_dir / "student").rglob("*") if f.is_file()),
               "metric": "dev accuracy" if m.get("dev_accuracy") is not None else "",
               "value": m.get("dev_accuracy"), "sent/s": None, "speed-up": None,
               "labels": ", ".join(lab.get("stage") or lab["key"] for lab in m.get("labels", [])) or "gold only"}
        curves = files_dir / "curves.png"
        return ReportSection([row], [(f"Training curves: {name}", curves)] if curves.is_file() else [])

    # --- planning --------------------------------------------------------------------------
    def tokenizer_kind(self, has_spm_input: bool) -> str:
        return self.config.tokenizer.kind or ("spm" if has_spm_input else "word")

    def validate(self, *, input_columns) -> list[Problem]:
        cfg, problems = self.config, []
        has_labels = bool(input_columns.get("labels"))
        if not any((cfg.losses.ce, cfg.losses.mse, cfg.losses.kl)):
            problems.append(Problem("config.losses", "all loss weights are 0; set e.g. `ce: 1` or `kl: 1`"))
        if (cfg.losses.mse or cfg.losses.kl or cfg.anneal) and not has_labels:
            problems.append(Problem("inputs.labels", "losses.mse/kl and anneal need teacher logits: add "
                                    "`labels: <label stage>` or set them to 0 for a gold-only baseline"))
        kind = self.tokenizer_kind(bool(input_columns.get("tokenizer")))
        if kind == "spm" and not input_columns.get("tokenizer"):
            problems.append(Problem("config.tokenizer.kind", "spm needs `inputs: {tokenizer: <spm stage>}`"))
        if kind == "hf" and not (cfg.tokenizer.path and Path(cfg.tokenizer.path).is_dir()):
            problems.append(Problem("config.tokenizer.path", f"hf tokenizer needs a local directory; "
                                    f"{cfg.tokenizer.path!r} is not one"))
        st = cfg.student
        if cfg.task == "token_classification" and (st.type != "bilstm" or kind != "word" or cfg.student_pair_column):
            problems.append(Problem("config.task", "token_classification trains a bilstm tagger on a word vocab "
                                    "without pairs: set student.type: bilstm, tokenizer.kind: word, no pair column"))
        if st.type == "transformer":
            if not st.hf_config and not st.architecture_from:
                problems.append(Problem("config.student", "a transformer student needs `hf_config: {model_type: "
                                        "bert, hidden_size: 64, ...}` or `architecture_from: <HF dir>`"))
            if st.architecture_from and not (Path(st.architecture_from) / "config.json").is_file():
                problems.append(Problem("config.student.architecture_from",
                                        f"{st.architecture_from!r} holds no config.json; give an HF model dir"))
        if cfg.ensemble.mode == "weighted" and not cfg.ensemble.weights:
            problems.append(Problem("config.ensemble.weights", "mode 'weighted' needs one weight per teacher"))
        for role, cols_list in (("data", input_columns.get("data")), ("dev", input_columns.get("dev"))):
            for cols in cols_list or []:
                if cols is None:
                    continue
                need = [cfg.student_column] + ([cfg.student_pair_column] if cfg.student_pair_column else [])
                if role == "dev" or (cfg.losses.ce and not has_labels):
                    need.append(cfg.label_column)
                for c in need:
                    if c not in cols:
                        problems.append(Problem(f"inputs.{role}", f"column {c!r} missing (it has {', '.join(cols)}); "
                                                "set student_column/student_pair_column/label_column"))
        return problems

    def fingerprint(self) -> dict[str, str]:
        """The tokenizer's and the `architecture_from` model's files, when given."""
        out = {}
        for name, path in (("tokenizer", self.config.tokenizer.path), ("architecture", self.config.student.architecture_from)):
            if path and Path(path).exists():
                out[f"{name} {path}"] = hash_tree(path)
        return out

    # --- training --------------------------------------------------------------------------
    def run(self, ctx: StageContext, *, on_epoch_end: Callable[[int], None] | None = None) -> dict[str, Any]:
        import torch

        from kd.students.common import ClassifierStudent

        cfg = self.config
        seed = derive_seed(ctx.seed, cfg.seed)
        data = ctx.input("data")
        labels = ctx.inputs.get("labels") or []
        dev = ctx.optional_input("dev")
        sources = label_sources(labels)
        label_names = resolve_label_names(data, sources, cfg.label_column, cfg.task)
        num_labels = len(label_names)
        temperature = cfg.temperature or next((s.temperature for s in sources if s.temperature), 1.0)
        if cfg.ensemble.mode == "weighted" and len(cfg.ensemble.weights or []) != sum(len(s.columns) for s in sources):
            raise ValueError(f"config.ensemble.weights: {len(cfg.ensemble.weights or [])} weights for "
                             f"{sum(len(s.columns) for s in sources)} teacher logit columns")

        tokenizer = self._build_tokenizer(ctx, data)
        meta = {"type": cfg.student.type, "task": cfg.task, "num_labels": num_labels,
                "label_names": label_names, "pair": cfg.student_pair_column is not None,
                "max_length": cfg.max_length, "student_column": cfg.student_column,
                "student_pair_column": cfg.student_pair_column,
                "hyperparameters": cfg.student.model_dump(mode="json", exclude_none=True)}
        # As planned (num_gpus > 0 -> CUDA), or DeviceUnavailable naming this node.
        device, dtype = worker_device(self.numerics(), stage=ctx.stage_name)
        torch.manual_seed(derive_seed(seed, "init"))
        module = _student_module(cfg.student.type, cfg.task).create(meta=meta, tokenizer=tokenizer).to(device)
        if any(s.task != cfg.task for s in sources):
            raise ValueError(f"config.task is {cfg.task!r} but the label artifacts hold "
                             f"{sorted({s.task for s in sources})} labels; set task to match the label stage")
        optimizer = _optimizer(cfg, module)
        # float16 needs loss scaling; bfloat16 and float32 do not (the scaler is then a pass-through).
        scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and dtype == torch.float16)
        stream = ShardStream(data=data, sources=sources, label_names=label_names, cfg=cfg,
                             use_gold_on_augmented=cfg.gold_on_augmented or not sources)
        total_steps = cfg.epochs * stream.batches_per_epoch()
        state = _Resume(ctx.scratch_dir, hash_obj([cfg.model_dump(mode="json", exclude=throughput_fields(TrainConfig)), seed,
                                                   [a.key for a in labels], data.key]))
        start_epoch, step, history, best = state.restore(module, optimizer)
        resumed_from = start_epoch if start_epoch else None
        dev_table = read_eval_table(dev, cfg, label_names) if dev is not None else None
        student = (ClassifierStudent if cfg.task == "classification" else _tagger_student())(module=module, meta=meta)
        # epochs since the best one, so patience carries across a resume
        stale = len(history) - best["epoch"] if best and dev_table is not None else 0
        for epoch in range(start_epoch, cfg.epochs):
            torch.manual_seed(derive_seed(seed, "epoch", epoch))
            module.train()
            sums: dict[str, float] = {}
            seen, t0 = 0, time.perf_counter()
            for batch, gold, teacher in stream.batches(epoch=epoch, seed=seed, module=module):
                progress = step / max(1, total_steps - 1)
                batch, gold, teacher = move(batch, device), move(gold, device), move(teacher, device)
                with autocast(device, dtype):
                    loss, parts = _loss(cfg, module(**batch), gold, teacher, temperature, progress)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                step += 1
                seen += len(gold)
                for k, v in {"loss": float(loss.detach()), **parts}.items():
                    sums[k] = sums.get(k, 0.0) + v * len(gold)
            seconds = time.perf_counter() - t0
            record = {"epoch": epoch + 1, "step": step, "examples": seen, "seconds": round(seconds, 3),
                      "examples_per_s": round(seen / max(seconds, 1e-9), 2),
                      **{k: v / max(seen, 1) for k, v in sums.items()}}
            if dev_table is not None:
                record.update(_dev_metrics(student, dev_table))
            history.append(record)
            improved = dev_table is None or best is None or record["dev_accuracy"] > best["dev_accuracy"]
            if improved:
                best, stale = record, 0
            else:
                stale += 1
            state.save(module, optimizer, epoch=epoch + 1, step=step, history=history, best=best,
                       improved=improved)
            if on_epoch_end is not None:
                on_epoch_end(epoch + 1)
            if cfg.patience and stale >= cfg.patience:
                break
        if dev_table is not None:
            state.load_best(module)
        student_dir = student.save(ctx.out_dir / "student")
        consumed = [{"key": s.key, "stage": s.stage_name, "columns": s.columns} for s in sources]
        metrics = {"student": cfg.student.type, "parameters": student.num_parameters(), "history": history,
                   "best_epoch": best["epoch"] if best else None, "labels": consumed,
                   "temperature": temperature, "resumed_from_epoch": resumed_from,
                   "dev_accuracy": best.get("dev_accuracy") if best else None,
                   "dev_macro_f1": best.get("dev_macro_f1") if best else None,
                   "train_examples_per_s": history[-1]["examples_per_s"] if history else None}
        write_json(ctx.out_dir / "metrics.json", metrics)
        _plot_curves(history, ctx.out_dir / "curves.png", title=f"{ctx.stage_name} ({cfg.student.type})")
        return {k: metrics[k] for k in ("student", "parameters", "best_epoch", "labels", "dev_accuracy",
                                        "resumed_from_epoch", "train_examples_per_s")} | {
            "epochs_run": len(history), "student_dir": str(student_dir), "device": device.type,
            "dtype": str(dtype).removeprefix("torch.")}

    def _build_tokenizer(self, ctx: StageContext, data):
        from kd.students.common import HFTokenizer, SpmTokenizer, WordVocab

        cfg = self.config
        spm_art = ctx.optional_input("tokenizer")
        kind = self.tokenizer_kind(spm_art is not None)
        if kind == "spm":
            return SpmTokenizer(spm_art.files_dir / "spm.model")
        if kind == "hf":
            return HFTokenizer(cfg.tokenizer.path)
        cols = [cfg.student_column] + ([cfg.student_pair_column] if cfg.student_pair_column else [])
        if cfg.task == "token_classification":
            words = (w or [] for table in data.iter_shards(columns=cols) for w in table[cfg.student_column].to_pylist())
            return WordVocab.build_from_words(words, max_size=cfg.tokenizer.vocab_size, min_freq=cfg.tokenizer.min_freq,
                                              lowercase=cfg.tokenizer.lowercase)

        def texts():
            for table in data.iter_shards(columns=cols):
                for col in cols:
                    yield from (t or "" for t in table[col].to_pylist())

        return WordVocab.build(texts(), max_size=cfg.tokenizer.vocab_size, min_freq=cfg.tokenizer.min_freq,
                               lowercase=cfg.tokenizer.lowercase)


def _student_module(kind: str, task: str = "classification"):
    import importlib

    from kd.students import STUDENTS

    if task == "token_classification":
        return importlib.import_module(STUDENTS["bilstm"]).BiLSTMTagger
    classes = {"bilstm": "BiLSTMClassifier", "cnn": "CNNClassifier", "transformer": "TransformerClassifier"}
    return getattr(importlib.import_module(STUDENTS[kind]), classes[kind])


def _tagger_student():
    from kd.students.bilstm import TaggerStudent

    return TaggerStudent


def _optimizer(cfg: TrainConfig, module):
    import torch

    params = [p for p in module.parameters() if p.requires_grad]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adadelta":
        return torch.optim.Adadelta(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    cls = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return cls(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def _loss(cfg: TrainConfig, logits, gold, teacher, temperature: float, progress: float):
    from kd.losses import distillation_loss

    w = cfg.losses
    return distillation_loss(logits, gold=gold, teacher=teacher, ce=w.ce, mse=w.mse, kl=w.kl,
                             temperature=temperature, anneal=cfg.anneal, progress=progress)


def _dev_metrics(student, table: dict[str, Any]) -> dict[str, float]:
    from kd.metrics import accuracy, macro_f1, token_f1

    if student.task == "token_classification":  # epoch selection by token accuracy
        pred = student.predict(table["texts"])
        flat = [(p, g) for ps, gs in zip(pred, table["gold"]) for p, g in zip(ps, gs)]
        return {"dev_accuracy": sum(p == g for p, g in flat) / max(1, len(flat)),
                "dev_token_f1": token_f1(pred, table["gold"])}
    pred = student.predict(table["texts"], table["pairs"], return_names=False)
    return {"dev_accuracy": accuracy(pred, table["gold"]), "dev_macro_f1": macro_f1(pred, table["gold"])}


class _Resume:
    """Per-epoch checkpoints in scratch: epoch-N.safetensors + optim-N.pt, then state.json last,
    so a crash while saving leaves the previous epoch's state intact."""

    def __init__(self, scratch: Path, config_hash: str):
        self.dir = Path(scratch)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.config_hash = config_hash
        self.state_file = self.dir / "state.json"

    def restore(self, module, optimizer) -> tuple[int, int, list, dict | None]:
        import torch
        from safetensors.torch import load_model

        if not self.state_file.is_file():
            return 0, 0, [], None
        state = json.loads(self.state_file.read_text())
        if state.get("config_hash") != self.config_hash:
            return 0, 0, [], None  # scratch of a different configuration: start afresh
        epoch = state["epoch"]
        load_model(module, str(self.dir / f"epoch-{epoch}.safetensors"))
        optimizer.load_state_dict(torch.load(self.dir / f"optim-{epoch}.pt", weights_only=True))
        return epoch, state["step"], state["history"], state["best"]

    def save(self, module, optimizer, *, epoch: int, step: int, history: list, best: dict | None,
             improved: bool) -> None:
        import shutil

        import torch
        from safetensors.torch import save_model

        weights = self.dir / f"epoch-{epoch}.safetensors"
        save_model(module, str(weights))
        torch.save(optimizer.state_dict(), self.dir / f"optim-{epoch}.pt")
        if improved:
            shutil.copyfile(weights, self.dir / ".best.tmp")
            os.replace(self.dir / ".best.tmp", self.dir / "best.safetensors")
        write_json(self.state_file, {"config_hash": self.config_hash, "epoch": epoch, "step": step,
                                     "history": history, "best": best})
        for old in list(self.dir.glob("epoch-*.safetensors")) + list(self.dir.glob("optim-*.pt")):
            if old.stem.split("-")[-1] != str(epoch):
                old.unlink(missing_ok=True)

    def load_best(self, module) -> None:
        from safetensors.torch import load_model

        if (self.dir / "best.safetensors").is_file():
            load_model(module, str(self.dir / "best.safetensors"))


def _plot_curves(history: list[dict[str, Any]], path: Path, *, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    epochs = [h["epoch"] for h in history]
    for key in ("loss", "ce", "mse", "kl"):
        if history and key in history[0]:
            ax.plot(epochs, [h.get(key) for h in history], marker="o", label=f"train {key}")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss")
    if history and "dev_accuracy" in history[0]:
        ax2 = ax.twinx()
        ax2.plot(epochs, [h["dev_accuracy"] for h in history], color="black", linestyle="--", marker="s",
                 label="dev accuracy")
        ax2.set_ylabel("dev accuracy")
        ax2.legend(loc="upper right", fontsize=8)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
