"""`train_multitask`: one student, a shared encoder and one head per task, trained on several
tasks' data and teacher labels at once (MT-DNN KD, Liu et al. 2019; BAM!, Clark et al. 2019).

* Single-task batches; the task of each step is drawn with probability ∝ size ** sampling_alpha
  (BAM!: 0.75), a pure function of (seed, step) (`kd.multitask.TaskSampler`).
* Per task: its `data` input, optional teacher `labels` (several = an ensemble: MT-DNN KD's soft
  target is the mean of the teachers' probabilities at `temperature`), a loss weight, and either
  a fixed gold weight (MT-DNN's mix of soft-target and gold cross-entropy) or BAM! teacher
  annealing (the gold weight rises 0 -> 1 over the task's window of training). A task without
  labels trains on gold only, so one stage gives the multi-task KD, single-task KD (one task)
  and no-KD (no labels) students of a comparison with the same encoder and schedule.
* `adversarial` (optional, one task): imitation KD with a discriminator (after Liu et al. AAAI
  2019): a discriminator learns to tell the teachers' output distributions from the student's,
  and through a reversed gradient (one backward pass, Ganin & Lempitsky 2015) the student learns
  to make them indistinguishable, on top of its KD loss. Its accuracy on each batch is recorded.

Inputs are named by manifest stage: `tasks[].data`, `tasks[].labels`, `tasks[].dev` must each be
listed under the stage's `data`, `labels` and `dev` inputs. Rows and teacher logits are joined
by id. Output: `files/student/` (weights, vocabulary, student.json with the task heads),
`files/metrics.json` (per-task dev accuracy, steps per task, loss and discriminator curves).
Training runs on the one training loop (`kd.training`): checkpoints every epoch, and a crash
resumes to the same weights.
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import Field, model_validator

from pipeline.devices import NumericsConfig, worker_device
from pipeline.hashing import hash_obj
from pipeline.stage import (InputRole, Problem, StageConfig, StageContext, TaskStage, throughput,
                            throughput_fields)


class TaskSpec(StageConfig):
    name: str = Field(description="the task's name (its head and its rows in metrics)")
    data: str = Field(description="manifest name of this task's training data (listed under inputs.data)")
    labels: list[str] = Field(default_factory=list, description="label stages of its teacher(s) "
                              "(listed under inputs.labels); empty = gold labels only")
    dev: str | None = Field(None, description="held-out rows scored at the end (listed under inputs.dev)")
    text_column: str = "text"
    pair_column: str | None = Field(None, description="second sentence: a sentence-pair task")
    label_column: str = "label"
    weight: float = Field(1.0, gt=0, description="this task's loss weight")
    gold_weight: float = Field(0.5, ge=0, le=1, description="MT-DNN: gold CE weight in the mix "
                               "(rows with gold), when not annealing")
    anneal: bool = Field(False, description="BAM! teacher annealing: gold weight 0 -> 1 over the window")
    anneal_start: float = Field(0.0, ge=0, lt=1)
    anneal_end: float = Field(1.0, gt=0, le=1)


class EncoderSpec(StageConfig):
    embedding_dim: int = Field(100, gt=0)
    hidden_dim: int = Field(100, gt=0)
    mlp_dim: int = Field(100, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)


class AdversarialSpec(StageConfig):
    task: str = Field(description="the task whose teacher distributions the discriminator sees")
    weight: float = Field(0.1, ge=0, description="weight of the fool-the-discriminator term")
    hidden_dim: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0, description="the discriminator's Adam learning rate")


class TrainMultitaskConfig(NumericsConfig):
    tasks: list[TaskSpec] = Field(min_length=1)
    encoder: EncoderSpec = Field(default_factory=EncoderSpec)
    vocab_size: int = Field(30_000, gt=3)
    max_length: int = Field(64, gt=0)
    sampling_alpha: float = Field(0.75, ge=0, description="P(task) ∝ size ** alpha (BAM!)")
    epochs: float = Field(3.0, gt=0, description="steps = epochs x the tasks' batches per epoch, summed")
    batch_size: int = Field(32, gt=0)
    lr: float = Field(2e-3, gt=0)
    temperature: float = Field(1.0, gt=0, description="of the teachers' soft targets and the soft loss")
    adversarial: AdversarialSpec | None = None
    seed: int = Field(0, description="combined with the manifest seed: students of several seeds "
                      "over teachers trained once")
    eval_batch_size: int = throughput(256, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "TrainMultitaskConfig":
        names = [t.name for t in self.tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for t in self.tasks:
            if t.anneal and t.anneal_start >= t.anneal_end:
                raise ValueError(f"task {t.name!r}: anneal_start must be below anneal_end")
        if self.adversarial and self.adversarial.task not in names:
            raise ValueError(f"adversarial.task {self.adversarial.task!r} is not one of the tasks {names}")
        return self


class TrainMultitaskStage(TaskStage):
    type = "train_multitask"
    Config = TrainMultitaskConfig
    seeded = True
    default_num_cpus = 1
    inputs = {
        "data": InputRole(many=True, doc="each task's training rows (id, text, gold label)"),
        "labels": InputRole(required=False, many=True, doc="teacher label artifacts, named in tasks[].labels"),
        "dev": InputRole(required=False, many=True, doc="held-out rows, named in tasks[].dev"),
    }
    config: TrainMultitaskConfig

    @classmethod
    def report_section(cls, *, name: str, files_dir, manifest: dict[str, Any]):
        from pipeline.stage import ReportSection

        m = json.loads((files_dir / "metrics.json").read_text())
        rows = [{"model": f"{name}[{task}]", "role": "student", "type": "multitask bilstm",
                 "params": m.get("parameters"), "metric": f"accuracy ({task} dev)", "value": t.get("dev_accuracy"),
                 "labels": ", ".join(t.get("labels") or []) or "gold only"}
                for task, t in m.get("tasks", {}).items() if t.get("dev_accuracy") is not None]
        return ReportSection(rows)

    def validate(self, *, input_columns) -> list[Problem]:
        cfg = self.config
        refs = self.input_refs or {}
        problems: list[Problem] = []
        for i, task in enumerate(cfg.tasks):
            for field, role, names in (("data", "data", [task.data]), ("labels", "labels", task.labels),
                                       ("dev", "dev", [task.dev] if task.dev else [])):
                listed = refs.get(role) or []
                for name in names:
                    if refs and name not in listed:
                        problems.append(Problem(f"config.tasks[{i}].{field}", f"{name!r} is not under inputs.{role} "
                                                f"({', '.join(listed) or 'none'}); add it there"))
                        continue
                    if not refs or role == "labels":
                        continue
                    cols = input_columns.get(role, [])[listed.index(name)]
                    wanted = [task.text_column, task.label_column] + ([task.pair_column] if task.pair_column else [])
                    missing = [c for c in wanted if cols is not None and c not in cols]
                    if missing:
                        problems.append(Problem(f"config.tasks[{i}]", f"{role} {name!r} has no column(s) "
                                                f"{', '.join(missing)} (it has {', '.join(cols)})"))
        return problems

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import torch

        from kd.multitask_training import load_task, train_multitask

        cfg = self.config
        refs = self.input_refs or {role: [a.key for a in arts] for role, arts in ctx.inputs.items()}

        def named(role: str, name: str):
            arts = ctx.inputs.get(role) or []
            listed = refs.get(role) or []
            if name not in listed:
                raise KeyError(f"{role} input {name!r} not given to stage {ctx.stage_name!r}")
            return arts[listed.index(name)]

        torch.set_num_threads(max(1, int(ctx.num_cpus)))
        tasks = [load_task(spec, data=named("data", spec.data), labels=[named("labels", n) for n in spec.labels],
                           dev=named("dev", spec.dev) if spec.dev else None) for spec in cfg.tasks]
        device, _ = worker_device(self.numerics(), stage=ctx.stage_name)
        semantic = cfg.model_dump(mode="json", exclude=throughput_fields(type(cfg)))
        identity = hash_obj([semantic, ctx.seed, {role: [a.key for a in arts] for role, arts in ctx.inputs.items()}])
        from kd.training import derive_seed

        seed = derive_seed(int(ctx.seed or 0), cfg.seed) if cfg.seed else int(ctx.seed or 0)
        result = train_multitask(cfg, tasks, seed=seed, device=device,
                                 scratch=ctx.scratch_dir / "train", identity=identity)
        out = ctx.out_dir / "student"
        result.pop("save")(out)
        (ctx.out_dir / "metrics.json").write_text(json.dumps(result, indent=2, sort_keys=True) + "\n")
        return {k: v for k, v in result.items() if k not in ("loss_curve", "discriminator_curve", "history")}
