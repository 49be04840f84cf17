"""`train`: fit a small student (bilstm, cnn, transformer) on gold labels and/or teacher logits.

Inputs: `data` (shards with id, the student's text column(s), gold `label`), `labels` (label
artifacts, optional and possibly several: without them this is the no-KD baseline), `tokenizer`
(an `spm` artifact, optional), `init` (a fine-tuned teacher's artifact, optional: a transformer
student starts from its embeddings, `student.init_layers` of its layers and its head, and reads
its tokenizer), `dev` (optional, for epoch selection; never the test set),
`unlabeled` (target-domain text, only with `domain_adversarial`: adversarial feature adaptation
after Xu & Yang 2017, see kd/domain_adversarial.py; its rows are held in memory).

Streaming: one data shard is in memory at a time. Shards are visited in a seeded order per epoch,
rows within a shard are ordered by a hash of (seed, epoch, id), and a batch never crosses a shard
boundary. Teacher logits are joined to the shard by id (the label shard with the same index is
tried first, then every label shard is scanned). So the result does not depend on the worker
count nor on how the label artifacts are sharded, but it does depend on the `data` artifact's
shard layout (its source's `rows_per_shard`): which rows share a batch changes with it.

Gold labels on augmented rows (`aug_index >= 0`) are ignored when a teacher is present, as in
Tang et al. 2019: an augmented sentence may no longer carry its parent's label, and the teacher's
logits are its only trustworthy target. Without a teacher (the baseline) the parent label is used.

Training runs on the one training loop (kd/training.py): after every epoch a checkpoint goes to
ctx.scratch_dir; an interrupted run continues from the last finished epoch and ends with the
same weights as an uninterrupted one (shuffling is seeded per epoch, dropout per update).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from pipeline.artifact import write_json
from pipeline.devices import NumericsConfig, move, worker_device
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
    init_layers: list[int] | None = Field(
        None, description="transformer with an `init` input: which of its layers the student keeps, in order "
        "(DistilBERT: every other one, [0, 2, 4]); default all")


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


class DomainAdversarialSpec(StageConfig):
    weight: float = Field(0.1, ge=0, description="scale of the reversed domain gradient the student gets "
                          "(0: the discriminator only measures the domain gap, a control)")
    hidden_dim: int = Field(64, gt=0, description="the discriminator's hidden layer")
    lr: float = Field(1e-3, gt=0, description="the discriminator's learning rate")
    schedule: Literal["ganin", "constant"] = Field(
        "ganin", description="reversal strength: ganin = 2/(1+exp(-10p))-1 over training progress p; constant = 1")
    column: str | None = Field(None, description="text column of the `unlabeled` input; default: student_column")


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
    group_by_length: bool = Field(False, description="batches of rows of similar length, still shuffled (less "
                                  "padding: a transformer student on SST-2 phrases trains faster); changes the result")
    max_length: int = Field(64, gt=0)
    patience: int | None = Field(None, gt=0, description="stop after this many epochs without dev gain")
    domain_adversarial: DomainAdversarialSpec | None = Field(
        None, description="Xu & Yang 2017: make the student's features on `data` and on the `unlabeled` "
        "target-domain text indistinguishable to a discriminator (gradient reversal)")
    seed: int = 0


class TrainStage(TaskStage):
    type = "train"
    Config = TrainConfig
    seeded = True
    inputs = {
        "data": InputRole(required=True, doc="transfer set with id, text and gold label"),
        "labels": InputRole(required=False, many=True, doc="teacher label artifact(s)"),
        "tokenizer": InputRole(required=False, kind="files", doc="an spm stage"),
        "init": InputRole(required=False, kind="files", doc="a fine-tuned HF model (finetune stage) the "
                          "transformer student is initialised from: embeddings, init_layers, head, tokenizer"),
        "dev": InputRole(required=False, doc="dev set for epoch selection"),
        "unlabeled": InputRole(required=False, doc="target-domain text for domain_adversarial (no labels read)"),
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
    def tokenizer_kind(self, has_spm_input: bool, has_init_input: bool = False) -> str:
        return self.config.tokenizer.kind or ("spm" if has_spm_input else "hf" if has_init_input else "word")

    def validate(self, *, input_columns) -> list[Problem]:
        cfg, problems = self.config, []
        has_labels = bool(input_columns.get("labels"))
        if not any((cfg.losses.ce, cfg.losses.mse, cfg.losses.kl)):
            problems.append(Problem("config.losses", "all loss weights are 0; set e.g. `ce: 1` or `kl: 1`"))
        if (cfg.losses.mse or cfg.losses.kl or cfg.anneal) and not has_labels:
            problems.append(Problem("inputs.labels", "losses.mse/kl and anneal need teacher logits: add "
                                    "`labels: <label stage>` or set them to 0 for a gold-only baseline"))
        has_init = bool(input_columns.get("init"))
        kind = self.tokenizer_kind(bool(input_columns.get("tokenizer")), has_init)
        if kind == "spm" and not input_columns.get("tokenizer"):
            problems.append(Problem("config.tokenizer.kind", "spm needs `inputs: {tokenizer: <spm stage>}`"))
        problems += self._validate_init(has_init, kind)
        if kind == "hf" and not has_init and not (cfg.tokenizer.path and Path(cfg.tokenizer.path).is_dir()):
            problems.append(Problem("config.tokenizer.path", f"hf tokenizer needs a local directory; "
                                    f"{cfg.tokenizer.path!r} is not one"))
        st = cfg.student
        if cfg.task == "token_classification" and (st.type != "bilstm" or kind != "word" or cfg.student_pair_column):
            problems.append(Problem("config.task", "token_classification trains a bilstm tagger on a word vocab "
                                    "without pairs: set student.type: bilstm, tokenizer.kind: word, no pair column"))
        if st.type == "transformer" and not has_init:
            if not st.hf_config and not st.architecture_from:
                problems.append(Problem("config.student", "a transformer student needs `hf_config: {model_type: "
                                        "bert, hidden_size: 64, ...}` or `architecture_from: <HF dir>`"))
            if st.architecture_from and not (Path(st.architecture_from) / "config.json").is_file():
                problems.append(Problem("config.student.architecture_from",
                                        f"{st.architecture_from!r} holds no config.json; give an HF model dir"))
        problems += self._validate_domain_adversarial(input_columns)
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

    def _validate_init(self, has_init: bool, tokenizer_kind: str) -> list[Problem]:
        st, tok = self.config.student, self.config.tokenizer
        if not has_init:
            return [Problem("config.student.init_layers", "init_layers picks layers of an `init` model: add "
                            "`init: <finetune stage>` to inputs or drop init_layers")] if st.init_layers is not None else []
        problems = []
        if st.type != "transformer" or self.config.task != "classification":
            problems.append(Problem("inputs.init", "only a transformer classification student starts from an "
                                    "`init` model: set student.type: transformer or drop the input"))
        if st.hf_config or st.architecture_from:
            problems.append(Problem("config.student", "the `init` model gives the architecture: drop "
                                    "hf_config/architecture_from (init_layers picks its depth)"))
        if tokenizer_kind != "hf" or tok.path:
            problems.append(Problem("config.tokenizer", "a student initialised from a model reads that model's "
                                    "tokenizer: drop tokenizer.kind/path"))
        if st.init_layers is not None and (not st.init_layers or len(set(st.init_layers)) != len(st.init_layers)
                                           or min(st.init_layers) < 0):
            problems.append(Problem("config.student.init_layers", f"{st.init_layers}: give distinct layer "
                                    "indices >= 0, e.g. [0, 2, 4]"))
        return problems

    def _validate_domain_adversarial(self, input_columns) -> list[Problem]:
        cfg, spec = self.config, self.config.domain_adversarial
        unlabeled = input_columns.get("unlabeled")
        if spec is None:
            return [Problem("inputs.unlabeled", "an `unlabeled` input is read only by domain_adversarial; "
                            "set `domain_adversarial: {weight: 0.1}` or drop the input")] if unlabeled else []
        problems = []
        if not unlabeled:
            problems.append(Problem("inputs.unlabeled", "domain_adversarial needs target-domain text: add "
                                    "`unlabeled: <stage>` (e.g. a read stage of in-domain sentences)"))
        if cfg.task != "classification" or cfg.student_pair_column:
            problems.append(Problem("config.domain_adversarial", "domain_adversarial adapts single-text "
                                    "classification students; drop it, student_pair_column or task"))
        column = spec.column or cfg.student_column
        for cols in unlabeled or []:
            if cols is not None and column not in cols:
                problems.append(Problem("inputs.unlabeled", f"column {column!r} missing (it has {', '.join(cols)}); "
                                        "set domain_adversarial.column"))
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
        import itertools

        from kd import training

        cfg = self.config
        seed = training.derive_seed(ctx.seed, cfg.seed)
        job = self._prepare(ctx, seed)
        stream, module, device = job["stream"], job["module"], job["device"]
        per_epoch = stream.batches_per_epoch()
        total_steps = cfg.epochs * per_epoch

        def batches(epoch: int, skip: int):
            return itertools.islice(stream.batches(epoch=epoch, seed=seed, module=module), skip, None)

        adapt = _DomainAdaptation(self, ctx, job, seed=seed, total_steps=total_steps) \
            if cfg.domain_adversarial else None

        def loss_fn(item, step: int):
            batch, gold, teacher = (move(x, device) for x in item)
            loss = _loss(cfg, module(**batch), gold, teacher, job["temperature"], step / max(1, total_steps - 1))
            return adapt.add_to(loss, step=step, rows=len(gold)) if adapt else loss

        dev_table = job["dev_table"]
        optimizer = _optimizer(cfg, module)
        if adapt:
            optimizer.add_param_group({"params": list(adapt.adversary.parameters()), "lr": cfg.domain_adversarial.lr})
        result = training.fit(
            adapt.model if adapt else module, optimizer=optimizer, loss_fn=loss_fn, batches=batches, steps_per_epoch=per_epoch,
            total_steps=total_steps, scratch=ctx.scratch_dir, seed=seed, device=device, dtype=job["dtype"],
            evaluate=(lambda epoch: _dev_metrics(job["student"], dev_table)) if dev_table is not None else None,
            select=(lambda record: record["dev_accuracy"]) if dev_table is not None else None,
            patience=cfg.patience, identity=job["identity"], count=lambda item: len(item[1]),
            on_epoch_end=on_epoch_end, desc=ctx.stage_name)
        if adapt:
            adapt.close()
        return self._write_outputs(ctx, job, result)

    def _prepare(self, ctx: StageContext, seed: int) -> dict[str, Any]:
        """Everything training needs: label sources and names, tokenizer, the student on its
        device, the data stream, the dev table and the checkpoint identity."""
        import torch

        from kd.students.common import ClassifierStudent
        from kd.training import derive_seed

        cfg = self.config
        data, labels, dev = ctx.input("data"), ctx.inputs.get("labels") or [], ctx.optional_input("dev")
        sources = label_sources(labels)
        if any(s.task != cfg.task for s in sources):
            raise ValueError(f"config.task is {cfg.task!r} but the label artifacts hold "
                             f"{sorted({s.task for s in sources})} labels; set task to match the label stage")
        label_names = resolve_label_names(data, sources, cfg.label_column, cfg.task)
        n_columns = sum(len(s.columns) for s in sources)
        if cfg.ensemble.mode == "weighted" and len(cfg.ensemble.weights or []) != n_columns:
            raise ValueError(f"config.ensemble.weights: {len(cfg.ensemble.weights or [])} weights for "
                             f"{n_columns} teacher logit columns")
        meta = {"type": cfg.student.type, "task": cfg.task, "num_labels": len(label_names),
                "label_names": label_names, "pair": cfg.student_pair_column is not None,
                "max_length": cfg.max_length, "student_column": cfg.student_column,
                "student_pair_column": cfg.student_pair_column,
                "hyperparameters": cfg.student.model_dump(mode="json", exclude_none=True)}
        # Read once: the target domain's words join the vocabulary, its rows feed the adversary.
        unlabeled = _unlabeled_texts(ctx, cfg) if cfg.domain_adversarial else None
        tokenizer = self._build_tokenizer(ctx, data, extra_texts=unlabeled or [])
        # As planned (num_gpus > 0 -> CUDA), or DeviceUnavailable naming this node.
        device, dtype = worker_device(self.numerics(), stage=ctx.stage_name)
        torch.manual_seed(derive_seed(seed, "init"))
        init_art, initialised = ctx.optional_input("init"), None
        if init_art is not None:
            module, initialised = _student_module(cfg.student.type).from_teacher(
                init_art.files_dir / "model", layers=cfg.student.init_layers, meta=meta, tokenizer=tokenizer)
            module = module.to(device)
        else:
            module = _student_module(cfg.student.type, cfg.task).create(meta=meta, tokenizer=tokenizer).to(device)
        student = (ClassifierStudent if cfg.task == "classification" else _tagger_student())(module=module, meta=meta)
        semantic = cfg.model_dump(mode="json", exclude=throughput_fields(TrainConfig))
        return {"sources": sources, "module": module, "student": student, "device": device, "dtype": dtype,
                "temperature": cfg.temperature or next((s.temperature for s in sources if s.temperature), 1.0),
                "stream": ShardStream(data=data, sources=sources, label_names=label_names, cfg=cfg,
                                      use_gold_on_augmented=cfg.gold_on_augmented or not sources),
                "dev_table": read_eval_table(dev, cfg, label_names) if dev is not None else None,
                "unlabeled_texts": unlabeled, "initialised_from": initialised,
                "identity": hash_obj([semantic, seed, [a.key for a in labels], data.key]
                                     + ([init_art.key] if init_art is not None else []))}

    def _write_outputs(self, ctx: StageContext, job: dict[str, Any], result) -> dict[str, Any]:
        cfg, history = self.config, result.history
        best = history[result.best_epoch - 1] if result.best_epoch else None
        student_dir = job["student"].save(ctx.out_dir / "student")
        consumed = [{"key": s.key, "stage": s.stage_name, "columns": s.columns} for s in job["sources"]]
        resumed = result.resumed_from["epoch"] if result.resumed_from else None
        metrics = {"student": cfg.student.type, "parameters": job["student"].num_parameters(), "history": history,
                   "best_epoch": result.best_epoch, "labels": consumed,
                   "temperature": job["temperature"], "resumed_from_epoch": resumed or None,
                   "initialised_from": job["initialised_from"],
                   "dev_accuracy": best.get("dev_accuracy") if best else None,
                   "dev_macro_f1": best.get("dev_macro_f1") if best else None,
                   "train_examples_per_s": history[-1]["examples_per_s"] if history else None}
        if cfg.domain_adversarial and history:  # epoch means: they survive a resume
            metrics["discriminator_accuracy_first"] = round(history[0]["discriminator_accuracy"], 4)
            metrics["discriminator_accuracy_last"] = round(history[-1]["discriminator_accuracy"], 4)
        write_json(ctx.out_dir / "metrics.json", metrics)
        _plot_curves(history, ctx.out_dir / "curves.png", title=f"{ctx.stage_name} ({cfg.student.type})")
        return {k: metrics[k] for k in ("student", "parameters", "best_epoch", "labels", "dev_accuracy",
                                        "resumed_from_epoch", "train_examples_per_s", "discriminator_accuracy_first",
                                        "discriminator_accuracy_last") if k in metrics} | {
            "epochs_run": len(history), "student_dir": str(student_dir), "device": job["device"].type,
            "dtype": str(job["dtype"]).removeprefix("torch.")}

    def _build_tokenizer(self, ctx: StageContext, data, *, extra_texts: list[str]):
        from kd.students.common import HFTokenizer, SpmTokenizer, WordVocab

        cfg = self.config
        spm_art, init_art = ctx.optional_input("tokenizer"), ctx.optional_input("init")
        kind = self.tokenizer_kind(spm_art is not None, init_art is not None)
        if kind == "spm":
            return SpmTokenizer(spm_art.files_dir / "spm.model")
        if kind == "hf":
            return HFTokenizer(init_art.files_dir / "model" if init_art is not None else cfg.tokenizer.path)
        cols = [cfg.student_column] + ([cfg.student_pair_column] if cfg.student_pair_column else [])
        if cfg.task == "token_classification":
            words = (w or [] for table in data.iter_shards(columns=cols) for w in table[cfg.student_column].to_pylist())
            return WordVocab.build_from_words(words, max_size=cfg.tokenizer.vocab_size, min_freq=cfg.tokenizer.min_freq,
                                              lowercase=cfg.tokenizer.lowercase)

        def texts():
            for table in data.iter_shards(columns=cols):
                for col in cols:
                    yield from (t or "" for t in table[col].to_pylist())
            yield from extra_texts  # domain_adversarial: the student reads the target domain's words too

        return WordVocab.build(texts(), max_size=cfg.tokenizer.vocab_size, min_freq=cfg.tokenizer.min_freq,
                               lowercase=cfg.tokenizer.lowercase)


def _unlabeled_texts(ctx: StageContext, cfg: TrainConfig) -> list[str]:
    column = cfg.domain_adversarial.column or cfg.student_column
    table = ctx.input("unlabeled").read_table(["id", column])
    return [t or "" for t in table.sort_by("id")[column].to_pylist()]


class _DomainAdaptation:
    """The `domain_adversarial` term of each update: the student's features on its batch (the
    source) and on as many unlabeled target rows, drawn by a seeded per-step choice (so a resumed
    run draws the same rows), into kd.domain_adversarial.DomainAdversary."""

    def __init__(self, stage: "TrainStage", ctx: StageContext, job: dict[str, Any], *, seed: int, total_steps: int):
        import torch

        from kd.domain_adversarial import DomainAdversary, FeatureTap, feature_layer
        from kd.training import derive_seed

        spec, module = stage.config.domain_adversarial, job["module"]
        layer = feature_layer(module)
        self.tap = FeatureTap(layer)
        self.rows = module.tokenize_rows(job["unlabeled_texts"], None)
        if not self.rows:
            raise ValueError("the `unlabeled` input has no rows; domain_adversarial needs target-domain text")
        torch.manual_seed(derive_seed(seed, "discriminator-init"))
        self.adversary = DomainAdversary(feature_dim=module.feature_dim(), hidden_dim=spec.hidden_dim,
                                         weight=spec.weight, schedule=spec.schedule).to(job["device"])
        # Student and discriminator checkpoint and resume together.
        self.model = torch.nn.ModuleDict({"student": module, "adversary": self.adversary})
        self.module, self.device, self.seed, self.total = module, job["device"], seed, total_steps

    def add_to(self, loss, *, step: int, rows: int):
        import numpy as np

        from kd.training import derive_seed

        loss, loss_parts = loss  # distillation_loss: (total, parts)
        source = self.tap.take()
        rng = np.random.default_rng(derive_seed(self.seed, "unlabeled", step))
        pick = rng.choice(len(self.rows), size=min(rows, len(self.rows)), replace=False)
        self.module(**move(self.module.collate([self.rows[i] for i in pick]), self.device))
        domain, parts = self.adversary(source, self.tap.take(), progress=step / max(1, self.total - 1))
        return loss + domain, {**loss_parts, **parts}

    def close(self) -> None:
        self.tap.close()


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
