"""Model sizes and optimisation settings shared by the LM teacher and student stages."""
from __future__ import annotations

from pydantic import Field

from pipeline.stage import StageConfig


class LmDims(StageConfig):
    """GPT-2 sizes. Defaults are test-tiny; manifests set real ones."""

    d_model: int = Field(64, gt=0)
    layers: int = Field(2, gt=0)
    heads: int = Field(2, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)
    max_positions: int = Field(256, gt=1)


class LmSchedule(StageConfig):
    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0)
    batch_size: int = Field(16, gt=0, description="windows per update (changes the result: in the key)")
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(50, ge=0)


def build_gpt2(vocab_size: int, dims: LmDims, *, seed: int):
    """A randomly initialised GPT2LMHeadModel over `vocab_size` ids."""
    import torch
    from transformers import GPT2LMHeadModel

    from kd.lm.tokenizer import gpt2_config

    torch.manual_seed(seed)
    return GPT2LMHeadModel(gpt2_config(vocab_size, d_model=dims.d_model, layers=dims.layers, heads=dims.heads,
                                       max_positions=dims.max_positions, dropout=dims.dropout))


def total_steps(schedule: LmSchedule, per_epoch: int) -> int:
    total = max(1, round(schedule.epochs * per_epoch))
    return min(total, schedule.max_steps) if schedule.max_steps else total
