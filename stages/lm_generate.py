"""`lm_generate`: a causal LM teacher completes prompts (sampled or beam search); the completions
are sequence-level pseudo-targets (Seq-KD, Kim & Rush 2016, for LMs) that `train_lm` learns with
cross-entropy (kd.alpha 0).

A prompt is the start token plus a document's first `prompt_tokens` tokens (the whole document
when unset, cut to fit the context). One output row per completion:
  `id` = "<doc id>#<j>" (j < num_samples), `doc_id`, `prompt` and `completion` (text),
  `input_ids` list<uint> (start + prompt + completion, eos included when generated) and
  `target_start` int32 (first position whose next token is a target: the completion's first
  token, or 0 with targets: all) — the layout `lm_label` rows have, without distributions.
Sampling is seeded by (manifest seed, document id): a rerun, another worker or a resume after a
crash draws the same completions, whatever the batching. Ids past the tokenizer's length
(padded embedding rows) are never generated.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, model_validator

from kd.lm.teacher import configured_teacher, teacher_vocab_facts
from kd.teachers import quiet_transformers, teacher_fingerprint
from pipeline.devices import NumericsConfig, worker_device
from pipeline.stage import Facts, InputRole, MapStage, Problem, StageContext, throughput, located


class LmGenerateConfig(NumericsConfig):
    teacher: str | None = located(None, description="causal LM checkpoint directory or cached hub id "
                                "(or give inputs: {teacher: <stage>} with files/model/)")
    revision: str | None = Field(None, description="hub revision of `teacher`")
    trust_remote_code: bool = False
    text_column: str = "text"
    prompt_tokens: int | None = Field(None, gt=0, description="prompt = the document's first N tokens; "
                                      "unset: the whole document")
    max_new_tokens: int = Field(32, gt=0)
    max_length: int = Field(128, gt=2, description="most tokens of prompt + completion (the teacher's context)")
    strategy: Literal["sample", "beam"] = "sample"
    num_samples: int = Field(1, gt=0, le=64, description="completions per prompt (beam: the n best beams)")
    temperature: float = Field(1.0, gt=0, description="sample: softmax temperature")
    top_p: float = Field(1.0, gt=0, le=1, description="sample: nucleus mass")
    num_beams: int = Field(4, gt=0, description="beam: beam width")
    targets: Literal["completion", "all"] = Field("completion", description="which next tokens train_lm learns: "
                                                  "the completion's, or every token after the start")
    concurrency: int | None = throughput(None, gt=0)

    @model_validator(mode="after")
    def _consistent(self) -> "LmGenerateConfig":
        if self.max_new_tokens + 2 > self.max_length:
            raise ValueError(f"max_new_tokens {self.max_new_tokens} leaves no room for a prompt in max_length "
                             f"{self.max_length}; raise max_length or lower max_new_tokens")
        if self.prompt_tokens is not None and 1 + self.prompt_tokens + self.max_new_tokens > self.max_length:
            raise ValueError(f"1 + prompt_tokens {self.prompt_tokens} + max_new_tokens {self.max_new_tokens} "
                             f"exceeds max_length {self.max_length}")
        if self.strategy == "beam" and self.num_samples > self.num_beams:
            raise ValueError(f"num_samples {self.num_samples} > num_beams {self.num_beams}: beam search returns at "
                             "most num_beams completions")
        if self.revision is not None and self.teacher is None:
            raise ValueError("`revision` belongs to `teacher`")
        return self


class LmGenerateStage(MapStage):
    """Teacher completions of prompts (sampled or beam) as Seq-KD text for train_lm."""

    type = "lm_generate"
    Config = LmGenerateConfig
    inputs = {
        "data": InputRole(doc="documents (id + text column): the prompts"),
        "teacher": InputRole(required=False, kind="files", doc="a checkpoint artifact holding files/model/"),
    }
    config: LmGenerateConfig

    def validate(self, *, input_columns) -> list[Problem]:
        from kd.lm.teacher import check_teacher_source

        return check_teacher_source(self.config, input_columns, stage="lm_generate")

    def output_columns(self, *, input_columns) -> list[str] | None:
        return ["id", "doc_id", "prompt", "completion", "input_ids", "target_start"]

    def output_facts(self, *, input_facts) -> Facts:
        """Text targets (no distributions), and the teacher's vocabulary when it is a path."""
        vocab = teacher_vocab_facts(self.config)
        return Facts({"lm_mode": "text", **vocab}, {"lm_mode": "stage type", **(
            {"lm_vocab": "config.teacher"} if vocab else {})})

    def uses_seed(self) -> bool:
        """strategy: sample: the seed (with each document id) draws the completions."""
        return self.config.strategy == "sample"

    def fingerprint(self) -> dict[str, str]:
        """The teacher's files (weights, config, tokenizer), or its hub id + revision, when given by path."""
        cfg = self.config
        return {"teacher": teacher_fingerprint(cfg.teacher, cfg.revision)} if cfg.teacher else {}

    def external_models(self) -> dict[str, Path]:
        """The teacher, when given by path, `pkg:` folder or pinned hub id: stored once in the
        workdir, and workers load that copy."""
        return configured_teacher(self.config)

    def setup(self, ctx: StageContext) -> None:
        from kd.lm.teacher import load_causal_lm, teacher_dir
        from kd.lm.text import vocab_digest

        quiet_transformers()
        cfg = self.config
        self.device, dtype = worker_device(self.numerics(), stage=ctx.stage_name)
        self.model, self.tok = load_causal_lm(teacher_dir(cfg, ctx), device=self.device, dtype=dtype,
                                              revision=cfg.revision, trust_remote_code=cfg.trust_remote_code)
        self.vocab_digest = vocab_digest(self.tok)
        self.model_vocab = self.model.get_output_embeddings().weight.shape[0]
        positions = getattr(self.model.config, "n_positions", None) or getattr(
            self.model.config, "max_position_embeddings", None)
        if positions is not None and cfg.max_length > positions:
            raise ValueError(f"max_length {cfg.max_length} exceeds the teacher's {positions} positions; "
                             f"set max_length <= {positions}")

    def metadata(self) -> dict[str, str]:
        from kd.lm.codecs import id_dtype

        cfg = self.config
        codec = {"mode": "text", "k": 0, "vocab_size": len(self.tok),
                 "id_dtype": str(id_dtype(len(self.tok))), "strategy": cfg.strategy}
        return {"task": "lm_generate", "mode": "text", "codec": json.dumps(codec), "vocab_digest": self.vocab_digest,
                "vocab_size": str(len(self.tok)), "model_vocab_size": str(self.model_vocab),
                "eos_token_id": str(self.tok.eos_token_id)}

    def process(self, table, ctx: StageContext, *, shard_index: int):
        from kd.lm.text import document_ids

        cfg = self.config
        rows: list[dict[str, Any]] = []
        for doc_id, text in zip(table.column("id").to_pylist(), table.column(cfg.text_column).to_pylist()):
            if not text or not str(text).strip():
                continue
            ids = document_ids(self.tok, str(text))[:-1]  # the document's eos never ends a prompt
            room = cfg.max_length - cfg.max_new_tokens
            prompt = ids[: 1 + cfg.prompt_tokens] if cfg.prompt_tokens is not None else ids[:room]
            for j, completion in enumerate(self._complete(prompt, str(doc_id), ctx.seed or 0)):
                rows.append({"id": f"{doc_id}#{j}", "doc_id": str(doc_id),
                             "prompt": self.tok.decode(prompt[1:], skip_special_tokens=True),
                             "completion": self.tok.decode(completion, skip_special_tokens=True),
                             "input_ids": prompt + completion,
                             "target_start": len(prompt) - 1 if cfg.targets == "completion" else 0})
        return self._table(rows)

    def _complete(self, prompt: list[int], doc_id: str, seed: int) -> list[list[int]]:
        """num_samples completions of one prompt (ids after the prompt, up to and with eos)."""
        import torch

        from kd.training import derive_seed

        cfg = self.config
        eos, pad = self.tok.eos_token_id, self.tok.pad_token_id
        options: dict[str, Any] = {"max_new_tokens": cfg.max_new_tokens, "num_return_sequences": cfg.num_samples,
                                   "eos_token_id": eos, "pad_token_id": pad if pad is not None else eos,
                                   "suppress_tokens": list(range(len(self.tok), self.model_vocab)) or None}
        if cfg.strategy == "sample":
            options.update(do_sample=True, temperature=cfg.temperature, top_p=cfg.top_p, top_k=0, num_beams=1)
        else:
            options.update(do_sample=False, num_beams=cfg.num_beams, early_stopping=True)
        ids = torch.tensor([prompt], device=self.device)
        generator_seed = derive_seed(seed, "lm_generate", doc_id)
        with torch.inference_mode(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(generator_seed)
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), **options)
        completions = []
        for seq in out[:, len(prompt):].tolist():
            if eos in seq:
                seq = seq[: seq.index(eos) + 1]
            elif pad is not None and pad != eos:
                while seq and seq[-1] == pad:
                    seq.pop()
            completions.append(seq)
        return completions

    def _table(self, rows: list[dict[str, Any]]):
        import numpy as np
        import pyarrow as pa

        from kd.lm.codecs import id_dtype

        dt = id_dtype(len(self.tok))
        return pa.table({
            "id": pa.array([r["id"] for r in rows], pa.string()),
            "doc_id": pa.array([r["doc_id"] for r in rows], pa.string()),
            "prompt": pa.array([r["prompt"] for r in rows], pa.string()),
            "completion": pa.array([r["completion"] for r in rows], pa.string()),
            "input_ids": pa.array([np.asarray(r["input_ids"], dtype=dt) for r in rows], pa.list_(pa.from_numpy_dtype(dt))),
            "target_start": pa.array([r["target_start"] for r in rows], pa.int32()),
        })

    def summarize(self, shard_stats: list[dict[str, Any]], ctx: StageContext) -> dict[str, Any]:
        """Completions, their target tokens, and the share that ended with eos."""
        import pyarrow.compute as pc

        from pipeline import storage

        out = ctx.output()
        rows = tokens = ended = 0
        eos = None
        for i in out.shard_indices():
            t = storage.read_parquet(out.shard_path(i), columns=["input_ids", "target_start"])
            rows += t.num_rows
            tokens += pc.sum(pc.subtract(pc.subtract(pc.list_value_length(t["input_ids"]), 1),
                                         t["target_start"])).as_py() or 0
            if eos is None:
                eos = int(json.loads(storage.parquet_file(out.shard_path(i)).schema_arrow.metadata.get(
                    b"kdpipe.eos_token_id", b"-1")))
            ended += sum(1 for ids in t["input_ids"].to_pylist() if ids and ids[-1] == eos)
        return {"lm_generate": {"strategy": self.config.strategy, "completions": rows, "target_tokens": tokens,
                                "ended_with_eos": round(ended / max(rows, 1), 4)}}
