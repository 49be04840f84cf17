"""The `unigram` stage's table on disk (`files/unigram.parquet`: tag, word, count) and its
reader for inverse-CDF sampling, shared by the stage that writes it and `augment`, which reads it."""
from __future__ import annotations

from collections import Counter

TABLE_FILE = "unigram.parquet"
SKIP_TAGS = frozenset({"SPACE"})


def count_pairs(counts: Counter, words: list[list[str]], pos: list[list[str]], *, lowercase: bool) -> None:
    for row_words, row_pos in zip(words, pos):
        for word, tag in zip(row_words or [], row_pos or []):
            if tag in SKIP_TAGS:
                continue
            counts[(tag, word.lower() if lowercase else word)] += 1


def load_unigram_table(files_dir) -> dict[str, tuple[list[str], list[int]]]:
    """tag -> (words, cumulative counts), for inverse-CDF sampling with bisect (a plain list:
    bisect on it is several times cheaper per draw than a numpy searchsorted call)."""
    import numpy as np
    import pyarrow.parquet as pq

    table = pq.read_table(files_dir / TABLE_FILE)
    out: dict[str, tuple[list[str], list[int]]] = {}
    tags = table.column("tag").to_pylist()
    words = table.column("word").to_pylist()
    counts = table.column("count").to_numpy()
    start = 0
    for end in range(1, len(tags) + 1):
        if end == len(tags) or tags[end] != tags[start]:
            out[tags[start]] = (words[start:end], np.cumsum(counts[start:end], dtype=np.int64).tolist())
            start = end
    return out
