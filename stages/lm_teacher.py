"""`lm_teacher`: train a small GPT-2-style causal LM from scratch, with its own sentencepiece
vocabulary, on the documents of one or more `read` artifacts (e.g. Multi30k English + SST-2
sentences). For experiments where no pretrained LM can be downloaded.

Output `files/model/`: an HF checkpoint (GPT2LMHeadModel, embedding padded to a multiple of
`pad_vocab_to` rows as released LMs often are, and the tokenizer) that `lm_label` loads with
AutoModelForCausalLM; `files/metrics.json` with the held-out perplexity when `heldout` is given.
"""
from __future__ import annotations

import json
import random
from typing import Any

from pydantic import Field, model_validator

from kd.lm.settings import LmDims, LmSchedule
from pipeline.stage import InputRole, Problem, ResourceConfig, StageContext, TaskStage, throughput


class LmTeacherConfig(ResourceConfig):
    text_column: str = "text"
    vocab_size: int = Field(4000, gt=10, description="sentencepiece vocabulary (a soft limit)")
    pad_vocab_to: int = Field(64, gt=0, description="embedding rows rounded up to a multiple of this")
    max_length: int = Field(64, gt=1, description="tokens per training window")
    model: LmDims = Field(default_factory=LmDims)
    train: LmSchedule = Field(default_factory=LmSchedule)
    checkpoint_every: int = throughput(200, gt=0)

    @model_validator(mode="after")
    def _cpu_only(self) -> "LmTeacherConfig":
        if self.num_gpus:
            raise ValueError("lm_teacher runs on CPU only for now; set num_gpus: 0")
        return self


class LmTeacherStage(TaskStage):
    type = "lm_teacher"
    Config = LmTeacherConfig
    seeded = True  # sentencepiece, initial weights, batch order, dropout
    inputs = {"data": InputRole(many=True, doc="documents (id + text), one or more read stages"),
              "heldout": InputRole(required=False, many=True, doc="held-out documents for perplexity")}
    config: LmTeacherConfig

    def validate(self, *, input_columns) -> list[Problem]:
        cfg = self.config
        problems = []
        for role in ("data", "heldout"):
            for i, cols in enumerate(input_columns.get(role, [])):
                if cols is not None and cfg.text_column not in cols:
                    problems.append(Problem(f"inputs.{role}[{i}]", f"column {cfg.text_column!r} is missing "
                                            f"(it has {', '.join(cols)}); set text_column"))
        if cfg.model.d_model % cfg.model.heads:
            problems.append(Problem("config.model.heads", f"d_model {cfg.model.d_model} is not divisible by "
                                    f"heads {cfg.model.heads}"))
        if cfg.max_length > cfg.model.max_positions:
            problems.append(Problem("config.max_length", f"max_length {cfg.max_length} exceeds "
                                    f"model.max_positions {cfg.model.max_positions}"))
        return problems

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import numpy as np
        import torch
        from transformers import GPT2LMHeadModel

        from kd.lm.data import token_batch
        from kd.lm.settings import total_steps
        from kd.lm.text import document_ids, load_tokenizer, windows
        from kd.lm.tokenizer import gpt2_config, train_spm_tokenizer
        from kd.lm.training import fit, perplexity, student_loss
        from kd.training import derive_seed

        cfg = self.config
        torch.set_num_threads(max(1, int(ctx.num_cpus)))
        texts = _texts(ctx.inputs.get("data", []), cfg.text_column)
        tok_dir = ctx.scratch_dir / "tokenizer"
        if not (tok_dir / "tokenizer_config.json").is_file():  # kept across a resume
            train_spm_tokenizer(texts, tok_dir, cfg.vocab_size, seed=ctx.seed)
        tok = load_tokenizer(tok_dir)
        rows = []
        for text in texts:
            ids = document_ids(tok, text)
            rows += [(np.asarray(ids[w.start:w.end]), w.target_start)
                     for w in windows(len(ids), cfg.max_length, max(1, cfg.max_length // 2))]
        bs = cfg.train.batch_size
        per_epoch = -(-len(rows) // bs)

        def batch_at(epoch: int, offset: int):
            order = list(range(len(rows)))
            random.Random(derive_seed(ctx.seed, "teacher-batches", epoch)).shuffle(order)
            chunk = [rows[i] for i in order[offset * bs:(offset + 1) * bs]]
            return token_batch([r[0] for r in chunk], np.array([r[1] for r in chunk]))

        d = cfg.model
        torch.manual_seed(derive_seed(ctx.seed, "init"))
        model = GPT2LMHeadModel(gpt2_config(len(tok), d_model=d.d_model, layers=d.layers, heads=d.heads,
                                            max_positions=d.max_positions, dropout=d.dropout, pad_to=cfg.pad_vocab_to))
        stats = fit(model, batch_at=batch_at, steps_per_epoch=per_epoch, total_steps=total_steps(cfg.train, per_epoch),
                    loss_fn=student_loss(vocab_size=len(tok), alpha=0.0, temperature=1.0), lr=cfg.train.lr,
                    warmup_steps=cfg.train.warmup_steps, scratch=ctx.scratch_dir / "train", seed=ctx.seed,
                    checkpoint_every=cfg.checkpoint_every)
        metrics: dict[str, Any] = {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tok),
                                   "embedding_rows": model.config.vocab_size, "documents": len(texts),
                                   "windows": len(rows), **stats}
        if ctx.inputs.get("heldout"):
            metrics["heldout"] = perplexity(model, tok, _texts(ctx.inputs["heldout"], cfg.text_column),
                                            max_length=cfg.max_length)
        out = ctx.out_dir / "model"
        model.save_pretrained(str(out))
        tok.save_pretrained(str(out))
        (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        return {k: v for k, v in metrics.items() if k != "loss_curve"}


def _texts(artifacts, column: str) -> list[str]:
    """Non-empty documents of every artifact, sorted by (artifact order, id): shard order never matters."""
    out = []
    for art in artifacts:
        table = art.read_table(columns=["id", column])
        pairs = sorted(zip(table["id"].to_pylist(), table[column].to_pylist()), key=lambda p: str(p[0]))
        out += [str(t) for _, t in pairs if t and str(t).strip()]
    return out
