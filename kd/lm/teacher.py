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
