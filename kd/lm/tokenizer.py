"""A sentencepiece vocabulary for a causal LM trained from scratch, as a transformers tokenizer."""
from __future__ import annotations

from pathlib import Path

SPM_NAME = "spiece"


def train_spm_tokenizer(texts: list[str], directory: Path, vocab_size: int, *, seed: int):
    """Unigram sentencepiece (pad 0, eos 1, unk 2, no bos: documents start with eos, as in
    GPT-2) saved at `directory`, loaded back as a T5Tokenizer whose length is checked."""
    import sentencepiece as spm
    from transformers import T5Tokenizer

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_prefix=str(directory / SPM_NAME), vocab_size=vocab_size,
        hard_vocab_limit=False, model_type="unigram", character_coverage=1.0, pad_id=0, eos_id=1,
        unk_id=2, bos_id=-1, minloglevel=2, num_threads=1, input_sentence_size=2_000_000,
        shuffle_input_sentence=False)
    # from_pretrained(dir) reads dir/spiece.model; T5Tokenizer(vocab_file=...) ignores it in 5.x.
    tok = T5Tokenizer.from_pretrained(str(directory), extra_ids=0, legacy=False)
    pieces = spm.SentencePieceProcessor(model_file=str(directory / f"{SPM_NAME}.model")).get_piece_size()
    if len(tok) != pieces or tok.pad_token_id != 0 or tok.eos_token_id != 1:
        raise RuntimeError(f"tokenizer built from {directory} has {len(tok)} tokens (pad {tok.pad_token_id}, "
                           f"eos {tok.eos_token_id}); sentencepiece has {pieces}")
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
