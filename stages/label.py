"""`label`: run one teacher (or an ensemble) over a column of the data and store its outputs.

Tasks and columns (ARCHITECTURE.md, "label" rows); with several teachers every output column
gets a `_<teacher>` suffix, so one labeling serves any later mean/weighted combination:

* classification: `logits` fixed_size_list<float32|float16, C>, optional `probs` = softmax(z/T)
* token_classification: `words` list<str>, `token_logits` list<fixed_size_list<float, C>>,
  the logits of each word's first sub-token (NaN for words cut off by max_length)
* seq2seq: n-best `hyp_text`, `hyp_ids` (EOS kept, decoder start dropped), `hyp_scores`
  (generate's length-penalised sequence scores); with `topk: k`, the teacher's top-k next-token
  log-probs along the best hypothesis (`topk_ids` int32, `topk_logprobs` float16); with
  `reference_column` as well, the gold target's ids (`ref_ids`) and the teacher's top-k along the
  gold prefixes (`ref_topk_ids`, `ref_topk_logprobs`): Kim & Rush's word-level KD

Speed: each shard is tokenized once, sorted by length and cut into batches by a padded-token
budget; one model per Ray actor; output rows come back in input order.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.devices import NumericsConfig, worker_device
from pipeline.hashing import hash_obj
from pipeline.stage import Facts, InputRole, MapStage, Problem, StageContext, throughput, located
from kd.teachers import (LabelOrderError, Task, TeacherSpec, check_teacher, default_name,
                             label_names, label_order, length_batches, load_teacher, pad_batch,
                             quiet_transformers, read_config, resolve_teacher, teacher_fingerprint)


class LabelConfig(NumericsConfig):
    task: Task = "classification"
    teacher: str | None = located(None, description="checkpoint directory or cached hub id")
    revision: str | None = Field(None, description="hub revision of `teacher`")
    teachers: list[TeacherSpec] | None = Field(None, description="an ensemble: one output column set each")
    allow_new_head: bool = Field(False, description="accept a checkpoint without the task head (seeded "
                                 "random head; for benchmarks, not for distillation)")
    trust_remote_code: bool = False
    label_map: dict[str, str] | None = Field(
        None, description="teacher label name -> data label name, for a teacher that names the data's "
        "classes differently; logits are always stored in the data's label_names order")
    text_column: str = Field("text", description="what the teacher reads (e.g. the English side)")
    text_pair_column: str | None = Field(None, description="second sentence (classification only)")
    words_column: str | None = Field(None, description="token_classification: list<str> column; "
                                     "default: whitespace split of text_column")
    max_length: int | None = Field(None, gt=0, description="input truncation; default: the model's limit")
    logits_dtype: Literal["float32", "float16"] = "float32"
    temperature: float | None = Field(None, gt=0, description="also store probs = softmax(logits / T)")
    num_beams: int = Field(4, ge=1)
    num_return_sequences: int = Field(1, ge=1)
    length_penalty: float = 1.0
    max_new_tokens: int = Field(64, gt=0)
    topk: int = Field(0, ge=0, description="seq2seq word-level KD targets per position; 0 = off")
    reference_column: str | None = Field(
        None, description="seq2seq with topk: also the teacher's top-k along this gold target column, "
        "teacher-forced on the gold prefixes (ref_ids, ref_topk_ids, ref_topk_logprobs)")
    token_budget: int = throughput(8192, gt=0, description="padded tokens per batch")
    batch_size: int = throughput(256, gt=0, description="most rows per batch")
    concurrency: int | None = throughput(None, gt=0, description="actors (one model each)")

    @model_validator(mode="after")
    def _consistent(self) -> "LabelConfig":
        if self.teacher is not None and self.teachers:
            raise ValueError("give either `teacher` or `teachers`, not both")
        if self.revision is not None and self.teacher is None:
            raise ValueError("`revision` belongs to `teacher`; in `teachers` give each entry its own revision")
        if self.teachers:
            names = [t.name for t in self.teachers]
            if len(set(names)) != len(names):
                raise ValueError(f"teacher names must be unique, got {names}")
        if self.num_return_sequences > self.num_beams:
            raise ValueError(f"num_return_sequences ({self.num_return_sequences}) must be <= num_beams ({self.num_beams})")
        if self.task != "classification" and (self.temperature is not None or self.text_pair_column):
            raise ValueError("temperature and text_pair_column apply to task: classification only")
        if self.task != "seq2seq" and self.topk:
            raise ValueError("topk applies to task: seq2seq only")
        if self.reference_column is not None and not (self.task == "seq2seq" and self.topk):
            raise ValueError("reference_column stores top-k along the gold target: it needs task: seq2seq "
                             "and topk > 0")
        if self.task == "seq2seq" and self.label_map:
            raise ValueError("label_map applies to classification and token_classification only")
        if self.task != "token_classification" and self.words_column:
            raise ValueError("words_column applies to task: token_classification only")
        return self

    def teacher_specs(self) -> list[TeacherSpec]:
        if self.teacher is not None:
            return [TeacherSpec(name=default_name(self.teacher), path=self.teacher, revision=self.revision)]
        return list(self.teachers or [])


REFERENCE_COLUMNS = ("ref_ids", "ref_topk_ids", "ref_topk_logprobs")
TASK_COLUMNS = {"classification": ["logits"], "token_classification": ["token_logits"],
                "seq2seq": ["hyp_text", "hyp_ids", "hyp_scores"]}


class LabelStage(MapStage):
    """Teacher inference (classification, token classification, seq2seq) into Parquet."""

    type = "label"
    Config = LabelConfig
    inputs = {
        "data": InputRole(doc="rows to label: id + the teacher's text column"),
        "teacher": InputRole(required=False, many=True, kind="files",
                             doc="checkpoint artifacts holding files/model/ (fine-tuned teachers)"),
    }
    config: LabelConfig

    # --- planning -------------------------------------------------------------------------
    def validate_facts(self, *, input_facts) -> list[Problem]:
        """The data's label names and mask token against each configured teacher."""
        cfg = self.config
        data = (input_facts.get("data") or [Facts()])[0]
        problems: list[Problem] = []
        # The data's label_names name its sentence classes: they order classification logits only.
        names = data.get("label_names") if cfg.task == "classification" else None
        checks: list[tuple[str, str, list[str] | None]] = []  # (loc, teacher, its label names)
        for i, spec in enumerate(cfg.teacher_specs()):
            loc = "config.teacher" if cfg.teacher is not None else f"config.teachers[{i}].path"
            local = resolve_teacher(spec.path, spec.revision)
            if local is None:
                continue
            checks.append((loc, spec.name, label_names(read_config(local)) if cfg.task != "seq2seq" else None))
            mask = data.get("mask_token")
            if mask is not None:
                problem = _mask_token_problem(local, mask, spec.name)
                if problem:
                    problems.append(Problem(data.origins.get("mask_token", "config"), problem))
        for i, facts in enumerate(input_facts.get("teacher") or []):  # e.g. a finetune stage's labels
            if cfg.task != "seq2seq" and facts.get("label_names"):
                checks.append((f"inputs.teacher[{i}]", f"input {i}", [str(n) for n in facts.get("label_names")]))
        for loc, teacher, teacher_names in checks:
            if not names or teacher_names is None:
                continue
            try:
                label_order(teacher_names, names, label_map=cfg.label_map, teacher_name=teacher)
            except LabelOrderError as e:
                where = data.origins.get("label_names")
                problems.append(Problem("config.label_map" if cfg.label_map else loc,
                                        f"{e}" + (f" (data label_names set at {where})" if where else "")))
        return problems

    def validate(self, *, input_columns) -> list[Problem]:
        cfg = self.config
        from_inputs = len(input_columns.get("teacher") or [])
        sources = int(bool(cfg.teacher_specs())) + int(from_inputs > 0)
        if sources != 1:
            what = "two teacher sources" if sources else "no teacher"
            return [Problem("config.teacher", f"{what}: give exactly one of `teacher: <dir or hub id>`, "
                                              "`teachers: [{name, path}]`, or `inputs: {teacher: <stage>}`")]
        problems: list[Problem] = []
        specs = cfg.teacher_specs()
        names: dict[str, list[str]] = {}
        for i, spec in enumerate(specs):
            loc = "config.teacher" if cfg.teacher is not None else f"config.teachers[{i}].path"
            found = check_teacher(spec.path, revision=spec.revision, task=cfg.task, allow_new_head=cfg.allow_new_head,
                                  trust_remote_code=cfg.trust_remote_code, loc=loc)
            problems += found
            local = resolve_teacher(spec.path, spec.revision)
            if not found and local is not None and cfg.task != "seq2seq":
                names[spec.name] = label_names(read_config(local))
        mapped = {json.dumps(sorted((cfg.label_map or {}).get(n, n) for n in v)) for v in names.values()}
        if len(mapped) > 1:  # the same names in another order are fine: each is put in the data's order
            detail = "; ".join(f"{k}: {v}" for k, v in names.items())
            problems.append(Problem("config.teachers", f"ensemble teachers disagree on labels ({detail}); "
                                                       "label with teachers of one label set"))
        refs = (self.input_refs or {}).get("teacher") or []
        taken = self.input_teacher_names() or []
        for name in sorted({n for n in taken if taken.count(n) > 1}):
            same = [r for r, n in zip(refs, taken) if n == name]
            problems.append(Problem("inputs.teacher", f"teachers {same} would all write columns named "
                                    f"'*_{name}'; give each teacher once, or rename a stage"))
        for columns in input_columns.get("data") or []:
            if columns is None:
                continue
            for field in ("text_column", "text_pair_column", "words_column", "reference_column"):
                col = getattr(cfg, field)
                if col is not None and col not in columns:
                    problems.append(Problem(f"config.{field}", f"column {col!r} not in the input; it has: "
                                                               f"{', '.join(columns)}"))
            if "id" not in columns:
                problems.append(Problem("inputs.data", "the input has no `id` column; label a read/augment output"))
        return problems

    def _teacher_names(self, count_from_inputs: int) -> list[str] | None:
        specs = self.config.teacher_specs()
        if specs:
            return [s.name for s in specs]
        refs = self.input_teacher_names()
        if refs is not None:
            return refs
        return [""] if count_from_inputs == 1 else None  # outside a manifest: known at run time

    def input_teacher_names(self) -> list[str] | None:
        """Names of teachers given as inputs, from the manifest: the stage name, or RUN__STAGE
        for `@RUN/STAGE`, so the same stage name in two runs gives two columns."""
        if self.input_refs is None:
            return None
        return [teacher_column_name(ref) for ref in self.input_refs.get("teacher") or []]

    def output_columns(self, *, input_columns) -> list[str] | None:
        names = self._teacher_names(len(input_columns.get("teacher") or []))
        if names is None:
            return None
        cfg = self.config
        base = list(TASK_COLUMNS[cfg.task])
        if cfg.temperature is not None:
            base.append("probs")
        if cfg.topk:
            base += ["topk_ids", "topk_logprobs"]
        if cfg.reference_column:
            base += list(REFERENCE_COLUMNS)
        cols = ["id"] + (["words"] if cfg.task == "token_classification" else [])
        return cols + [c + _suffix(n, len(names)) for n in names for c in base]

    def uses_seed(self) -> bool:
        """config.allow_new_head: the seed draws the new head's weights."""
        return self.config.allow_new_head

    def fingerprint(self) -> dict[str, str]:
        """Each teacher's files (weights, config, tokenizer), or its hub id + revision."""
        out = {f"teacher {s.name}": teacher_fingerprint(s.path, s.revision) for s in self.config.teacher_specs()}
        names = self.input_teacher_names()
        if names:  # they name the output columns, so they are part of what the artifact is
            out["teacher input names"] = json.dumps(names)
        return out

    def external_models(self) -> dict[str, Path]:
        """Teachers given by path, `pkg:` folder or pinned hub id (resolved on the driver)."""
        out = {}
        for spec in self.config.teacher_specs():
            local = resolve_teacher(spec.path, spec.revision)
            if local is None:
                raise FileNotFoundError(f"teacher {spec.path!r} not found locally or in the HF cache")
            out[f"teacher {spec.name}"] = local
        return out

    # --- worker ---------------------------------------------------------------------------
    def setup(self, ctx: StageContext) -> None:
        quiet_transformers()
        cfg = self.config
        # As planned (num_gpus > 0 -> CUDA), or DeviceUnavailable naming this node.
        self.device, self.dtype = worker_device(self.numerics(), stage=ctx.stage_name)
        # Teachers by path or hub id load from the copy the engine stored in the workdir; fine-tuned
        # teachers from their artifact: on every node, through the storage layer.
        sources: list[tuple[str, Any]] = []
        for spec in cfg.teacher_specs():
            local = ctx.model_dir(f"teacher {spec.name}") or resolve_teacher(spec.path, spec.revision)
            sources.append((spec.name, local))
        arts = ctx.inputs.get("teacher") or []
        names = self.input_teacher_names() or [_recorded_name(art, i) for i, art in enumerate(arts)]
        if len(set(names)) != len(names):
            raise ValueError(f"teacher inputs {names} would write the same columns; give each teacher once")
        for name, art in zip(names, arts):
            sources.append((name, art.files_dir / "model"))
        self.teachers = []
        for name, local in sources:
            if local is None:
                raise FileNotFoundError(f"teacher {name!r} not found locally or in the HF cache")
            # A seeded new head: every actor (and every rerun) builds the same one.
            seed = int(hash_obj([ctx.seed, name])[:8], 16) if cfg.allow_new_head else None
            model, tok = load_teacher(local, task=cfg.task, device=self.device, dtype=self.dtype,
                                      trust_remote_code=cfg.trust_remote_code, head_seed=seed)
            self.teachers.append((name, model, tok))
        self.label_names = None
        self.teacher_label_names: dict[str, list[str]] = {}
        self.orders: dict[str, list[int]] = {}
        if cfg.task != "seq2seq":
            self._order_labels(ctx)

    def _order_labels(self, ctx: StageContext) -> None:
        """Every teacher's logits go out in one order: the data's label_names when it has them,
        else the first teacher's (mapped) names. Matched by name, never by count alone."""
        data = ctx.optional_input("data")
        known = data.file_metadata().get("kdpipe.label_names") if data is not None else None
        # Tags are not the data's sentence classes: a tagging ensemble follows its first teacher.
        target = [str(n) for n in json.loads(known)] if known and self.config.task == "classification" else None
        for name, model, _ in self.teachers:
            names = label_names(model.config.to_dict())
            self.teacher_label_names[name] = names
            if target is None:
                target = [(self.config.label_map or {}).get(n, n) for n in names]
            self.orders[name] = label_order(names, target, label_map=self.config.label_map, teacher_name=name)
        self.label_names = target

    def metadata(self) -> dict[str, str]:
        cfg = self.config
        names = [n for n, _, _ in self.teachers]
        n = len(names)
        md = {"task": cfg.task, "teachers": json.dumps(names), "device": self.device.type,
              "dtype": str(self.dtype).removeprefix("torch.")}
        if self.label_names is not None:
            md["label_names"] = json.dumps(self.label_names)
            # logits[:, j] of teacher t is the teacher's own output label_permutation[t][j]
            md["label_permutation"] = json.dumps(self.orders)
            md["teacher_label_names"] = json.dumps(self.teacher_label_names)
        if cfg.task == "classification":
            md["logit_columns"] = json.dumps(["logits" + _suffix(t, n) for t in names])
            md["temperature"] = json.dumps(cfg.temperature)
            md["logits_dtype"] = cfg.logits_dtype
        elif cfg.task == "token_classification":
            md["logit_columns"] = json.dumps(["token_logits" + _suffix(t, n) for t in names])
            md["logits_dtype"] = cfg.logits_dtype
        else:
            md.update(num_beams=str(cfg.num_beams), num_return_sequences=str(cfg.num_return_sequences),
                      length_penalty=str(cfg.length_penalty), max_new_tokens=str(cfg.max_new_tokens),
                      topk=str(cfg.topk), reference_column=json.dumps(cfg.reference_column))
        return md

    def process(self, table, ctx: StageContext, *, shard_index: int):
        import pyarrow as pa
        import torch

        cfg = self.config
        texts = _strings(table, cfg.text_column)
        columns: dict[str, Any] = {"id": table.column("id")}
        words = None
        if cfg.task == "token_classification":
            words = (table.column(cfg.words_column).to_pylist() if cfg.words_column
                     else [t.split() for t in texts])
            words = [[str(w) for w in (ws or [])] for ws in words]
            columns["words"] = pa.array(words, pa.list_(pa.string()))
        for name, model, tok in self.teachers:
            with torch.inference_mode():  # scoped: the stage may share a process with training code
                if cfg.task == "classification":
                    pairs = _strings(table, cfg.text_pair_column) if cfg.text_pair_column else None
                    out = classify(model, tok, texts, pairs, cfg=cfg, device=self.device, order=self.orders.get(name))
                elif cfg.task == "token_classification":
                    out = tag_words(model, tok, words, cfg=cfg, device=self.device, order=self.orders.get(name))
                else:
                    refs = _strings(table, cfg.reference_column) if cfg.reference_column else None
                    out = translate(model, tok, texts, cfg=cfg, device=self.device, references=refs)
            suffix = _suffix(name, len(self.teachers))
            columns.update({col + suffix: arr for col, arr in out.items()})
        return pa.table(columns)

    # --- after all shards -----------------------------------------------------------------
    def summarize(self, shard_stats: list[dict[str, Any]], ctx: StageContext) -> dict[str, Any]:
        """Label metadata for manifest.json, and on-disk bytes per row for each output column
        (per target token for top-k), read from the Parquet footers."""
        from pipeline import storage

        out = ctx.output()
        shards = [out.shard_path(i) for i in out.shard_indices()]
        if not shards:
            return {}
        col_bytes: dict[str, int] = {}
        leaf_values: dict[str, int] = {}
        rows = 0
        for path in shards:
            parquet = storage.parquet_file(path)
            meta = parquet.metadata
            rows += meta.num_rows
            # Leaf paths join nested names with '.', and teacher names may hold dots too.
            names = sorted(parquet.schema_arrow.names, key=len, reverse=True)
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                for c in range(rg.num_columns):
                    chunk = rg.column(c)
                    leaf = chunk.path_in_schema
                    top = next((n for n in names if leaf == n or leaf.startswith(n + ".")), leaf)
                    col_bytes[top] = col_bytes.get(top, 0) + chunk.total_compressed_size
                    leaf_values[top] = leaf_values.get(top, 0) + chunk.num_values
        file_md = {k.decode(): v.decode() for k, v in (storage.parquet_file(shards[0]).schema_arrow.metadata or {}).items()}
        keep = ("task", "label_names", "label_permutation", "teacher_label_names", "teachers", "logit_columns", "temperature", "logits_dtype", "num_beams",
                "num_return_sequences", "topk", "device", "dtype")
        md = {k: file_md[f"kdpipe.{k}"] for k in keep if f"kdpipe.{k}" in file_md}
        summary: dict[str, Any] = {"label": md, "rows": rows,
                                   "bytes_per_row": {c: round(b / max(rows, 1), 2) for c, b in col_bytes.items()}}
        # Model time of the shards run by this call (resumed shards carry no timing).
        timed = [s for s in shard_stats if "compute_seconds" in s]
        if timed:
            seconds = sum(s["compute_seconds"] for s in timed)
            summary["compute_seconds"] = round(seconds, 3)
            summary["compute_rows_per_s"] = round(sum(s["rows"] for s in timed) / max(seconds, 1e-9), 1)
        k = self.config.topk
        if k:
            ids_cols = [c for c in col_bytes if c.startswith("topk_ids")]
            tokens = sum(leaf_values[c] for c in ids_cols) / k
            topk_bytes = sum(b for c, b in col_bytes.items() if c.startswith(("topk_ids", "topk_logprobs")))
            summary["topk_tokens"] = int(tokens)
            summary["topk_bytes_per_token"] = round(topk_bytes / max(tokens, 1), 2)
        return summary


def teacher_column_name(ref: str) -> str:
    """`stage` -> `stage`; `@RUN/STAGE` -> `RUN__STAGE` (a column-safe name)."""
    return ref[1:].replace("/", "__") if ref.startswith("@") else ref


def _recorded_name(art, index: int) -> str:
    """Outside a manifest (tests, notebooks): the run and stage recorded by the artifact."""
    manifest = art.manifest
    stage, run = manifest.get("stage_name"), manifest.get("run")
    return f"{run}__{stage}" if run and stage else stage or f"teacher{index}"


def _suffix(teacher: str, count: int) -> str:
    return f"_{teacher}" if count > 1 else ""


def _strings(table, column: str) -> list[str]:
    return ["" if v is None else str(v) for v in table.column(column).to_pylist()]


# --- the model calls: texts in, pyarrow columns out (rows in input order) -------------------
def _max_length(model, tok, cfg: LabelConfig) -> int:
    limit = getattr(model.config, "max_position_embeddings", None) or 512
    if tok.model_max_length and tok.model_max_length < 1_000_000:
        limit = min(limit, tok.model_max_length)
    return min(cfg.max_length, limit) if cfg.max_length else limit


def _tokenize(tok, inputs: list, *args, **kwargs):
    """Unpadded token ids; an empty shard gives empty lists (tokenizers reject an empty batch)."""
    if not inputs:
        return {"input_ids": []}
    return tok(inputs, *args, return_attention_mask=False, **kwargs)


def _fixed(values, width: int, np_dtype: str):
    """(rows, width) numpy -> fixed_size_list<np_dtype, width>; plain Arrow, not a Ray tensor."""
    import pyarrow as pa

    flat = pa.array(values.astype(np_dtype, copy=False).reshape(-1))
    return pa.FixedSizeListArray.from_arrays(flat, width)


def _ragged_fixed(per_row: list, width: int, np_dtype: str):
    """List of (n_i, width) arrays -> list<fixed_size_list<np_dtype, width>>."""
    import numpy as np
    import pyarrow as pa

    offsets = np.zeros(len(per_row) + 1, dtype=np.int32)
    offsets[1:] = np.cumsum([len(a) for a in per_row])
    values = np.concatenate(per_row) if per_row else np.zeros((0, width))
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), _fixed(values.reshape(-1, width), width, np_dtype))


def classify(model, tok, texts: list[str], pairs: list[str] | None, *, cfg: LabelConfig, device: str,
             order: list[int] | None = None) -> dict[str, Any]:
    """Logits (and probs at T) per row, their columns in `order` (see label_order)."""
    import numpy as np
    import torch

    enc = _tokenize(tok, texts, pairs, truncation=True, max_length=_max_length(model, tok, cfg))
    lengths = [len(x) for x in enc["input_ids"]]
    logits = np.zeros((len(texts), model.config.num_labels), dtype=np.float32)
    with torch.inference_mode():
        for rows in length_batches(lengths, token_budget=cfg.token_budget, batch_size=cfg.batch_size):
            batch = pad_batch(enc, rows, pad_id=tok.pad_token_id or 0, device=device)
            logits[rows] = model(**batch).logits.float().cpu().numpy()
    if order is not None:
        logits = logits[:, order]
    width = logits.shape[1]
    out = {"logits": _fixed(logits, width, cfg.logits_dtype)}
    if cfg.temperature is not None:
        z = logits / cfg.temperature
        z = np.exp(z - z.max(axis=1, keepdims=True))
        out["probs"] = _fixed(z / z.sum(axis=1, keepdims=True), width, cfg.logits_dtype)
    return out


def tag_words(model, tok, words: list[list[str]], *, cfg: LabelConfig, device: str,
              order: list[int] | None = None) -> dict[str, Any]:
    """Per-word logits taken at each word's first sub-token, their columns in `order`."""
    import numpy as np
    import torch

    enc = _tokenize(tok, words, is_split_into_words=True, truncation=True, max_length=_max_length(model, tok, cfg))
    lengths = [len(x) for x in enc["input_ids"]]
    width = model.config.num_labels
    per_row = [np.full((len(ws), width), np.nan, dtype=np.float32) for ws in words]
    with torch.inference_mode():
        for rows in length_batches(lengths, token_budget=cfg.token_budget, batch_size=cfg.batch_size):
            batch = pad_batch(enc, rows, pad_id=tok.pad_token_id or 0, device=device)
            logits = model(**batch).logits.float().cpu().numpy()
            for r, i in enumerate(rows):
                seen: set[int] = set()
                for pos, word in enumerate(enc.word_ids(i)):
                    if word is not None and word not in seen:
                        seen.add(word)
                        per_row[i][word] = logits[r, pos]
    if order is not None:
        per_row = [a[:, order] for a in per_row]
    return {"token_logits": _ragged_fixed(per_row, width, cfg.logits_dtype)}


def _hypothesis(seq: list[int], *, start_id: int | None, eos_id: int | None) -> list[int]:
    """Generated ids without the decoder start token and without the padding after EOS (EOS
    kept). Only finished hypotheses are padded, so ids without EOS are all generated."""
    ids = seq[1:] if seq and seq[0] == start_id else list(seq)
    if eos_id is not None and eos_id in ids:
        return ids[: ids.index(eos_id) + 1]
    return ids


def translate(model, tok, texts: list[str], *, cfg: LabelConfig, device: str,
              references: list[str] | None = None) -> dict[str, Any]:
    """Beam search n-best (`generate` with the checkpoint's generation config plus ours), and
    optionally top-k log-probs of the teacher forced along its best hypothesis and along the
    gold `references` (tokenized as the students tokenize targets: EOS kept, max_new_tokens)."""
    import numpy as np
    import torch

    positions = getattr(model.config, "max_position_embeddings", None)
    if positions and cfg.max_new_tokens >= positions:
        raise ValueError(f"max_new_tokens {cfg.max_new_tokens} reaches past the teacher's {positions} decoder "
                         f"positions; set max_new_tokens below {positions}")
    enc = _tokenize(tok, texts, truncation=True, max_length=_max_length(model, tok, cfg), return_token_type_ids=False)
    lengths = [len(x) for x in enc["input_ids"]]
    n, k = cfg.num_return_sequences, cfg.topk
    start_id = model.generation_config.decoder_start_token_id
    if start_id is None:
        start_id = model.config.decoder_start_token_id
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else 0
    eos_id = model.generation_config.eos_token_id
    eos_id = eos_id[0] if isinstance(eos_id, list) else eos_id
    gen_kwargs = dict(num_beams=cfg.num_beams, num_return_sequences=n, length_penalty=cfg.length_penalty,
                      max_new_tokens=cfg.max_new_tokens, do_sample=False, return_dict_in_generate=True,
                      output_scores=True)
    hyp_ids: list[list[list[int]]] = [[] for _ in texts]
    hyp_scores: list[list[float]] = [[] for _ in texts]
    top_ids = [np.zeros((0, k), np.int32) for _ in texts]
    top_lp = [np.zeros((0, k), np.float32) for _ in texts]
    ref_ids = reference_ids(tok, references, cfg.max_new_tokens) if references is not None else None
    ref_top_ids, ref_top_lp = list(top_ids), list(top_lp)
    batches = length_batches(lengths, token_budget=cfg.token_budget, batch_size=cfg.batch_size,
                             extra_per_row=cfg.max_new_tokens, rows_factor=cfg.num_beams, max_padding=None)
    with torch.inference_mode():
        for rows in batches:
            batch = pad_batch(enc, rows, pad_id=pad_id, device=device)
            hyps, scores = _generate(model, batch, gen_kwargs, cfg=cfg, start_id=start_id, eos_id=eos_id)
            for r, i in enumerate(rows):
                hyp_ids[i] = hyps[r * n:(r + 1) * n]
                hyp_scores[i] = scores[r * n:(r + 1) * n]
            if k:
                best = [hyp_ids[i][0] for i in rows]
                ids, lps = _teacher_forced_topk(model, batch, best, k=k, start_id=start_id, pad_id=pad_id)
                for r, i in enumerate(rows):
                    top_ids[i], top_lp[i] = ids[r], lps[r]
            if ref_ids is not None:
                ids, lps = _teacher_forced_topk(model, batch, [ref_ids[i] for i in rows], k=k, start_id=start_id,
                                                pad_id=pad_id)
                for r, i in enumerate(rows):
                    ref_top_ids[i], ref_top_lp[i] = ids[r], lps[r]
    return _translation_columns(tok, hyp_ids, hyp_scores, k=k, top=(top_ids, top_lp),
                                ref=(ref_ids, ref_top_ids, ref_top_lp) if ref_ids is not None else None)


def _generate(model, batch, gen_kwargs: dict[str, Any], *, cfg: LabelConfig, start_id: int, eos_id) \
        -> tuple[list[list[int]], list[float]]:
    """One batch's n-best hypotheses (ids) and their scores (length-normalised log-probs)."""
    out = model.generate(**batch, **gen_kwargs)
    seqs = out.sequences.cpu().tolist()
    hyps = [_hypothesis(s, start_id=start_id, eos_id=eos_id) for s in seqs]
    if cfg.num_beams > 1:
        return hyps, out.sequences_scores.float().cpu().tolist()
    # greedy: length-normalised log-prob, the same scale as beam scores
    steps = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)
    steps = steps.float().cpu().numpy()
    return hyps, [float(steps[j, : len(h)].sum()) / max(len(h), 1) ** cfg.length_penalty for j, h in enumerate(hyps)]


def _translation_columns(tok, hyp_ids, hyp_scores, *, k: int, top, ref) -> dict[str, Any]:
    import pyarrow as pa

    texts_out = [tok.batch_decode(h, skip_special_tokens=True) if h else [] for h in hyp_ids]
    cols = {"hyp_text": pa.array(texts_out, pa.list_(pa.string())),
            "hyp_ids": pa.array(hyp_ids, pa.list_(pa.list_(pa.int32()))),
            "hyp_scores": pa.array(hyp_scores, pa.list_(pa.float32()))}
    if k:
        cols["topk_ids"] = _ragged_fixed(top[0], k, "int32")
        cols["topk_logprobs"] = _ragged_fixed(top[1], k, "float16")
    if ref is not None:
        cols["ref_ids"] = pa.array(ref[0], pa.list_(pa.int32()))
        cols["ref_topk_ids"] = _ragged_fixed(ref[1], k, "int32")
        cols["ref_topk_logprobs"] = _ragged_fixed(ref[2], k, "float16")
    return cols


def reference_ids(tok, texts: list[str], max_tokens: int) -> list[list[int]]:
    """Gold targets as the students encode theirs (kd.seq2seq.encode: EOS kept, at most
    max_tokens), so the stored top-k lines up with the student's own teacher-forced positions."""
    from kd.seq2seq import encode

    return encode(tok, texts, max_tokens) if texts else []


def _teacher_forced_topk(model, batch: dict[str, Any], targets: list[list[int]], *, k: int, start_id: int,
                         pad_id: int) -> tuple[list, list]:
    """For target y: log_softmax of the decoder given (start, y_1..y_{t-1}) at every position t."""
    import numpy as np
    import torch

    width = max([len(t) for t in targets] + [1])
    dec_in = np.full((len(targets), width), pad_id, dtype=np.int64)
    dec_mask = np.zeros((len(targets), width), dtype=np.int64)
    for r, t in enumerate(targets):
        dec_in[r, 0] = start_id
        dec_in[r, 1:len(t)] = t[:-1]
        dec_mask[r, : max(len(t), 1)] = 1
    device = batch["input_ids"].device
    logits = model(**batch, decoder_input_ids=torch.from_numpy(dec_in).to(device),
                   decoder_attention_mask=torch.from_numpy(dec_mask).to(device)).logits
    values, indices = torch.log_softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
    values, indices = values.cpu().numpy(), indices.cpu().numpy().astype(np.int32)
    if values.shape[-1] < k:  # vocab smaller than k: pad with -inf / id -1
        pad = k - values.shape[-1]
        values = np.concatenate([values, np.full(values.shape[:2] + (pad,), -np.inf, np.float32)], axis=-1)
        indices = np.concatenate([indices, np.full(indices.shape[:2] + (pad,), -1, np.int32)], axis=-1)
    return ([indices[r, : len(t)] for r, t in enumerate(targets)], [values[r, : len(t)] for r, t in enumerate(targets)])


def _mask_token_problem(local, mask: str, teacher: str) -> str | None:
    """Augmented text carries `mask`: the teacher must read it as one known token."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(local))
    except Exception:  # reported by check_teacher
        return None
    if mask == tok.mask_token or (mask in tok.get_vocab() and mask not in (tok.unk_token, None)):
        return None
    hint = f"set it to the teacher's mask token {tok.mask_token!r}" if tok.mask_token else \
        "this teacher has no mask token: set p_mask: 0 or use a token from its vocabulary"
    return f"mask token {mask!r} is unknown to teacher {teacher!r}'s tokenizer; {hint}"
