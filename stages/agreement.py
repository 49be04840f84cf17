"""`agreement`: how often a student, reading one side of parallel pairs, predicts the class its
teacher predicted from the other side (cross-lingual distillation, e.g. an English sentiment
teacher and a German student on held-out Multi30k pairs). No gold labels needed.

Inputs: `data` (held-out rows: id + the student's column), `labels` (the teacher's label
artifact for the same rows: a `logits` column, or `logits_<teacher>` in an ensemble), `models`
(train artifacts whose files/student loads with `kd.students.load_student`). Rows are joined
by id. Output `files/metrics.json`: agreement per student, both label distributions, and the
teacher x student confusion counts, Cohen's kappa (agreement corrected for chance) and the
teacher's majority-class rate (what a constant student would score).
"""
from __future__ import annotations

import json
from typing import Any

from pydantic import Field

from pipeline.stage import InputRole, Problem, ResourceConfig, StageContext, TaskStage, throughput


class AgreementConfig(ResourceConfig):
    student_column: str | None = Field(None, description="what the students read (e.g. the German side); "
                                       "default: each student's own training column (student.json)")
    logits_column: str = Field("logits", description="teacher logits column of the labels")
    batch_size: int = throughput(64, gt=0)


def agreement_metrics(teacher: list[int], student: list[int], names: list[str]) -> dict[str, Any]:
    n = len(teacher)
    confusion = [[0] * len(names) for _ in names]
    for t, s in zip(teacher, student):
        confusion[t][s] += 1
    observed = sum(t == s for t, s in zip(teacher, student)) / max(n, 1)
    # Chance agreement from the two label distributions: a one-sided teacher makes raw agreement
    # look high for a student that always answers the majority class (Cohen's kappa = 0 then).
    chance = sum(sum(row) * sum(r[j] for r in confusion) for j, row in enumerate(confusion)) / max(n * n, 1)
    kappa = (observed - chance) / (1 - chance) if chance < 1 else 0.0
    majority = max((sum(row) for row in confusion), default=0) / max(n, 1)
    return {"agreement": round(observed, 4), "cohen_kappa": round(kappa, 4),
            "teacher_majority_rate": round(majority, 4),
            "teacher_counts": {names[i]: sum(row) for i, row in enumerate(confusion)},
            "student_counts": {names[j]: sum(row[j] for row in confusion) for j in range(len(names))},
            "confusion_teacher_rows_student_cols": confusion}


class AgreementStage(TaskStage):
    type = "agreement"
    Config = AgreementConfig
    inputs = {
        "data": InputRole(doc="held-out rows: id + the students' column"),
        "labels": InputRole(doc="teacher label artifact (classification logits) for the same rows"),
        "models": InputRole(many=True, kind="files", doc="train artifacts (files/student)"),
    }
    config: AgreementConfig

    def validate(self, *, input_columns) -> list[Problem]:
        cfg, problems = self.config, []
        for cols in input_columns.get("data") or []:
            if cols is not None and cfg.student_column and cfg.student_column not in cols:
                problems.append(Problem("config.student_column", f"column {cfg.student_column!r} is not in "
                                        f"`data` (it has {', '.join(cols)}); name the students' side"))
        for cols in input_columns.get("labels") or []:
            if cols is not None and cfg.logits_column not in cols:
                have = [c for c in cols if c.startswith("logits")] or cols
                problems.append(Problem("config.logits_column", f"{cfg.logits_column!r} is not in the labels; "
                                        f"choose one of {', '.join(have)}"))
        return problems

    def run(self, ctx: StageContext) -> dict[str, Any]:
        import numpy as np

        from kd.students import load_student

        cfg = self.config
        data = ctx.input("data").read_table()
        labels_art = ctx.input("labels")
        labels = labels_art.read_table(columns=["id", cfg.logits_column])
        argmax = np.asarray(labels[cfg.logits_column].to_pylist(), dtype=np.float32).argmax(-1)
        teacher_of = dict(zip(labels["id"].to_pylist(), argmax.tolist()))
        ids = sorted(i for i in data["id"].to_pylist() if i in teacher_of)
        if not ids:
            raise ValueError("no row of `data` has a teacher label: label the same held-out artifact")
        teacher = [int(teacher_of[i]) for i in ids]
        md = labels_art.file_metadata()
        names_md = md.get("kdpipe.label_names", md.get("label_names"))
        width = labels.schema.field(cfg.logits_column).type.list_size
        names = json.loads(names_md) if names_md else [str(i) for i in range(width)]
        results = {}
        for art in ctx.inputs.get("models") or []:
            student = load_student(art.path)
            if student.task != "classification":
                raise ValueError(f"{art.key}: agreement compares classifiers, got a {student.task} model")
            if getattr(student, "label_names", None) and list(student.label_names) != [str(n) for n in names]:
                raise ValueError(f"{art.key}: student labels {student.label_names} differ from the "
                                 f"teacher's {names}")
            column = cfg.student_column or _training_column(art)
            if column not in data.column_names:
                raise ValueError(f"{art.key}: the student reads {column!r}, which `data` lacks "
                                 f"({', '.join(data.column_names)}); set student_column")
            text_of = dict(zip(data["id"].to_pylist(), data[column].to_pylist()))
            texts = [text_of[i] or "" for i in ids]
            pred = [int(p) for p in student.predict(texts, batch_size=cfg.batch_size, return_names=False)]
            name = art.manifest.get("stage_name") or art.key
            results[name] = {"column": column, **agreement_metrics(teacher, pred, [str(n) for n in names])}
        metrics = {"rows": len(ids), "unlabeled_rows": data.num_rows - len(ids), "label_names": names,
                   "students": results}
        ctx.out_dir.mkdir(parents=True, exist_ok=True)
        (ctx.out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        return {"rows": len(ids), "agreement": {k: v["agreement"] for k, v in results.items()},
                "cohen_kappa": {k: v["cohen_kappa"] for k, v in results.items()}}


def _training_column(art) -> str:
    meta_file = art.files_dir / "student" / "student.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    return meta.get("student_column") or "text"
