"""Stage types by string key, imported lazily so `plan` never pays for torch or spaCy imports
of stages a manifest does not use."""
from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

from pipeline.stage import Stage

# type key -> "module:Class". One line per stage module in `stages/`.
STAGES: dict[str, str] = {
    "read": "stages.read:ReadStage",
    "label": "stages.label:LabelStage",
    "train": "stages.train:TrainStage",
    "evaluate": "stages.evaluate:EvaluateStage",
    "spm": "stages.spm:SpmStage",
    "pos_tag": "stages.pos_tag:PosTagStage",
    "unigram": "stages.unigram:UnigramStage",
    "augment": "stages.augment:AugmentStage",
    "finetune": "stages.finetune:FinetuneStage",
    "split": "stages.split:SplitStage",
    "seq2seq_teacher": "stages.seq2seq_teacher:Seq2SeqTeacherStage",
    "train_seq2seq": "stages.train_seq2seq:TrainSeq2SeqStage",
    "agreement": "stages.agreement:AgreementStage",
    "lm_label": "stages.lm_label:LmLabelStage",
    "lm_generate": "stages.lm_generate:LmGenerateStage",
    "train_lm": "stages.train_lm:TrainLmStage",
    "lm_teacher": "stages.lm_teacher:LmTeacherStage",
    "chain_seq2seq": "stages.chain_seq2seq:ChainSeq2SeqStage",
    "pair_detection": "stages.pair_detection:PairDetectionStage",
    "train_multitask": "stages.train_multitask:TrainMultitaskStage",
}


# How `predict` loads a model folder (a student directory or an HF checkpoint).
MODEL_LOADER = "kd.students:load_student"

# CLI commands that live in the `kd/` library: "module:add_parser", added to `kdpipe`'s parser.
LIBRARY_COMMANDS = ("kd.audit.command:add_parser",)


def library_commands() -> list[Any]:
    return [_resolve(target) for target in LIBRARY_COMMANDS]


def stage_types() -> list[str]:
    return sorted(STAGES)


def get_stage_class(type_key: str) -> type[Stage]:
    try:
        target = STAGES[type_key]
    except KeyError:
        raise KeyError(type_key) from None
    cls = _resolve(target)
    if getattr(cls, "type", None) != type_key:
        raise TypeError(f"{target} declares type {getattr(cls, 'type', None)!r}, expected {type_key!r}")
    return cls


def load_model(directory: Path) -> Any:
    """The model in a stage's `model_folder`, with `predict(texts, ...)`."""
    return _resolve(MODEL_LOADER)(directory)


def _resolve(target: str) -> Any:
    module_name, name = target.split(":")
    return getattr(importlib.import_module(module_name), name)
