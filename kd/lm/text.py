"""Tokens of a causal LM corpus: documents -> ids -> windows, and the vocabulary identity that
teacher and student must share."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path


def document_ids(tok, text: str) -> list[int]:
    """[start] + the text's ids + [eos]; the start token is bos, or eos where there is none
    (GPT-2's convention), so the first real token has a prediction too."""
    start = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    if start is None:
        raise ValueError("the tokenizer has neither a bos nor an eos token; a causal LM corpus needs one")
    return [start] + tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


@dataclasses.dataclass(frozen=True)
class Window:
    start: int  # first token of the document in this window
    end: int  # one past the last
    target_start: int  # first position (in the window) whose next token no earlier window predicted


def windows(n_tokens: int, max_length: int, stride: int) -> list[Window]:
    """Windows over a document of n tokens: at most max_length tokens each, each starting
    `stride` tokens after the previous one; every next token is predicted exactly once, by the
    window that sees it with the most context (Hugging Face's perplexity-with-stride scheme)."""
    if not 0 < stride <= max_length - 1:
        raise ValueError(f"stride {stride} must be in 1..max_length-1 ({max_length - 1})")
    if n_tokens <= max_length:
        return [Window(0, n_tokens, 0)]
    out, predicted_until, start = [], 1, 0  # token 0 is never a target
    while predicted_until < n_tokens:
        end = min(start + max_length, n_tokens)
        out.append(Window(start, end, predicted_until - 1 - start))
        predicted_until = end
        start = min(start + stride, n_tokens - max_length) if end < n_tokens else start
    return out


def vocab_digest(tok) -> str:
    """Identity of a vocabulary: every (piece, id) pair and the special ids. Two tokenizers
    with the same digest turn any text into the same ids."""
    specials = {k: getattr(tok, f"{k}_token_id", None) for k in ("pad", "bos", "eos", "unk")}
    blob = json.dumps([sorted(tok.get_vocab().items()), specials, len(tok)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def load_tokenizer(directory: str | Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(directory))


def mismatch_message(teacher_dir: str, student_dir: str, teacher_tok, student_tok) -> str:
    """Why two tokenizers differ, in words: sizes, and the first piece with different ids."""
    a, b = teacher_tok.get_vocab(), student_tok.get_vocab()
    detail = f"teacher {len(teacher_tok)} tokens, student {len(student_tok)}"
    for piece in sorted(set(a) | set(b), key=lambda p: (a.get(p, 1 << 30), p)):
        if a.get(piece) != b.get(piece):
            detail += f"; piece {piece!r} is id {a.get(piece)} for the teacher and {b.get(piece)} for the student"
            break
    return (f"the teacher's tokenizer ({teacher_dir}) and the student's ({student_dir}) differ ({detail}); "
            "token-level KD compares distributions id by id, so the student must use the teacher's "
            "tokenizer: point `tokenizer` at the teacher's checkpoint")
