"""The causal LM training loop (teacher and students alike), the student's loss, perplexity.

`fit` asks `batch_at(epoch, offset)` for each step's batch, so it never holds a corpus: the
students stream from shards (kd.lm.data), the teacher from its in-memory windows. The loop,
checkpoints and resume are kd/training.py's, as for every trainer; batches are a pure function of
(seed, epoch, offset), so a rerun ends with the same weights as an uninterrupted run.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable


def fit(model, *, batch_at: Callable[[int, int], dict[str, Any]], steps_per_epoch: int, total_steps: int,
        loss_fn: Callable[[Any, dict[str, Any]], Any], lr: float, warmup_steps: int, scratch: Path,
        seed: int, checkpoint_every: int) -> dict[str, Any]:
    """AdamW with linear warmup, then linear decay to 10% at the last step, on the one training
    loop (kd.training)."""
    import torch

    from kd import training

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
    warmup = max(1, warmup_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(
        (s + 1) / warmup, max(0.1, 1 - 0.9 * (s - warmup) / max(1, total_steps - warmup))))

    def batches(epoch: int, skip: int):
        for offset in range(skip, steps_per_epoch):
            yield batch_at(epoch, offset)

    result = training.fit(model, optimizer=optimizer, scheduler=scheduler, batches=batches,
                          loss_fn=lambda batch, step: loss_fn(model, batch), steps_per_epoch=steps_per_epoch,
                          total_steps=total_steps, scratch=scratch, seed=seed, clip_grad_norm=1.0,
                          checkpoint_every=checkpoint_every, desc="lm")
    resumed = result.resumed_from["step"] if result.resumed_from else None
    return {"steps": total_steps, "epochs": round(total_steps / max(steps_per_epoch, 1), 3),
            "final_loss": result.final_loss, "loss_curve": result.curve, "resumed_from_step": resumed}


def target_logits(model, batch: dict[str, Any], vocab_size: int):
    """Student logits [M, V] at the batch's target positions (padded vocab rows dropped)."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return logits[batch["target_mask"]][:, :vocab_size]


def student_loss(*, vocab_size: int, alpha: float, temperature: float, divergence: str = "forward",
                 mix: float = 0.5, teacher=None) -> Callable[[Any, dict[str, Any]], Any]:
    """(1 - alpha) CE on the text + alpha x KD from whatever targets the batch carries (topk,
    sampled, or an online `teacher` model for full-distribution KD)."""
    import torch
    import torch.nn.functional as F

    from kd.lm import losses

    def loss_fn(model, batch):
        logits = target_logits(model, batch, vocab_size)
        ce = F.cross_entropy(logits.float(), batch["targets"])
        if alpha == 0:
            return ce
        if teacher is not None:
            with torch.no_grad():
                t = target_logits(teacher, batch, vocab_size)
            kd = losses.full_kd(logits, t, temperature=temperature, divergence=divergence, mix=mix)
        elif "topk_ids" in batch:
            kd = losses.topk_kd(logits, batch["topk_ids"], batch["topk_logprobs"], temperature=temperature,
                                divergence=divergence, mix=mix)
        else:
            kd = losses.sampled_kd(logits, batch["sample_pos"], batch["sample_ids"], batch["sample_weights"],
                                   temperature=temperature)
        return (1 - alpha) * ce + alpha * kd

    return loss_fn


def perplexity(model, tok, texts: list[str], *, max_length: int, stride: int | None = None,
               batch_size: int = 32) -> dict[str, float]:
    """exp(mean next-token NLL) over every token of `texts` (documents as in lm_label: a start
    token, the text, eos; long ones in strided windows, each token scored once)."""
    import math

    import numpy as np
    import torch
    import torch.nn.functional as F

    from kd.lm.data import token_batch
    from kd.lm.text import document_ids, windows

    stride = stride or max(1, max_length // 2)
    rows = []
    for text in texts:
        if text and text.strip():
            ids = document_ids(tok, text)
            rows += [(np.asarray(ids[w.start:w.end]), w.target_start) for w in windows(len(ids), max_length, stride)]
    rows.sort(key=lambda r: len(r[0]))
    nll, tokens = 0.0, 0
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            batch = token_batch([r[0] for r in chunk], np.array([r[1] for r in chunk]))
            logits = target_logits(model, batch, len(tok))
            nll += F.cross_entropy(logits.float(), batch["targets"], reduction="sum").item()
            tokens += len(batch["targets"])
    model.train(was_training)
    return {"perplexity": math.exp(nll / max(tokens, 1)), "nll": nll / max(tokens, 1), "tokens": tokens}
