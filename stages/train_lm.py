"""`train_lm`: a GPT-2-style student causal LM trained from `lm_label` shards.

Loss: (1 - kd.alpha) x cross-entropy on the text + kd.alpha x KD from the stored targets:
`topk` (forward, reverse or mixed KL over the k kept ids + one tail bucket) or `sampled`
(the unbiased Sparse Logit Sampling estimate of the forward KL), at temperature kd.temperature
applied here, at train time. From `lm_generate` text (Seq-KD), cross-entropy only (kd.alpha 0)
on the completions. Batches stream from the shards, one shard in memory at a time.
The student uses the teacher's tokenizer (from `tokenizer:` or `inputs: {tokenizer: <stage>}`),
checked against the vocabulary digest the labels were made with.

Output `files/student/`: an HF checkpoint (GPT2LMHeadModel + tokenizer); `files/metrics.json`
with the held-out perplexity when a `heldout` input (documents) is given.
"""
from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, model_validator

from kd.lm.settings import LmDims, LmSchedule
from pipeline.stage import Facts, InputRole, ResourceConfig, Problem, StageConfig, StageContext, TaskStage, throughput, located


class KdSettings(StageConfig):
    alpha: float = Field(0.5, ge=0, le=1, description="weight of the KD term; 0 = cross-entropy only")
    temperature: float = Field(1.0, gt=0)
    divergence: Literal["forward", "reverse", "mixed"] = "forward"
    mix: float = Field(0.5, ge=0, le=1, description="mixed: weight of the forward KL")


class TrainLmConfig(ResourceConfig):
    tokenizer: str | None = located(None, description="directory holding the teacher's tokenizer (e.g. its "
                                  "checkpoint); or give inputs: {tokenizer: <stage with files/model/>}")
    student: LmDims = Field(default_factory=LmDims)
    train: LmSchedule = Field(default_factory=LmSchedule)
    kd: KdSettings = Field(default_factory=KdSettings)
    heldout_text_column: str = "text"
    eval_max_length: int = Field(128, gt=1)
    checkpoint_every: int = throughput(200, gt=0, description="updates between scratch checkpoints")

    @model_validator(mode="after")
    def _dims(self) -> "TrainLmConfig":
        if self.num_gpus:
            raise ValueError("train_lm runs on CPU only for now; set num_gpus: 0")
        if self.student.d_model % self.student.heads:
            raise ValueError(f"student.d_model {self.student.d_model} is not divisible by student.heads "
                             f"{self.student.heads}")
        return self


class TrainLmStage(TaskStage):
    type = "train_lm"
    Config = TrainLmConfig
    seeded = True  # initial weights, batch order, dropout
    inputs = {
        "data": InputRole(doc="lm_label shards (topk or sampled targets) or lm_generate text"),
        "tokenizer": InputRole(required=False, kind="files", doc="a stage with files/model/ (the teacher)"),
        "heldout": InputRole(required=False, doc="held-out documents for perplexity"),
    }
    config: TrainLmConfig

    def fingerprint(self) -> dict[str, str]:
        """The tokenizer directory's files, when `tokenizer` is a path."""
        from pathlib import Path

        from pipeline.hashing import hash_tree

        tok = self.config.tokenizer
        return {"tokenizer": hash_tree(tok)} if tok and Path(tok).is_dir() else {}

    def validate(self, *, input_columns) -> list[Problem]:
        from pathlib import Path

        cfg = self.config
        problems: list[Problem] = []
        if (cfg.tokenizer is not None) == bool(input_columns.get("tokenizer")):
            problems.append(Problem("config.tokenizer", "give exactly one of `tokenizer: <dir>` or "
                                    "`inputs: {tokenizer: <stage>}`: the student must use the teacher's tokenizer"))
        elif cfg.tokenizer is not None and not Path(cfg.tokenizer).is_dir():
            problems.append(Problem("config.tokenizer", f"tokenizer directory {cfg.tokenizer!r} not found"))
        for cols in input_columns.get("data", []):
            if cols is not None and "input_ids" not in cols:
                problems.append(Problem("inputs.data", "the data input is not an lm_label artifact (no input_ids "
                                        "column); feed train_lm from an lm_label or lm_generate stage"))
        for cols in input_columns.get("heldout", []):
            if cols is not None and cfg.heldout_text_column not in cols:
                problems.append(Problem("config.heldout_text_column", f"column {cfg.heldout_text_column!r} is not "
                                        f"in the heldout input (it has {', '.join(cols)})"))
        return problems

    def validate_facts(self, *, input_facts) -> list[Problem]:
        """The vocabulary the labels were made with against the student's tokenizer, and loss
        options the stored targets cannot serve."""
        cfg = self.config
        data = (input_facts.get("data") or [Facts()])[0]
        problems: list[Problem] = []
        mode = data.get("lm_mode")
        if mode == "text" and cfg.kd.alpha > 0:
            problems.append(Problem("config.kd.alpha", "the data holds teacher-generated text (lm_generate), no "
                                    "token distributions: set kd.alpha: 0 (cross-entropy on the teacher's text is "
                                    "sequence-level KD), or feed train_lm from an lm_label stage"))
        if mode == "sampled" and cfg.kd.divergence != "forward" and cfg.kd.alpha > 0:
            problems.append(Problem("config.kd.divergence", f"{cfg.kd.divergence} KL needs the teacher's "
                                    "probabilities of the student's likely ids, which sampled targets do not hold; "
                                    "use divergence: forward, or label with mode: topk"))
        if mode == "sampled" and cfg.kd.temperature != 1.0 and not data.get("lm_logprobs"):
            problems.append(Problem("config.kd.temperature", "sampled targets at a temperature other than 1 need "
                                    "the teacher log-probs: set store_logprobs: true in the lm_label stage, or "
                                    "temperature: 1"))
        if cfg.tokenizer is not None and data.get("lm_vocab"):
            from kd.lm.text import load_tokenizer, mismatch_message, vocab_digest

            try:
                student_tok = load_tokenizer(cfg.tokenizer)
            except Exception as e:  # noqa: BLE001 - any load failure is a config problem here
                return problems + [Problem("config.tokenizer", f"cannot load a tokenizer from {cfg.tokenizer}: {e}")]
            if vocab_digest(student_tok) != data.get("lm_vocab"):
                teacher_dir = data.get("lm_tokenizer")
                problems.append(Problem("config.tokenizer", mismatch_message(
                    teacher_dir, cfg.tokenizer, load_tokenizer(teacher_dir), student_tok)))
        return problems

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import torch

        from kd.lm.data import ShardBatches, epoch_plan, steps_per_epoch
        from kd.lm.text import load_tokenizer, vocab_digest
        from kd.lm.settings import build_gpt2, total_steps
        from kd.lm.training import fit, perplexity, student_loss

        cfg = self.config
        torch.set_num_threads(max(1, int(ctx.num_cpus)))
        data = ctx.input("data")
        md = data.file_metadata()
        tok_dir = cfg.tokenizer or str(ctx.input("tokenizer").files_dir / "model")
        tok = load_tokenizer(tok_dir)
        if vocab_digest(tok) != md.get("kdpipe.vocab_digest"):
            raise ValueError(f"the tokenizer at {tok_dir} (vocab digest {vocab_digest(tok)}) is not the one the "
                             f"labels were made with (digest {md.get('kdpipe.vocab_digest')}); the student must use "
                             "the teacher's tokenizer: point `tokenizer` at the teacher's checkpoint")
        codec = json.loads(md["kdpipe.codec"])
        mode, k = codec["mode"], codec["k"]
        if mode == "text" and cfg.kd.alpha > 0:
            raise ValueError("the data is lm_generate text without token distributions: set kd.alpha: 0")
        shard_rows = [s["rows"] for s in sorted(data.manifest["shards"], key=lambda s: s["index"])]
        per_epoch = steps_per_epoch(shard_rows, cfg.train.batch_size)
        total = total_steps(cfg.train, per_epoch)
        reader = ShardBatches(data.shard_paths(), mode=mode, k=k, temperature=cfg.kd.temperature)
        plans: dict[int, list] = {}

        def batch_at(epoch: int, offset: int):
            if epoch not in plans:
                plans.clear()
                plans[epoch] = epoch_plan(shard_rows, cfg.train.batch_size, seed=ctx.seed, epoch=epoch)
            return reader.batch(*plans[epoch][offset])

        d = cfg.student
        model = build_gpt2(len(tok), d, seed=ctx.seed)
        loss_fn = student_loss(vocab_size=len(tok), alpha=cfg.kd.alpha, temperature=cfg.kd.temperature,
                               divergence=cfg.kd.divergence, mix=cfg.kd.mix)
        stats = fit(model, batch_at=batch_at, steps_per_epoch=per_epoch, total_steps=total, loss_fn=loss_fn,
                    lr=cfg.train.lr, warmup_steps=cfg.train.warmup_steps, scratch=ctx.scratch_dir / "train",
                    seed=ctx.seed, checkpoint_every=cfg.checkpoint_every)
        metrics: dict[str, Any] = {"targets": mode, "k": k, "parameters": sum(p.numel() for p in model.parameters()),
                                   **stats}
        heldout = ctx.optional_input("heldout")
        if heldout is not None:
            texts = [t or "" for t in heldout.read_table(columns=[cfg.heldout_text_column])[cfg.heldout_text_column]
                     .to_pylist()]
            metrics["heldout"] = perplexity(model, tok, texts, max_length=min(cfg.eval_max_length, d.max_positions))
        out = ctx.out_dir / "student"
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return {k_: v for k_, v in metrics.items() if k_ != "loss_curve"}
