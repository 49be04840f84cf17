"""Seq2seq model code shared by the `seq2seq_teacher` and `train_seq2seq` stages, so teacher and
students train the same way: a joint sentencepiece model and its T5 tokenizer, model dims and a
BART/T5 builder, batching, the teacher-forced passes (token loss, source reliance), `fit` (the
optimiser and schedule over the one training loop of kd/training.py) and the final HF checkpoint
directory."""
from __future__ import annotations

import random
from pathlib import Path
from typing import Any, Callable, Literal

from pydantic import Field

from kd.training import derive_seed
from pipeline.stage import Problem, StageConfig, StageContext

SPM_NAME = "spiece"


class ModelDims(StageConfig):
    """Encoder-decoder sizes. Defaults are test-tiny; manifests set real ones."""

    # BART's layout (scaled attention, post-LN, learned positions) trains much faster from
    # scratch with AdamW than T5's: on Multi30k, 300 updates at lr 2e-3 reach held-out CE 2.96 against 4.29
    # for the same-size T5, whose unscaled attention wants Adafactor or a far lower lr.
    architecture: Literal["bart", "t5"] = "bart"
    d_model: int = Field(64, gt=0)
    d_ff: int = Field(128, gt=0)
    num_layers: int = Field(2, gt=0, description="encoder layers")
    num_decoder_layers: int = Field(2, gt=0)
    num_heads: int = Field(4, gt=0)
    dropout: float = Field(0.1, ge=0, lt=1)


class TrainSchedule(StageConfig):
    """Optimisation settings shared by the teacher and the students. batch_size changes the
    result of training, so unlike an inference batch size it is part of the cache key."""

    epochs: float = Field(1.0, gt=0)
    max_steps: int | None = Field(None, gt=0, description="stop after this many updates")
    batch_size: int = Field(32, gt=0)
    lr: float = Field(1e-3, gt=0)
    warmup_steps: int = Field(100, ge=0)
    label_smoothing: float = Field(0.1, ge=0, lt=1)
    max_source_tokens: int = Field(64, gt=1)
    max_target_tokens: int = Field(64, gt=1)


def train_sentencepiece(texts: list[str], directory: Path, vocab_size: int, *, seed: int) -> Path:
    """A unigram model with T5's ids (pad 0, eos 1, unk 2, no bos) at `directory/spiece.model`."""
    import sentencepiece as spm

    directory.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(directory / SPM_NAME), vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, minloglevel=2, num_threads=1, input_sentence_size=2_000_000,
        shuffle_input_sentence=False)
    return directory / f"{SPM_NAME}.model"


def load_spm_tokenizer(directory: Path):
    """T5Tokenizer over `directory/spiece.model`, its length checked against the model."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    # from_pretrained(dir) reads dir/spiece.model; T5Tokenizer(vocab_file=...) ignores it in 5.x.
    tok = T5Tokenizer.from_pretrained(str(directory), extra_ids=0, legacy=False)
    pieces = spm.SentencePieceProcessor(model_file=str(directory / f"{SPM_NAME}.model")).get_piece_size()
    if len(tok) != pieces or tok.pad_token_id != 0 or tok.eos_token_id != 1:
        raise RuntimeError(f"tokenizer built from {directory} has {len(tok)} tokens (pad "
                           f"{tok.pad_token_id}, eos {tok.eos_token_id}); sentencepiece has {pieces}")
    return tok


MAX_POSITIONS = 256  # BART's learned positions: longest source, target or generation in tokens


def build_model(tokenizer, dims: ModelDims, *, seed: int, max_new_tokens: int, num_beams: int):
    """A randomly initialised encoder-decoder over `tokenizer`'s ids (pad 0 starts decoding)."""
    import torch
    from transformers import (BartConfig, BartForConditionalGeneration, GenerationConfig, T5Config,
                              T5ForConditionalGeneration)

    if dims.d_model % dims.num_heads:
        raise ValueError(f"d_model {dims.d_model} is not divisible by num_heads {dims.num_heads}")
    if max_new_tokens >= MAX_POSITIONS:
        raise ValueError(f"max_new_tokens {max_new_tokens} must be below {MAX_POSITIONS} positions")
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    if dims.architecture == "t5":
        config = T5Config(vocab_size=len(tokenizer), d_model=dims.d_model, d_ff=dims.d_ff,
                          d_kv=dims.d_model // dims.num_heads, num_heads=dims.num_heads,
                          num_layers=dims.num_layers, num_decoder_layers=dims.num_decoder_layers,
                          dropout_rate=dims.dropout, decoder_start_token_id=pad,
                          pad_token_id=pad, eos_token_id=eos)
        model_class = T5ForConditionalGeneration
    else:
        config = BartConfig(vocab_size=len(tokenizer), d_model=dims.d_model,
                            encoder_layers=dims.num_layers, decoder_layers=dims.num_decoder_layers,
                            encoder_attention_heads=dims.num_heads, decoder_attention_heads=dims.num_heads,
                            encoder_ffn_dim=dims.d_ff, decoder_ffn_dim=dims.d_ff, activation_function="relu",
                            dropout=dims.dropout, attention_dropout=0.0, activation_dropout=0.0,
                            max_position_embeddings=MAX_POSITIONS, scale_embedding=True,
                            pad_token_id=pad, eos_token_id=eos, bos_token_id=pad,
                            decoder_start_token_id=pad, forced_eos_token_id=None)
        model_class = BartForConditionalGeneration
    torch.manual_seed(seed)
    model = model_class(config)
    model.generation_config = GenerationConfig(
        decoder_start_token_id=pad, pad_token_id=pad, eos_token_id=eos,
        max_new_tokens=max_new_tokens, num_beams=num_beams)
    return model


def decoder_inputs(model, labels):
    """Teacher-forcing inputs: labels shifted right behind the start token, -100 -> pad."""
    start, pad_id = model.config.decoder_start_token_id, model.config.pad_token_id
    shifted = labels.new_full(labels.shape, start)
    shifted[:, 1:] = labels[:, :-1]
    return shifted.masked_fill(shifted == -100, pad_id)


def encode(tokenizer, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Token ids ending in eos, truncated to max_tokens (eos kept)."""
    ids = tokenizer(texts, add_special_tokens=True)["input_ids"]
    eos = tokenizer.eos_token_id
    return [seq if len(seq) <= max_tokens else seq[: max_tokens - 1] + [eos] for seq in ids]


def make_batches(lengths: list[int], batch_size: int, *, seed: int, epoch: int) -> list[list[int]]:
    """Shuffled, length-bucketed batches (less padding); a pure function of (seed, epoch)."""
    rng = random.Random(derive_seed(seed, "batches", epoch))
    order = list(range(len(lengths)))
    rng.shuffle(order)
    pool = batch_size * 50
    batches = []
    for start in range(0, len(order), pool):
        chunk = sorted(order[start:start + pool], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    rng.shuffle(batches)
    return batches


def pad(seqs: list[list[int]], value: int):
    import torch

    width = max(len(s) for s in seqs)
    return torch.tensor([s + [value] * (width - len(s)) for s in seqs], dtype=torch.long)


def teacher_forced(model, batch: list[dict[str, Any]]):
    """float32 logits of the targets given their sources ({src, tgt} ids), and the padded labels,
    on the model's device."""
    device = next(model.parameters()).device
    src = pad([ex["src"] for ex in batch], 0).to(device)
    labels = pad([ex["tgt"] for ex in batch], -100).to(device)
    logits = model(input_ids=src, attention_mask=(src != 0).long(),
                   decoder_input_ids=decoder_inputs(model, labels)).logits
    return logits.float(), labels


LossFn = Callable[[Any, list[dict[str, Any]], Any], Any]


def token_loss(model, batch: list[dict[str, Any]], schedule: TrainSchedule):
    """Label-smoothed cross-entropy of the targets, teacher-forced."""
    import torch.nn.functional as F

    logits, labels = teacher_forced(model, batch)
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                           label_smoothing=schedule.label_smoothing)


def fit(model, examples: list[dict[str, Any]], schedule: TrainSchedule, *, scratch: Path, seed: int,
        checkpoint_every: int, loss_fn: LossFn = token_loss,
        on_step: Callable[[int], None] | None = None, dtype=None) -> dict[str, Any]:
    """Train `model` on examples ({"src": ids, "tgt": ids, ...}) with AdamW, linear warmup and
    inverse-sqrt decay, through the one training loop (kd.training: checkpoints in `scratch`
    every `checkpoint_every` updates and every epoch; a rerun resumes to the same weights).
    The model trains where it is (CPU or CUDA); `dtype` below float32 runs the forward passes
    under autocast (float32 weights), with loss scaling for float16."""
    import torch

    from kd import training

    if not examples:
        raise ValueError("no training examples")
    lengths = [len(ex["src"]) + len(ex["tgt"]) for ex in examples]
    per_epoch = -(-len(examples) // schedule.batch_size)
    total = max(1, round(schedule.epochs * per_epoch))
    if schedule.max_steps:
        total = min(total, schedule.max_steps)
    optimizer = torch.optim.AdamW(model.parameters(), lr=schedule.lr, betas=(0.9, 0.98), weight_decay=0.0)
    warmup = max(1, schedule.warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min((s + 1) / warmup, (warmup / (s + 1)) ** 0.5))

    def batches(epoch: int, skip: int):
        for ids in make_batches(lengths, schedule.batch_size, seed=seed, epoch=epoch)[skip:]:
            yield [examples[i] for i in ids]

    result = training.fit(model, optimizer=optimizer, scheduler=scheduler, batches=batches,
                          loss_fn=lambda batch, step: loss_fn(model, batch, schedule), steps_per_epoch=per_epoch,
                          total_steps=total, scratch=scratch, seed=seed, dtype=dtype, clip_grad_norm=1.0,
                          checkpoint_every=checkpoint_every, count=len, on_step=on_step, desc="seq2seq")
    return {"steps": total, "epochs": round(total / per_epoch, 3), "examples": len(examples),
            "final_loss": result.final_loss, "loss_curve": result.curve}


def source_reliance(model, examples: list[dict[str, Any]], *, limit: int = 256, batch_size: int = 64) -> float:
    """Teacher-forced target cross-entropy with each source swapped for another example's, minus
    the cross-entropy with its own source, over the first `limit` examples. Near 0 means the
    model ignores its input: it learned the target language, not translation."""
    import torch
    import torch.nn.functional as F

    sample = examples[:limit]
    if len(sample) < 2:
        return float("nan")
    rolled = [{"src": other["src"], "tgt": ex["tgt"]} for ex, other in zip(sample, sample[1:] + sample[:1])]

    def mean_ce(rows: list[dict[str, Any]]) -> float:
        total, tokens = 0.0, 0
        for start in range(0, len(rows), batch_size):
            logits, labels = teacher_forced(model, rows[start:start + batch_size])
            total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                     reduction="sum").item()
            tokens += int((labels != -100).sum())
        return total / max(tokens, 1)

    was_training = model.training
    model.eval()
    with torch.inference_mode():
        gap = mean_ce(rolled) - mean_ce(sample)
    model.train(was_training)
    return gap


def save_checkpoint(model, tok, spm_dir: Path, out: Path) -> int:
    """An HF checkpoint dir (weights, config, tokenizer, the sentencepiece model); returns params."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    shutil.copy(spm_dir / f"{SPM_NAME}.model", out / f"{SPM_NAME}.model")
    return sum(p.numel() for p in model.parameters())


def read_pairs(ctx: StageContext, role: str, source_column: str, target_column: str) -> list[dict[str, str]]:
    """Rows {id, src, tgt} of a parallel artifact, sorted by id (shard order never matters)."""
    table = ctx.input(role).read_table(columns=["id", source_column, target_column])
    rows = [{"id": i, "src": s or "", "tgt": t or ""} for i, s, t in zip(
        table["id"].to_pylist(), table[source_column].to_pylist(), table[target_column].to_pylist())]
    return sorted(rows, key=lambda r: r["id"])


def check_columns(input_columns: dict, role: str, wanted: dict[str, str]) -> list[Problem]:
    problems = []
    for cols in input_columns.get(role, []):
        if cols is None:
            continue
        for loc, col in wanted.items():
            if col not in cols:
                problems.append(Problem(loc, f"column {col!r} is not in the {role!r} input (it has "
                                        f"{', '.join(cols)}); set {loc.split('.')[-1]} to one of them"))
    return problems
