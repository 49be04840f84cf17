"""`chain_seq2seq`: two finished seq2seq models joined into one pivot translator — `first`
translates the input (e.g. FR→EN), `second` translates that output (EN→DE). Nothing is trained:
the stage copies both model folders under `files/student/` with a `student.json` of type
`chain` (loaded by `kd.students.chain`), so `evaluate` scores the pivot like any student.

The pivot baseline of zero-shot translation (manifests/zeroshot-fr-de.yaml): a FR→DE system
that never saw a French–German pair, built from a FR→EN model and the EN→DE teacher.
"""
from __future__ import annotations

from typing import Any

from pydantic import Field

from pipeline.stage import InputRole, ResourceConfig, StageContext, TaskStage


class ChainSeq2SeqConfig(ResourceConfig):
    first_num_beams: int | None = Field(None, gt=0, description="beam width of the first model "
                                        "(null: its own default, greedy for train_seq2seq students)")
    second_num_beams: int | None = Field(None, gt=0, description="beam width of the second model "
                                         "(null: its own default, the checkpoint's for a teacher)")


class ChainSeq2SeqStage(TaskStage):
    type = "chain_seq2seq"
    Config = ChainSeq2SeqConfig
    inputs = {
        "first": InputRole(kind="files", doc="seq2seq model run on the input (train_seq2seq or seq2seq_teacher)"),
        "second": InputRole(kind="files", doc="seq2seq model run on the first model's output"),
    }
    config: ChainSeq2SeqConfig
    model_folder = "student"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import json
        import shutil

        from kd.students import load_student

        out = ctx.out_dir / "student"
        if out.exists():  # a resumed run starts the copy over
            shutil.rmtree(out)
        out.mkdir(parents=True)
        summary: dict[str, Any] = {}
        for role in ("first", "second"):
            source = _model_dir(ctx.input(role).files_dir, role)
            shutil.copytree(source, out / role)
            model = load_student(out / role)
            if model.task != "seq2seq":
                raise ValueError(f"inputs.{role} is a {model.task} model ({source}); chain_seq2seq joins "
                                 "two seq2seq models")
            summary[f"{role}_parameters"] = model.num_parameters()
        meta = {"type": "chain", "task": "seq2seq", "first_num_beams": self.config.first_num_beams,
                "second_num_beams": self.config.second_num_beams}
        (out / "student.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
        return {**summary, "parameters": summary["first_parameters"] + summary["second_parameters"]}


def _model_dir(files_dir, role: str):
    for sub in ("student", "model"):
        if (files_dir / sub).is_dir():
            return files_dir / sub
    raise FileNotFoundError(f"inputs.{role}: {files_dir} holds no student/ or model/ folder; give a "
                            "train_seq2seq or seq2seq_teacher stage")
