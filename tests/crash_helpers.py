"""The crash test's manifest (read -> pos_tag -> unigram -> augment -> label -> train, 40 small
shards) as a file, for tests that need a run long enough to interfere with."""
from __future__ import annotations

from pathlib import Path

import yaml

from factories import tiny_bert_classifier
from test_crash import ROWS, pipeline_manifest, write_corpus


def crash_manifest_file(tmp: Path, workdir: str | Path, *, name: str = "crash", **kwargs) -> Path:
    corpus = tmp / "corpus.tsv"
    if not corpus.exists():
        write_corpus(corpus, ROWS)
    teacher = tmp / "teacher"
    if not teacher.exists():
        tiny_bert_classifier(teacher, num_labels=2, label_names=["neg", "pos"])
    manifest = pipeline_manifest(workdir, corpus, teacher, **kwargs)
    manifest["name"] = name
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path
