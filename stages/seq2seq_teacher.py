"""`seq2seq_teacher`: train a small transformer translation teacher from scratch on a parallel
artifact (e.g. `read` with `format: parallel`, columns `text` = EN and `de`).

Output `files/model/`: an ordinary Hugging Face checkpoint (BartForConditionalGeneration by
default, T5ForConditionalGeneration with `model.architecture: t5`; a T5Tokenizer built from a
joint sentencepiece model trained on both sides of the corpus) that the `label` stage loads with
AutoModelForSeq2SeqLM / AutoTokenizer like any other teacher.

The building blocks (sentencepiece + tokenizer, model dims, resumable training loop) live in
`kd/seq2seq.py`, shared with `train_seq2seq`, so teacher and students train the same way.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from kd.seq2seq import (SPM_NAME, ModelDims, TrainSchedule, build_model, check_columns, decoder_inputs, encode, fit,
                        load_spm_tokenizer, read_pairs, save_checkpoint, source_reliance, train_sentencepiece)
from kd.training import derive_seed
from pipeline.devices import NumericsConfig, worker_device
from pipeline.stage import InputRole, Problem, StageContext, TaskStage, throughput

# decoder_inputs: importable from here for callers that predate kd/seq2seq.py (new code imports kd).
__all__ = ["ModelDims", "Seq2SeqTeacherConfig", "Seq2SeqTeacherStage", "TrainSchedule", "decoder_inputs"]


class Seq2SeqTeacherConfig(NumericsConfig):
    source_column: str = "text"
    target_column: str = "de"
    vocab_size: int = Field(1000, gt=10, description="joint sentencepiece vocabulary (a soft limit)")
    model: ModelDims = Field(default_factory=ModelDims)
    train: TrainSchedule = Field(default_factory=TrainSchedule)
    num_beams: int = Field(4, gt=0, description="default beam width stored in generation_config")
    checkpoint_every: int = throughput(200, gt=0, description="updates between scratch checkpoints")


# --- the stage --------------------------------------------------------------------------------

class Seq2SeqTeacherStage(TaskStage):
    type = "seq2seq_teacher"
    Config = Seq2SeqTeacherConfig
    seeded = True
    inputs = {"data": InputRole(doc="parallel corpus: id, source and target columns")}

    config: Seq2SeqTeacherConfig
    model_folder = "model"

    def validate(self, *, input_columns) -> list[Problem]:
        cfg = self.config
        problems = check_columns(input_columns, "data", {"config.source_column": cfg.source_column,
                                                          "config.target_column": cfg.target_column})
        if cfg.model.d_model % cfg.model.num_heads:
            problems.append(Problem("config.model.num_heads", f"d_model {cfg.model.d_model} must be "
                                    f"divisible by num_heads {cfg.model.num_heads}; change one of them"))
        return problems

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        pairs = read_pairs(ctx, "data", cfg.source_column, cfg.target_column)
        spm_dir = ctx.scratch_dir / "tokenizer"
        if not (spm_dir / f"{SPM_NAME}.model").is_file():  # kept across a resume
            texts = [p["src"] for p in pairs] + [p["tgt"] for p in pairs]
            train_sentencepiece(texts, spm_dir, cfg.vocab_size, seed=ctx.seed)
        tok = load_spm_tokenizer(spm_dir)
        # As planned (num_gpus > 0 -> CUDA), or DeviceUnavailable naming this node.
        device, dtype = worker_device(self.numerics(), stage=ctx.stage_name)
        model = build_model(tok, cfg.model, seed=derive_seed(ctx.seed, "init"),
                            max_new_tokens=cfg.train.max_target_tokens, num_beams=cfg.num_beams).to(device)
        src = encode(tok, [p["src"] for p in pairs], cfg.train.max_source_tokens)
        tgt = encode(tok, [p["tgt"] for p in pairs], cfg.train.max_target_tokens)
        examples = [{"src": s, "tgt": t} for s, t in zip(src, tgt)]
        stats = fit(model, examples, cfg.train, scratch=ctx.scratch_dir / "train", seed=ctx.seed,
                    checkpoint_every=cfg.checkpoint_every, dtype=dtype)
        stats["source_reliance"] = source_reliance(model, examples)
        params = save_checkpoint(model, tok, spm_dir, ctx.out_dir / "model")
        return {"parameters": params, "vocab_size": len(tok), "device": device.type,
                "dtype": str(dtype).removeprefix("torch."), **stats}
