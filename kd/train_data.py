"""Feeding the train stage from Parquet shards: teacher-logit joins by id, seeded order, batches.

Only one data shard (and the matching rows of each label artifact) is in memory at a time."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import TYPE_CHECKING, Any, Iterator

from kd.teachers import gold_indices

if TYPE_CHECKING:
    from pipeline.artifact import Artifact


def _md(art: "Artifact", name: str) -> Any:
    """A Parquet metadata value (JSON-decoded when it is JSON), with or without `kdpipe.`."""
    md = art.file_metadata()
    raw = md.get(f"kdpipe.{name}", md.get(name))
    if raw is None:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw


@dataclasses.dataclass
class LabelSource:
    artifact: "Artifact"
    columns: list[str]  # teacher logit columns, e.g. ["logits"] or ["logits_a", "logits_b"]
    label_names: list[str] | None
    temperature: float | None
    task: str = "classification"

    @property
    def key(self) -> str:
        return self.artifact.key

    @property
    def stage_name(self) -> str | None:
        try:
            return self.artifact.manifest.get("stage_name")
        except (OSError, ValueError):
            return None


def label_sources(artifacts: list["Artifact"]) -> list[LabelSource]:
    out = []
    for art in artifacts:
        task = _md(art, "task") or "classification"
        if task not in ("classification", "token_classification"):
            raise ValueError(f"label artifact {art.key} holds {task!r} labels; the train stage "
                             "distils classification and tagging students (seq2seq: use train_seq2seq)")
        prefix = "token_logits" if task == "token_classification" else "logits"
        cols = _md(art, "logit_columns") or [c for c in art.columns() or [] if c == prefix or c.startswith(prefix + "_")]
        if not cols:
            raise ValueError(f"label artifact {art.key} has no logits column (columns: {art.columns()})")
        temperature = _md(art, "temperature")
        out.append(LabelSource(art, list(cols), _md(art, "label_names"),
                               float(temperature) if temperature not in (None, "") else None, task))
    return out


def resolve_label_names(data: "Artifact", sources: list[LabelSource], label_column: str,
                        task: str = "classification") -> list[str]:
    """The class order of training: the data's label_names (gold integers index them), else the
    first teacher labels' names, else the gold values. Teacher logits are put into this order
    by name (`teacher_orders`). Tagging ignores the data's label_names (sentence classes)."""
    names = _md(data, "label_names")
    if names and task == "classification":
        return [str(n) for n in names]
    for source in sources:
        if source.label_names:
            return [str(n) for n in source.label_names]
    if names:
        return [str(n) for n in names]
    if sources:  # teacher logits without names: their width is the class count
        field_type = sources[0].artifact.schema().field(sources[0].columns[0]).type
        while not hasattr(field_type, "list_size"):  # token logits: list<fixed_size_list<float, C>>
            field_type = field_type.value_type
        return [str(i) for i in range(field_type.list_size)]
    values = set()
    for table in data.iter_shards(columns=[label_column]):
        for v in table[label_column].to_pylist():
            values.update(v if isinstance(v, list) else [v] if v is not None else [])
    if not values:
        raise ValueError(f"no gold labels in column {label_column!r} and no teacher labels")
    if all(isinstance(v, int) for v in values):
        return [str(i) for i in range(max(values) + 1)]
    return sorted(map(str, values))


def teacher_orders(sources: list[LabelSource], label_names: list[str]) -> list[list[int] | None]:
    """Per label source, the column order that puts its logits into `label_names` order (None:
    already in it). Names are matched by name: a label artifact made in another order is
    permuted, one with other names is an error."""
    from kd.teachers import label_order

    out: list[list[int] | None] = []
    for s in sources:
        names = [str(n) for n in s.label_names or []]
        if not names or names == label_names:
            out.append(None)
            continue
        try:
            out.append(label_order(names, label_names, teacher_name=s.stage_name or s.key))
        except ValueError as e:
            raise ValueError(f"label artifact {s.key}: {e}; relabel with a `label` stage whose data carries "
                             "these label_names (it stores logits in the data's order)") from None
    return out


def token_logits_rows(column) -> list[Any]:
    """list<fixed_size_list<float, C>> column -> one float32 (words, C) array per row."""
    import numpy as np

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    flat = logits_matrix(arr.flatten())
    offsets = (arr.offsets.to_numpy() - arr.offsets[0].as_py()).tolist()
    return [flat[a:b] for a, b in zip(offsets[:-1], offsets[1:])] if len(arr) else [np.zeros((0, flat.shape[1]))]


def row_order_key(seed: int, epoch: int, row_id: str) -> bytes:
    return hashlib.blake2b(f"{seed}:{epoch}:{row_id}".encode(), digest_size=8).digest()


def logits_matrix(column) -> Any:
    """fixed_size_list<float> column -> float32 numpy (rows, classes)."""
    import numpy as np

    arr = column.combine_chunks() if hasattr(column, "combine_chunks") else column
    width = arr.type.list_size
    return np.asarray(arr.flatten().to_numpy(zero_copy_only=False), dtype=np.float32).reshape(-1, width)


class ShardStream:
    def __init__(self, *, data: "Artifact", sources: list[LabelSource], label_names: list[str], cfg,
                 use_gold_on_augmented: bool):
        self.data, self.sources, self.label_names, self.cfg = data, sources, label_names, cfg
        self.use_gold_on_augmented = use_gold_on_augmented
        self.orders = teacher_orders(sources, label_names)
        self.columns = data.columns() or []
        self.shard_rows = [s["rows"] for s in data.manifest.get("shards", [])] or \
            [data.read_shard(i, columns=["id"]).num_rows for i in range(data.num_shards())]

    def batches_per_epoch(self) -> int:
        b = self.cfg.batch_size
        return sum(-(-n // b) for n in self.shard_rows)

    def _teacher_rows(self, source: LabelSource, ids, shard_index: int):
        """This shard's teacher logits, row-aligned with `ids`, joined by id."""
        import pyarrow as pa
        import pyarrow.compute as pc

        cols = ["id", *source.columns]
        art = source.artifact
        table = art.read_shard(shard_index, columns=cols) if art.has_shard(shard_index) else None
        pos = pc.index_in(ids, value_set=table["id"]) if table is not None else None
        if pos is None or pos.null_count:
            # Shards not aligned with the data: gather this shard's ids from every label shard.
            parts = [t.filter(pc.is_in(t["id"], value_set=ids)) for t in art.iter_shards(columns=cols)]
            table = pa.concat_tables(parts)
            pos = pc.index_in(ids, value_set=table["id"])
            if pos.null_count:
                missing = ids.filter(pc.is_null(pos)).to_pylist()
                raise ValueError(f"{len(missing)} rows of data shard {shard_index} have no teacher labels in "
                                 f"label artifact {art.key} (e.g. id {missing[0]!r}); label the same data "
                                 "artifact the student trains on")
        taken = table.take(pos)
        order = self.orders[self.sources.index(source)]
        if source.task == "token_classification":
            rows = [token_logits_rows(taken[c]) for c in source.columns]
            return rows if order is None else [[r[:, order] for r in per_col] for per_col in rows]
        mats = [logits_matrix(taken[c]) for c in source.columns]
        return mats if order is None else [m[:, order] for m in mats]

    def load_shard(self, index: int, *, epoch: int, seed: int) -> dict[str, Any]:
        """One shard, joined and in this epoch's seeded row order."""
        import numpy as np

        cfg = self.cfg
        want = ["id", cfg.student_column] + [c for c in (cfg.student_pair_column, cfg.label_column, "aug_index")
                                             if c and c in self.columns]
        table = self.data.read_shard(index, columns=want)
        ids = table["id"].combine_chunks()
        order = sorted(range(table.num_rows), key=lambda i, ids=ids.to_pylist(): row_order_key(seed, epoch, ids[i]))
        if cfg.task == "token_classification":
            return self._load_tagging_shard(table, index, order)
        if cfg.label_column in table.column_names:
            gold = np.array(gold_indices(table[cfg.label_column].to_pylist(), self.label_names), dtype=np.int64)
        else:
            gold = np.full(table.num_rows, -1, dtype=np.int64)
        if not self.use_gold_on_augmented and "aug_index" in table.column_names:
            aug = table["aug_index"].to_numpy(zero_copy_only=False)
            gold[aug >= 0] = -1
        teachers = [m for s in self.sources for m in self._teacher_rows(s, ids, index)]
        texts = [t or "" for t in table[cfg.student_column].to_pylist()]
        pairs = [t or "" for t in table[cfg.student_pair_column].to_pylist()] if cfg.student_pair_column else None
        o = np.array(order, dtype=np.int64)
        return {"texts": [texts[i] for i in order], "pairs": None if pairs is None else [pairs[i] for i in order],
                "gold": gold[o], "teachers": [t[o] for t in teachers]}

    def _load_tagging_shard(self, table, index: int, order: list[int]) -> dict[str, Any]:
        """Tagging: word lists (truncated to max_length), per-word gold and teacher rows."""
        import numpy as np

        cfg, n = self.cfg, self.cfg.max_length
        words = [list(w or [])[:n] for w in table[cfg.student_column].to_pylist()]
        tags = table[cfg.label_column].to_pylist() if cfg.label_column in table.column_names else [None] * len(words)
        gold = [np.array(gold_indices(t[:n], self.label_names) if t is not None else [-1] * len(w), dtype=np.int64)
                for w, t in zip(words, tags)]
        teachers = [[r[:n] for r in rows] for s in self.sources for rows in self._teacher_rows(s, table["id"].combine_chunks(), index)]
        for rows in teachers:
            bad = next((i for i, (r, w) in enumerate(zip(rows, words)) if len(r) != len(w)), None)
            if bad is not None:
                raise ValueError(f"row {table['id'][bad].as_py()!r}: {len(rows[bad])} teacher word logits for "
                                 f"{len(words[bad])} words in {cfg.student_column!r}; use the words the teacher labeled")
        return {"texts": [words[i] for i in order], "pairs": None, "gold": [gold[i] for i in order],
                "teachers": [[t[i] for i in order] for t in teachers]}

    def batches(self, *, epoch: int, seed: int, module, prefetch: int = 8) -> Iterator[tuple[dict, Any, Any]]:
        """This epoch's batches, prepared by a background thread (reading, joining, tokenizing and
        padding overlap the training step, which releases the GIL); the order is unchanged."""
        import queue
        import threading

        source = self._batches(epoch=epoch, seed=seed, module=module)
        if prefetch <= 0:
            yield from source
            return
        q: queue.Queue = queue.Queue(maxsize=prefetch)
        stop = threading.Event()
        done = object()

        def put(item) -> bool:
            while not stop.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return True
                except queue.Full:
                    continue
            return False

        def produce() -> None:
            try:
                for item in source:
                    if not put(item):
                        return
                put(done)
            except BaseException as e:  # handed to the training loop, which re-raises it
                put(e)

        worker = threading.Thread(target=produce, name="kdpipe-train-prefetch", daemon=True)
        worker.start()
        try:
            while True:
                item = q.get()
                if item is done:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            stop.set()
            worker.join(timeout=5)

    def _batches(self, *, epoch: int, seed: int, module) -> Iterator[tuple[dict, Any, Any]]:
        import numpy as np
        import torch

        from kd.losses import combine_teachers

        rng = np.random.default_rng([seed & 0xFFFFFFFF, epoch])
        b = self.cfg.batch_size
        for index in rng.permutation(len(self.shard_rows)):
            shard = self.load_shard(int(index), epoch=epoch, seed=seed)
            rows = module.tokenize_rows(shard["texts"], shard["pairs"])
            # tagging: per-row word arrays are concatenated, matching the student's flattened output
            cat = (lambda parts: np.concatenate(parts)) if isinstance(shard["gold"], list) else (lambda x: x)
            if self.cfg.group_by_length:
                picks = length_grouped_batches([len(r[0]) for r in rows], b,
                                               np.random.default_rng([seed & 0xFFFFFFFF, epoch, int(index)]))
            else:
                picks = [slice(start, start + b) for start in range(0, len(rows), b)]
            for pick in picks:
                batch = module.collate(_take(rows, pick))
                gold = torch.from_numpy(cat(_take(shard["gold"], pick)))
                teacher = None
                if shard["teachers"]:
                    ens = self.cfg.ensemble
                    teacher = combine_teachers([torch.from_numpy(cat(_take(t, pick))) for t in shard["teachers"]],
                                               mode=ens.mode, weights=ens.weights)
                yield batch, gold, teacher


def length_grouped_batches(lengths: list[int], batch_size: int, rng) -> list[list[int]]:
    """Row indices of batches of similar length: the (already shuffled) rows are sorted by length
    within windows of 50 batches, cut into batches, and the batches shuffled (as finetune's
    group_by_length). Phrase corpora such as SST-2 mix 2- and 50-token rows; random batches of
    them mostly compute padding. As many batches as plain slicing gives."""
    window = batch_size * 50
    batches = []
    for start in range(0, len(lengths), window):
        chunk = sorted(range(start, min(start + window, len(lengths))), key=lambda i: lengths[i])
        batches += [chunk[k:k + batch_size] for k in range(0, len(chunk), batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


def _take(rows, pick):
    """rows[pick] for a slice, or the rows at a list of indices (numpy arrays or lists)."""
    if isinstance(pick, slice):
        return rows[pick]
    return rows[pick] if hasattr(rows, "shape") else [rows[i] for i in pick]


def read_eval_table(art: "Artifact", cfg, label_names: list[str]) -> dict[str, Any]:
    """A (small) dev/eval artifact in memory: texts, pairs and gold indices."""
    cols = [cfg.student_column, cfg.label_column] + ([cfg.student_pair_column] if cfg.student_pair_column else [])
    table = art.read_table(columns=cols)
    if cfg.task == "token_classification":
        return {"texts": table[cfg.student_column].to_pylist(), "pairs": None,
                "gold": [[str(t) for t in tags] for tags in table[cfg.label_column].to_pylist()]}
    return {"texts": [t or "" for t in table[cfg.student_column].to_pylist()],
            "pairs": [t or "" for t in table[cfg.student_pair_column].to_pylist()] if cfg.student_pair_column else None,
            # The dev artifact's integers name its own label_names, whatever their order.
            "gold": gold_indices(table[cfg.label_column].to_pylist(), label_names, data_names=_md(art, "label_names"))}
