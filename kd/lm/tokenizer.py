"""A sentencepiece vocabulary for a causal LM trained from scratch, as a transformers tokenizer."""
from __future__ import annotations

from pathlib import Path

from kd.seq2seq import SPM_NAME, load_spm_tokenizer, train_sentencepiece

__all__ = ["SPM_NAME", "gpt2_config", "train_spm_tokenizer"]


def train_spm_tokenizer(texts: list[str], directory: Path, vocab_size: int, *, seed: int):
    """Unigram sentencepiece (pad 0, eos 1, unk 2, no bos: documents start with eos, as in
    GPT-2) saved at `directory`, loaded back as a T5Tokenizer whose length is checked — the same
    vocabulary recipe as the seq2seq models (kd/seq2seq.py), plus the tokenizer files saved."""
    directory = Path(directory)
    train_sentencepiece(texts, directory, vocab_size, seed=seed)
    tok = load_spm_tokenizer(directory)
    tok.save_pretrained(str(directory))
    return tok


def gpt2_config(vocab_size: int, *, d_model: int, layers: int, heads: int, max_positions: int,
                dropout: float = 0.1, pad_to: int = 1):
    """A GPT-2 config over `vocab_size` ids (pad 0, eos 1), the embedding padded up to a multiple
    of `pad_to` rows (as many released LMs do for speed)."""
    from transformers import GPT2Config

    rows = -(-vocab_size // pad_to) * pad_to
    return GPT2Config(vocab_size=rows, n_embd=d_model, n_layer=layers, n_head=heads, n_positions=max_positions,
                      n_inner=4 * d_model, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                      bos_token_id=1, eos_token_id=1, pad_token_id=0, tie_word_embeddings=True)
