"""`lm_label`: a causal LM teacher, teacher-forced over a text corpus, stores its next-token
distributions in a sparse codec (kd/lm/codecs.py) for `train_lm`.

A separate stage from `label` because nothing but the teacher loading is shared: the rows are
windows of documents, not input rows; the columns, the config (codec, k, windows) and the
vocabulary checks are all different, and `label` is already past 500 lines.

One output row per window of a document (`max_length` tokens, windows `stride` apart, every
next token predicted once, with the most context):
  `id` = "<doc id>#<window>", `doc_id`, `input_ids` list<uint>, `target_start` int32 (first
  position whose next token is a target), `kl_rebuilt` float32 (mean KL(full || rebuilt) over
  the row's targets: the fidelity figure), and per target position:
  topk:    `topk_ids` list<fixed_size_list<uint, k>>, `topk_logprobs` list<fixed_size_list<f16, k>>,
           `log_normalizer` list<float32>
  sampled: `sample_ids` list<list<uint>>, `sample_counts` list<list<uint8>>, and with
           store_logprobs `sample_logprobs` list<list<f16>>
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from pipeline.devices import NumericsConfig, worker_device
from pipeline.stage import Facts, InputRole, MapStage, Problem, StageContext, throughput, located
from kd.lm.teacher import configured_teacher, teacher_vocab_facts
from kd.teachers import length_batches, quiet_transformers, teacher_fingerprint

DIST_COLUMNS = {"topk": ["topk_ids", "topk_logprobs", "log_normalizer"], "sampled": ["sample_ids", "sample_counts"]}


class LmLabelConfig(NumericsConfig):
    teacher: str | None = located(None, description="causal LM checkpoint directory or cached hub id "
                                "(or give inputs: {teacher: <stage>} with files/model/)")
    revision: str | None = Field(None, description="hub revision of `teacher`")
    trust_remote_code: bool = False
    text_column: str = "text"
    max_length: int = Field(128, gt=1, description="tokens per window (the teacher's context)")
    stride: int | None = Field(None, gt=0, description="tokens between window starts for long documents; "
                               "default max_length // 2")
    mode: Literal["topk", "sampled"] = "topk"
    k: int = Field(8, gt=0, le=255, description="topk: ids kept per position; sampled: draws per position")
    value_dtype: Literal["float16", "float32"] = "float16"
    store_logprobs: bool = Field(False, description="sampled: also store the teacher log-probs of drawn ids "
                                 "(needed to train at a temperature other than 1)")
    token_budget: int = throughput(8192, gt=0, description="padded tokens per batch")
    batch_size: int = throughput(64, gt=0, description="most windows per batch")
    concurrency: int | None = throughput(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "LmLabelConfig":
        if self.stride is not None and self.stride > self.max_length - 1:
            raise ValueError(f"stride {self.stride} must be below max_length {self.max_length}")
        if self.store_logprobs and self.mode != "sampled":
            raise ValueError("store_logprobs applies to mode: sampled (topk always stores log-probs)")
        if self.revision is not None and self.teacher is None:
            raise ValueError("`revision` belongs to `teacher`")
        return self

    def window_stride(self) -> int:
        return self.stride or max(1, self.max_length // 2)


class LmLabelStage(MapStage):
    """Teacher-forced causal LM next-token distributions (topk or sampled) into Parquet."""

    type = "lm_label"
    Config = LmLabelConfig
    inputs = {
        "data": InputRole(doc="documents: id + text column"),
        "teacher": InputRole(required=False, kind="files", doc="a checkpoint artifact holding files/model/"),
    }
    config: LmLabelConfig

    # --- planning -------------------------------------------------------------------------
    def validate(self, *, input_columns) -> list[Problem]:
        from kd.lm.teacher import check_teacher_source

        return check_teacher_source(self.config, input_columns, stage="lm_label")

    def output_columns(self, *, input_columns) -> list[str] | None:
        cols = ["id", "doc_id", "input_ids", "target_start", "kl_rebuilt"] + DIST_COLUMNS[self.config.mode]
        return cols + (["sample_logprobs"] if self.config.store_logprobs else [])

    def output_facts(self, *, input_facts) -> Facts:
        """The codec, and the teacher's vocabulary (when the teacher is a path) for train_lm to
        check its student tokenizer against before anything runs."""
        cfg = self.config
        facts = Facts({"lm_mode": cfg.mode, "lm_logprobs": cfg.mode == "topk" or cfg.store_logprobs},
                      {"lm_mode": "config.mode", "lm_logprobs": "config.store_logprobs"})
        vocab = teacher_vocab_facts(cfg)
        facts.values.update(vocab)
        if vocab:
            facts.origins.update(lm_vocab="config.teacher")
        return facts

    def uses_seed(self) -> bool:
        """mode: sampled: the seed (with each row id) draws the stored ids."""
        return self.config.mode == "sampled"

    def fingerprint(self) -> dict[str, str]:
        """The teacher's files (weights, config, tokenizer), or its hub id + revision, when given by path."""
        cfg = self.config
        return {"teacher": teacher_fingerprint(cfg.teacher, cfg.revision)} if cfg.teacher else {}

    def external_models(self) -> dict[str, Path]:
        """The teacher, when given by path, `pkg:` folder or pinned hub id."""
        return configured_teacher(self.config)

    # --- worker ---------------------------------------------------------------------------
    def setup(self, ctx: StageContext) -> None:
        from kd.lm.codecs import CodecSpec
        from kd.lm.teacher import load_causal_lm, teacher_dir
        from kd.lm.text import vocab_digest

        quiet_transformers()
        cfg = self.config
        # As planned (num_gpus > 0 -> CUDA), or DeviceUnavailable naming this node.
        self.device, dtype = worker_device(self.numerics(), stage=ctx.stage_name)
        local = teacher_dir(cfg, ctx)
        self.model, self.tok = load_causal_lm(local, device=self.device, dtype=dtype,
                                              trust_remote_code=cfg.trust_remote_code)
        self.spec = CodecSpec(mode=cfg.mode, vocab_size=len(self.tok), k=cfg.k, value_dtype=cfg.value_dtype,
                              store_logprobs=cfg.store_logprobs)
        self.vocab_digest = vocab_digest(self.tok)
        self.model_vocab = self.model.get_output_embeddings().weight.shape[0]

    def metadata(self) -> dict[str, str]:
        from kd.lm.codecs import describe

        cfg = self.config
        return {"task": "lm", "mode": cfg.mode, "codec": json.dumps(describe(self.spec)),
                "vocab_digest": self.vocab_digest, "vocab_size": str(len(self.tok)),
                "model_vocab_size": str(self.model_vocab), "max_length": str(cfg.max_length),
                "stride": str(cfg.window_stride())}

    def process(self, table, ctx: StageContext, *, shard_index: int):
        import torch

        from kd.lm.teacher import window_logits
        from kd.lm.text import document_ids, windows

        cfg = self.config
        rows: list[dict[str, Any]] = []
        for doc_id, text in zip(table.column("id").to_pylist(), table.column(cfg.text_column).to_pylist()):
            if not text or not str(text).strip():
                continue
            ids = document_ids(self.tok, str(text))
            for w, win in enumerate(windows(len(ids), cfg.max_length, cfg.window_stride())):
                rows.append({"id": f"{doc_id}#{w}", "doc_id": str(doc_id), "input_ids": ids[win.start:win.end],
                             "target_start": win.target_start})
        lengths = [len(r["input_ids"]) for r in rows]
        pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.tok.eos_token_id
        for batch in length_batches(lengths, token_budget=cfg.token_budget, batch_size=cfg.batch_size):
            with torch.inference_mode():
                logits = window_logits(self.model, [rows[i]["input_ids"] for i in batch], pad_id=pad_id,
                                       device=self.device)
            for i, z in zip(batch, logits):
                rows[i].update(self._encode(z[rows[i]["target_start"]:].numpy(), rows[i]["id"], ctx.seed or 0))
        return self._table(rows)

    def _encode(self, logits, row_id: str, seed: int) -> dict[str, Any]:
        from kd.lm import codecs

        spec = self.spec
        if spec.mode == "topk":
            enc = codecs.encode_topk(logits, spec)
            rebuilt = codecs.rebuild_topk(enc, spec.vocab_size)
            out = {"topk_ids": enc["ids"], "topk_logprobs": enc["logprobs"], "log_normalizer": enc["log_normalizer"]}
        else:
            enc = codecs.encode_sampled(logits, spec, codecs.row_rng(seed, row_id))
            rebuilt = codecs.rebuild_sampled(enc["ids"], enc["counts"], spec.vocab_size)
            out = {"sample_ids": enc["ids"], "sample_counts": enc["counts"]}
            if spec.store_logprobs:
                out["sample_logprobs"] = enc["logprobs"]
        kl = codecs.kl_full_to_rebuilt(logits, rebuilt, spec.vocab_size)
        out["kl_rebuilt"] = float(kl.mean()) if kl.size else 0.0
        return out

    def _table(self, rows: list[dict[str, Any]]):
        import numpy as np
        import pyarrow as pa

        from kd.lm.codecs import id_dtype

        spec = self.spec
        idt = pa.from_numpy_dtype(id_dtype(spec.vocab_size))
        vdt = pa.from_numpy_dtype(np.dtype(spec.value_dtype))
        cols: dict[str, Any] = {
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "doc_id": pa.array([r["doc_id"] for r in rows], pa.string()),
            "input_ids": pa.array([np.asarray(r["input_ids"], dtype=id_dtype(spec.vocab_size)) for r in rows],
                                  pa.list_(idt)),
            "target_start": pa.array([r["target_start"] for r in rows], pa.int32()),
            "kl_rebuilt": pa.array([r["kl_rebuilt"] for r in rows], pa.float32()),
        }
        if spec.mode == "topk":
            cols["topk_ids"] = _nested_fixed([r["topk_ids"] for r in rows], idt, spec.k)
            cols["topk_logprobs"] = _nested_fixed([r["topk_logprobs"] for r in rows], vdt, spec.k)
            cols["log_normalizer"] = pa.array([r["log_normalizer"] for r in rows], pa.list_(pa.float32()))
        else:
            cols["sample_ids"] = pa.array([list(r["sample_ids"]) for r in rows], pa.list_(pa.list_(idt)))
            cols["sample_counts"] = pa.array([list(r["sample_counts"]) for r in rows], pa.list_(pa.list_(pa.uint8())))
            if spec.store_logprobs:
                cols["sample_logprobs"] = pa.array([list(r["sample_logprobs"]) for r in rows], pa.list_(pa.list_(vdt)))
        return pa.table(cols)

    # --- after all shards -----------------------------------------------------------------
    def summarize(self, shard_stats: list[dict[str, Any]], ctx: StageContext) -> dict[str, Any]:
        """Mode, target tokens, on-disk bytes/token of the distribution columns, and the mean
        KL(full || rebuilt) per token, read back from the shards."""
        import pyarrow.compute as pc

        from pipeline import storage

        cfg = self.config
        out = ctx.output()
        shards = [out.shard_path(i) for i in out.shard_indices()]
        dist_cols = DIST_COLUMNS[cfg.mode] + (["sample_logprobs"] if cfg.store_logprobs else [])
        tokens, dist_bytes, kl_sum, all_bytes, rows = 0, 0, 0.0, 0, 0
        for path in shards:
            parquet = storage.parquet_file(path)
            meta = parquet.metadata
            rows += meta.num_rows
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                for c in range(rg.num_columns):
                    chunk = rg.column(c)
                    all_bytes += chunk.total_compressed_size
                    if chunk.path_in_schema.split(".")[0] in dist_cols:
                        dist_bytes += chunk.total_compressed_size
            t = parquet.read(columns=["input_ids", "target_start", "kl_rebuilt"])
            n = pc.subtract(pc.subtract(pc.list_value_length(t["input_ids"]), 1), t["target_start"])
            tokens += pc.sum(n).as_py() or 0
            kl_sum += pc.sum(pc.multiply(n.cast("float64"), t["kl_rebuilt"].cast("float64"))).as_py() or 0.0
        return {"lm": {"mode": cfg.mode, "k": cfg.k, "rows": rows, "tokens": tokens,
                       "bytes_per_token": round(dist_bytes / max(tokens, 1), 2),
                       "all_columns_bytes_per_token": round(all_bytes / max(tokens, 1), 2),
                       "kl_full_to_rebuilt": round(kl_sum / max(tokens, 1), 5)}}


def _nested_fixed(per_row: list, value_type, width: int):
    """list<fixed_size_list<value_type, width>> from per-row [n, width] numpy arrays."""
    import numpy as np
    import pyarrow as pa

    offsets = np.cumsum([0] + [len(a) for a in per_row]).astype(np.int32)
    flat = np.concatenate([np.asarray(a).reshape(-1) for a in per_row]) if per_row else np.zeros(0)
    inner = pa.FixedSizeListArray.from_arrays(pa.array(flat, value_type), width)
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), inner)
