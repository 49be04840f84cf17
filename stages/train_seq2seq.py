"""`train_seq2seq`: a small encoder-decoder student (BART layout by default) trained on one of five targets.

    reference      the corpus' own target column (the baseline)
    seqkd          sequence-level KD: the teacher's top beam hypothesis (Kim & Rush 2016)
    seqinter       the n-best hypothesis closest to the reference by sentence BLEU (sacrebleu)
    wordkd         word-level KD as Kim & Rush define it: teacher-forced on the *gold* target,
                   (1 - kd_alpha) * NLL of the reference + kd_alpha * cross-entropy against the
                   teacher's top-k distributions given the gold prefixes (renormalised over the k
                   tokens; the label stage's `reference_column` stores them as ref_topk_*).
    seqkd_wordkd   Seq-KD + Word-KD: the same loss along the teacher's top hypothesis instead
                   (its top-k at the hypothesis' own positions, topk_*).

Inputs: `data` (id, source and reference columns), `labels` (the label stage's seq2seq table:
hyp_text, hyp_ids, hyp_scores, topk_ids, topk_logprobs, ref_ids, ref_topk_*; joined by id),
`teacher` (its files artifact: the student reuses the teacher's tokenizer, required for the
word-level targets since the top-k ids index the teacher's vocabulary). Without `teacher`, a
sentencepiece model is trained on the data.

Output `files/student/` (HF checkpoint + tokenizer + student.json, loaded by
`kd.students.seq2seq`), `files/metrics.json`, `files/curves.png`.
"""
from __future__ import annotations

import dataclasses
import functools

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field

from kd.seq2seq import (SPM_NAME, ModelDims, TrainSchedule, build_model, check_columns, encode, fit,
                        load_spm_tokenizer, read_pairs, save_checkpoint, source_reliance, token_loss,
                        train_sentencepiece)
from pipeline.stage import InputRole, Problem, StageContext, TaskStage, throughput
from kd.training import derive_seed
from pipeline.devices import NumericsConfig, worker_device

Target = Literal["reference", "seqkd", "seqinter", "wordkd", "seqkd_wordkd"]
LABEL_COLUMNS = {"reference": [], "seqkd": ["hyp_text", "hyp_ids"], "seqinter": ["hyp_text", "hyp_ids"],
                 "wordkd": ["ref_ids", "ref_topk_ids", "ref_topk_logprobs"],
                 "seqkd_wordkd": ["hyp_ids", "topk_ids", "topk_logprobs"]}
WORD_LEVEL = ("wordkd", "seqkd_wordkd")


class TrainSeq2SeqConfig(NumericsConfig):
    target: Target = "reference"
    source_column: str = "text"
    target_column: str = Field("de", description="reference translations (reference, seqinter)")
    vocab_size: int = Field(1000, gt=10, description="own sentencepiece size when no teacher input")
    model: ModelDims = Field(default_factory=ModelDims)
    train: TrainSchedule = Field(default_factory=TrainSchedule)
    kd_alpha: float = Field(0.5, ge=0, le=1, description="wordkd, seqkd_wordkd: weight of the top-k term")
    num_beams: int = Field(4, gt=0, description="default beam width stored in generation_config")
    checkpoint_every: int = throughput(200, gt=0)
    seed: int = Field(0, ge=0, description="a run seed beside the manifest's (0: the manifest's seed alone), "
                      "for several seeds of one student in one manifest")


# --- targets ----------------------------------------------------------------------------------

def closest_hypothesis(hypotheses: list[str], reference: str) -> int:
    """Index of the hypothesis with the highest sentence BLEU against the reference; ties go
    to the better-ranked (earlier) hypothesis."""
    from sacrebleu.metrics import BLEU

    bleu = BLEU(effective_order=True)  # sentence-level BLEU, as sacrebleu.sentence_bleu
    scores = [bleu.sentence_score(h, [reference]).score for h in hypotheses]
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def clean_hypothesis(ids: list[int], *, start_id: int, pad_id: int, eos_id: int) -> list[int]:
    """Generated ids as training targets: no decoder-start token, no padding, ending in eos."""
    ids = list(ids)
    if ids and ids[0] == start_id:
        ids = ids[1:]
    while ids and ids[-1] == pad_id:
        ids.pop()
    if eos_id in ids:
        ids = ids[: ids.index(eos_id) + 1]
    else:
        ids.append(eos_id)
    return ids


def join_labels(pairs: list[dict[str, Any]], labels, columns: list[str]) -> list[dict[str, Any]]:
    """Attach each pair's label row by id. Every pair must be labelled: a student trained on a
    silently smaller set would be compared unfairly against the reference student."""
    table = labels.read_table(columns=["id", *columns])
    by_id = {row["id"]: row for row in table.to_pylist()}
    missing = [p["id"] for p in pairs if p["id"] not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} of {len(pairs)} rows have no label (e.g. id {missing[0]!r}); "
                         "label the same artifact that feeds `data`")
    return [{**p, "label": by_id[p["id"]]} for p in pairs]


def target_texts(pairs: list[dict[str, Any]]) -> list[str]:
    """The target-language side a student's own sentencepiece must cover: references, and the
    teacher's hypotheses when labels are joined (Seq-KD pairs carry no reference; a vocabulary
    trained on the sources alone turns target-only characters into <unk>)."""
    texts = [p["tgt"] for p in pairs if p["tgt"]]
    texts += [h for p in pairs if "label" in p for h in p["label"].get("hyp_text") or []]
    return texts


def build_examples(pairs: list[dict[str, Any]], tok, cfg: TrainSeq2SeqConfig, *,
                   teacher_vocab: bool) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Training examples {src, tgt[, topk_ids, topk_logprobs]} for the configured target."""
    sched, mode = cfg.train, cfg.target
    src = encode(tok, [p["src"] for p in pairs], sched.max_source_tokens)
    stats: dict[str, Any] = {}
    if mode == "reference":
        tgt = encode(tok, [p["tgt"] for p in pairs], sched.max_target_tokens)
        return [{"src": s, "tgt": t} for s, t in zip(src, tgt)], stats
    if mode == "wordkd":  # the gold target, as the label stage encoded it for the teacher
        examples = []
        for s, p in zip(src, pairs):
            label = p["label"]
            n = min(sched.max_target_tokens, len(label["ref_ids"]), len(label["ref_topk_ids"]))
            examples.append({"src": s, "tgt": list(label["ref_ids"][:n]), "topk_ids": label["ref_topk_ids"][:n],
                             "topk_logprobs": label["ref_topk_logprobs"][:n]})
        _check_ids(tok, [ex["tgt"] for ex in examples], "gold target")
        return examples, stats
    chosen = [0] * len(pairs)
    if mode == "seqinter":
        chosen = [closest_hypothesis(p["label"]["hyp_text"], p["tgt"]) for p in pairs]
        stats["seqinter_not_top"] = round(sum(c != 0 for c in chosen) / max(1, len(chosen)), 4)
    if teacher_vocab:  # the teacher's own ids: no detokenise/retokenise round trip
        special = dict(start_id=tok.pad_token_id, pad_id=tok.pad_token_id, eos_id=tok.eos_token_id)
        tgt = [clean_hypothesis(p["label"]["hyp_ids"][c], **special)[: sched.max_target_tokens]
               for p, c in zip(pairs, chosen)]
        _check_ids(tok, tgt, "hypothesis")
    else:
        tgt = encode(tok, [p["label"]["hyp_text"][c] for p, c in zip(pairs, chosen)], sched.max_target_tokens)
    examples = [{"src": s, "tgt": t} for s, t in zip(src, tgt)]
    if mode == "seqkd_wordkd":
        for ex, p in zip(examples, pairs):
            n = min(len(ex["tgt"]), len(p["label"]["topk_ids"]))
            ex["tgt"] = ex["tgt"][:n]
            ex["topk_ids"] = p["label"]["topk_ids"][:n]
            ex["topk_logprobs"] = p["label"]["topk_logprobs"][:n]
    return examples, stats


def _check_ids(tok, targets: list[list[int]], what: str) -> None:
    too_big = max((max(t) for t in targets if t), default=-1)
    if too_big >= len(tok):
        raise ValueError(f"{what} token id {too_big} is outside the teacher tokenizer "
                         f"({len(tok)} tokens): the labels come from another teacher")


def word_kd_loss(model, batch: list[dict[str, Any]], schedule: TrainSchedule, alpha: float):
    """(1 - alpha) * NLL of the target + alpha * CE(teacher top-k distribution, student)."""
    import torch
    import torch.nn.functional as F

    from kd.seq2seq import teacher_forced

    logits, labels = teacher_forced(model, batch)
    nll = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                          label_smoothing=schedule.label_smoothing)
    k = len(batch[0]["topk_ids"][0])
    width = labels.shape[1]
    ids = torch.zeros((len(batch), width, k), dtype=torch.long)
    teacher_lp = torch.full((len(batch), width, k), -1e4)
    for b, ex in enumerate(batch):
        n = len(ex["topk_ids"])
        ids[b, :n] = torch.tensor(ex["topk_ids"], dtype=torch.long)
        teacher_lp[b, :n] = torch.tensor(ex["topk_logprobs"], dtype=torch.float32)
    ids, teacher_lp = ids.to(logits.device), teacher_lp.to(logits.device)
    # The label stage pads top-k with id -1 / -inf when the vocabulary is smaller than k.
    absent = (ids < 0) | ~torch.isfinite(teacher_lp)
    ids = ids.clamp(min=0)
    teacher_lp = teacher_lp.masked_fill(absent, -1e4)
    mask = labels != -100
    teacher_p = torch.softmax(teacher_lp, dim=-1)
    student_lp = torch.log_softmax(logits, dim=-1).gather(-1, ids)
    kd = -(teacher_p * student_lp).sum(-1)
    kd = (kd * mask).sum() / mask.sum().clamp(min=1)
    return (1 - alpha) * nll + alpha * kd


# --- the stage --------------------------------------------------------------------------------

class TrainSeq2SeqStage(TaskStage):
    type = "train_seq2seq"
    Config = TrainSeq2SeqConfig
    seeded = True
    inputs = {
        "data": InputRole(doc="parallel corpus: id, source and reference columns"),
        "labels": InputRole(required=False, doc="label stage output, task seq2seq"),
        "teacher": InputRole(required=False, kind="files", doc="teacher checkpoint: tokenizer to share"),
    }

    config: TrainSeq2SeqConfig
    model_folder = "student"

    def validate(self, *, input_columns) -> list[Problem]:
        cfg = self.config
        wanted = {"config.source_column": cfg.source_column}
        if cfg.target in ("reference", "seqinter"):
            wanted["config.target_column"] = cfg.target_column
        problems = check_columns(input_columns, "data", wanted)
        needs = LABEL_COLUMNS[cfg.target]
        if needs and "labels" not in input_columns:
            problems.append(Problem("inputs", f"target {cfg.target!r} needs the teacher's labels: add "
                                    "`labels: <label stage>` (task seq2seq) to inputs"))
        for cols in input_columns.get("labels", []):
            missing = [c for c in needs if cols is not None and c not in cols]
            if missing:
                hint = (" (set `topk:` and `reference_column:` in the label stage)" if "ref_topk_ids" in missing
                        else " (set `topk:` in the label stage)" if "topk_ids" in missing else "")
                problems.append(Problem("inputs.labels", f"labels lack column(s) {', '.join(missing)} "
                                        f"needed by target {cfg.target!r}{hint}"))
        if cfg.target in WORD_LEVEL and "teacher" not in input_columns:
            problems.append(Problem("inputs", f"target {cfg.target!r} compares distributions over the teacher's "
                                    "vocabulary: add `teacher: <teacher stage>` so the student shares it"))
        if cfg.model.d_model % cfg.model.num_heads:
            problems.append(Problem("config.model.num_heads", f"d_model {cfg.model.d_model} must be "
                                    f"divisible by num_heads {cfg.model.num_heads}; change one of them"))
        return problems

    def _tokenizer(self, ctx: StageContext, pairs: list[dict[str, Any]]):
        import shutil

        teacher = ctx.optional_input("teacher")
        spm_dir = ctx.scratch_dir / "tokenizer"
        if not (spm_dir / f"{SPM_NAME}.model").is_file():
            if teacher is not None:
                source = teacher.files_dir / "model" / f"{SPM_NAME}.model"
                if not source.is_file():
                    raise FileNotFoundError(f"{source} missing: the teacher input must be a "
                                            "seq2seq_teacher artifact (files/model/spiece.model)")
                spm_dir.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, spm_dir / f"{SPM_NAME}.model")
            else:
                texts = [p["src"] for p in pairs] + target_texts(pairs)
                train_sentencepiece(texts, spm_dir, self.config.vocab_size, seed=ctx.seed)
        tok = load_spm_tokenizer(spm_dir)
        if teacher is not None:
            from transformers import AutoTokenizer

            theirs = AutoTokenizer.from_pretrained(str(teacher.files_dir / "model"))
            if theirs.get_vocab() != tok.get_vocab():
                raise ValueError("the teacher's tokenizer differs from its spiece.model")
        return tok, spm_dir

    def run(self, ctx: StageContext) -> dict[str, Any]:
        cfg = self.config
        if cfg.seed:  # initialisation, batch order and dropout all follow ctx.seed
            ctx = dataclasses.replace(ctx, seed=derive_seed(ctx.seed, "run-seed", cfg.seed) % 2**31)  # spm wants 32 bits
        has_teacher = ctx.optional_input("teacher") is not None
        if cfg.target in ("reference", "seqinter"):
            pairs = read_pairs(ctx, "data", cfg.source_column, cfg.target_column)
        else:
            pairs = _read_sources(ctx, cfg.source_column)
        if cfg.target != "reference":
            columns = list(dict.fromkeys(["hyp_text", *LABEL_COLUMNS[cfg.target]]))
            pairs = join_labels(pairs, ctx.input("labels"), columns)
            _check_same_teacher(ctx)
        if cfg.target in WORD_LEVEL and not has_teacher:
            raise ValueError(f"target {cfg.target!r} needs the `teacher` input (its vocabulary indexes the top-k ids)")
        tok, spm_dir = self._tokenizer(ctx, pairs)
        examples, target_stats = build_examples(pairs, tok, cfg, teacher_vocab=has_teacher)
        # As planned (num_gpus > 0 -> CUDA), or DeviceUnavailable naming this node.
        device, dtype = worker_device(self.numerics(), stage=ctx.stage_name)
        model = build_model(tok, cfg.model, seed=derive_seed(ctx.seed, "student-init"),
                            max_new_tokens=cfg.train.max_target_tokens, num_beams=cfg.num_beams).to(device)
        loss_fn = functools.partial(word_kd_loss, alpha=cfg.kd_alpha) if cfg.target in WORD_LEVEL else token_loss
        stats = fit(model, examples, cfg.train, scratch=ctx.scratch_dir / "train", seed=ctx.seed,
                    checkpoint_every=cfg.checkpoint_every, loss_fn=loss_fn, dtype=dtype)
        stats["source_reliance"] = source_reliance(model, examples)
        out = ctx.out_dir / "student"
        params = save_checkpoint(model, tok, spm_dir, out)
        meta = {"type": "seq2seq", "task": "seq2seq", "target": cfg.target, "source_column": cfg.source_column,
                "parameters": params, "hyperparameters": cfg.model_dump(mode="json")}
        (out / "student.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        metrics = {"target": cfg.target, "parameters": params, "vocab_size": len(tok), "device": device.type,
                   "dtype": str(dtype).removeprefix("torch."), **target_stats, **stats}
        (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        _plot_curve(stats["loss_curve"], ctx.out_dir / "curves.png", title=f"train_seq2seq ({cfg.target})")
        return {k: v for k, v in metrics.items() if k != "loss_curve"}


def _check_same_teacher(ctx: StageContext) -> None:
    """Hypothesis and top-k ids index the labelling teacher's vocabulary: refuse labels made by
    another teacher than the `teacher` input (known from the label artifact's manifest)."""
    teacher = ctx.optional_input("teacher")
    if teacher is None:
        return
    used = [t.get("key") for t in (ctx.input("labels").manifest.get("inputs") or {}).get("teacher", [])]
    if used and teacher.key not in used:
        raise ValueError(f"the labels were made by teacher artifact(s) {used}, not by the `teacher` input "
                         f"{teacher.key}; give the student the teacher that labelled its data")


def _read_sources(ctx: StageContext, source_column: str) -> list[dict[str, Any]]:
    """Distillation targets need no reference column: the source side and ids only."""
    table = ctx.input("data").read_table(columns=["id", source_column])
    rows = [{"id": i, "src": s or "", "tgt": ""} for i, s in zip(table["id"].to_pylist(),
                                                               table[source_column].to_pylist())]
    return sorted(rows, key=lambda r: r["id"])


def _plot_curve(curve: list[list[float]], path: Path, *, title: str) -> None:
    if not curve:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3))
    ax.plot([c[0] for c in curve], [c[1] for c in curve])
    ax.set(xlabel="update", ylabel="training loss", title=title)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
