"""`spm`: a sentencepiece model trained on the transfer set, as its own cached artifact
(files/spm.model, files/spm.vocab), for students that should not depend on the teacher's vocabulary.

Texts are streamed shard by shard into a file in scratch (never the whole set in memory);
sentencepiece samples at most `input_sentence_size` of them. Ids: pad 0, unk 1, bos 2, eos 3."""
from __future__ import annotations

import shutil
from typing import Any, Literal

from pydantic import Field

from pipeline.stage import InputRole, Problem, ResourceConfig, StageContext, TaskStage


class SpmConfig(ResourceConfig):
    columns: list[str] = Field(default_factory=lambda: ["text"], description="text columns to learn from")
    vocab_size: int = Field(8000, gt=8, description="an upper bound on a small corpus (hard_vocab_limit off)")
    model_type: Literal["unigram", "bpe", "char", "word"] = "unigram"
    character_coverage: float = Field(1.0, gt=0, le=1)
    input_sentence_size: int = Field(1_000_000, gt=0)
    seed: int = 0


class SpmStage(TaskStage):
    type = "spm"
    Config = SpmConfig
    inputs = {"data": InputRole(required=True, doc="transfer set shards")}
    config: SpmConfig

    def validate(self, *, input_columns) -> list[Problem]:
        problems = []
        for cols in input_columns.get("data") or []:
            for c in self.config.columns:
                if cols is not None and c not in cols:
                    problems.append(Problem("config.columns", f"column {c!r} is not in the data "
                                            f"(it has {', '.join(cols)})"))
        return problems

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import sentencepiece as spm

        cfg = self.config
        corpus = ctx.scratch_dir / "corpus.txt"
        lines = 0
        with open(corpus, "w", encoding="utf-8") as f:
            for table in ctx.input("data").iter_shards(columns=cfg.columns):
                for col in cfg.columns:
                    for text in table[col].to_pylist():
                        if text:
                            f.write(text.replace("\n", " ") + "\n")
                            lines += 1
        if not lines:
            raise ValueError(f"no text in columns {cfg.columns} to train sentencepiece on")
        prefix = ctx.scratch_dir / "spm"
        spm.set_random_generator_seed(cfg.seed)  # sentence sampling is seeded, so reruns agree
        spm.SentencePieceTrainer.train(
            input=str(corpus), model_prefix=str(prefix), vocab_size=cfg.vocab_size, model_type=cfg.model_type,
            character_coverage=cfg.character_coverage, input_sentence_size=cfg.input_sentence_size,
            shuffle_input_sentence=True, hard_vocab_limit=False, pad_id=0, unk_id=1, bos_id=2, eos_id=3,
            num_threads=ctx.num_cpus, minloglevel=2)
        for ext in ("model", "vocab"):
            shutil.copyfile(f"{prefix}.{ext}", ctx.out_dir / f"spm.{ext}")
        corpus.unlink()
        size = spm.SentencePieceProcessor(model_file=str(ctx.out_dir / "spm.model")).get_piece_size()
        if size < 5:
            raise RuntimeError(f"sentencepiece produced only {size} pieces; give it more text")
        return {"sentences": lines, "vocab_size": size}
