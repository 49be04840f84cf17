"""Loading a causal LM teacher and scoring windows of tokens with it."""
from __future__ import annotations

from pathlib import Path
from typing import Any


def load_causal_lm(local: Path, *, device: str, dtype, revision: str | None = None,
                   trust_remote_code: bool = False):
    """(model in eval mode, tokenizer). The model's vocabulary may be padded beyond the
    tokenizer's length (rows never produced by the tokenizer): callers slice logits to len(tok)."""
    import transformers

    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    tok = transformers.AutoTokenizer.from_pretrained(str(local), **kwargs)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(local), dtype=dtype, **kwargs)
    model.to(device).eval()
    vocab = model.get_output_embeddings().weight.shape[0]
    if vocab < len(tok):
        raise ValueError(f"{local}: the model has {vocab} output rows but its tokenizer {len(tok)} tokens; "
                         "ids past the model's vocabulary cannot be scored: use the tokenizer saved with the model")
    return model, tok


def window_logits(model, seqs: list[list[int]], *, pad_id: int, device: str) -> list[Any]:
    """float32 [len-1, V_model] next-token logits of each right-padded sequence (position i
    predicts token i+1)."""
    import torch

    width = max(len(s) for s in seqs)
    ids = torch.tensor([s + [pad_id] * (width - len(s)) for s in seqs], device=device)
    mask = torch.tensor([[1] * len(s) + [0] * (width - len(s)) for s in seqs], device=device)
    logits = model(input_ids=ids, attention_mask=mask).logits.float()
    return [logits[i, : len(s) - 1].cpu() for i, s in enumerate(seqs)]


def check_teacher_source(cfg, input_columns, *, stage: str) -> list:
    """Plan-time problems of an LM stage's teacher (exactly one of `config.teacher` or a teacher
    input; a causal LM, not an encoder-decoder) and of its `text_column` in the data."""
    import json

    from kd.teachers import check_teacher, resolve_teacher
    from pipeline.stage import Problem

    from_input = bool(input_columns.get("teacher"))
    if (cfg.teacher is not None) == from_input:
        what = "two teacher sources" if from_input else "no teacher"
        return [Problem("config.teacher", f"{what}: give exactly one of `teacher: <dir or hub id>` "
                                          "or `inputs: {teacher: <stage>}`")]
    problems = []
    for cols in input_columns.get("data", []):
        if cols is not None and cfg.text_column not in cols:
            problems.append(Problem("config.text_column", f"column {cfg.text_column!r} is not in the data "
                                    f"(it has {', '.join(cols)}); set text_column to one of them"))
    if cfg.teacher is not None:
        problems += check_teacher(cfg.teacher, revision=cfg.revision, task="lm", trust_remote_code=cfg.trust_remote_code,
                                  allow_new_head=True, loc="config.teacher")
        local = resolve_teacher(cfg.teacher, cfg.revision)
        if not problems and local is not None:
            config = json.loads((local / "config.json").read_text())
            if config.get("is_encoder_decoder"):
                problems.append(Problem("config.teacher", f"{local} is an encoder-decoder model; {stage} needs a "
                                        "causal LM (GPT-2, Llama, ...); use `label` with task: seq2seq"))
            elif isinstance(config.get("vocab_size"), int):
                problems += _vocab_rows_problem(local, config["vocab_size"])
    return problems


def _vocab_rows_problem(local: Path, rows: int) -> list:
    """A tokenizer with more ids than the model has output rows: those ids cannot be scored.
    (More rows than ids, a padded vocabulary, is fine: the extra rows are sliced off.)"""
    from kd.lm.text import load_tokenizer
    from pipeline.stage import Problem

    try:
        size = len(load_tokenizer(local))
    except Exception as e:  # noqa: BLE001 - any load failure is a config problem here
        return [Problem("config.teacher", f"cannot load the tokenizer saved with {local}: {e}")]
    if size <= rows:
        return []
    return [Problem("config.teacher", f"{local}: the tokenizer has {size} tokens but the model only {rows} output rows "
                    f"(config.json vocab_size); ids {rows}..{size - 1} cannot be scored: use the tokenizer saved with "
                    "the model, or resize the model's embeddings to the tokenizer")]


def teacher_vocab_facts(cfg) -> dict[str, Any]:
    """The teacher's vocabulary digest, size and tokenizer directory when the teacher is a path
    (for train_lm to check its tokenizer against before anything runs); {} otherwise."""
    from kd.lm.text import load_tokenizer, vocab_digest
    from kd.teachers import resolve_teacher

    local = resolve_teacher(cfg.teacher, cfg.revision) if cfg.teacher else None
    if local is None or not (local / "config.json").is_file():
        return {}
    try:
        tok = load_tokenizer(local)
    except Exception:  # noqa: BLE001 - an unloadable tokenizer is reported when the stage runs
        return {}
    return {"lm_vocab": vocab_digest(tok), "lm_vocab_size": len(tok), "lm_tokenizer": str(local)}


def configured_teacher(cfg) -> dict[str, Path]:
    """`external_models()` of a stage whose teacher may be given by path, `pkg:` folder or pinned
    hub id (`config.teacher`): that folder, to be stored once in the workdir; {} when the teacher
    is an upstream artifact."""
    from kd.teachers import resolve_teacher

    if cfg.teacher is None:
        return {}
    local = resolve_teacher(cfg.teacher, cfg.revision)
    if local is None:
        raise FileNotFoundError(f"teacher {cfg.teacher!r} not found locally or in the HF cache")
    return {"teacher": local}


def teacher_dir(cfg, ctx) -> Path:
    """The checkpoint directory: the workdir's stored copy of `config.teacher` (external_models),
    else `config.teacher` resolved here, or the teacher input's files/model/."""
    from kd.teachers import resolve_teacher

    if cfg.teacher is None:
        return ctx.input("teacher").files_dir / "model"
    local = ctx.model_dir("teacher") or resolve_teacher(cfg.teacher, cfg.revision)
    if local is None:
        raise FileNotFoundError(f"teacher {cfg.teacher!r} not found locally or in the HF cache")
    return local
