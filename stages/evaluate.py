"""`evaluate`: score teachers and students on one gold artifact, and time them on the same inputs.

Inputs: `data` (shards with gold labels; a dev or test set), `models` (many: train artifacts,
whose files/student is a student directory, and/or checkpoint artifacts whose files/model is an
HF dir), `teacher` (optional: the reference for speed-up; it is evaluated too).

Metrics by the model's task: accuracy and macro-F1 (classification), BLEU and chrF via sacrebleu
(seq2seq), token-level micro-F1 over non-"O" tags (token classification). Speed: sentences/s of
`predict` on the first `speed_rows` inputs at batch 64, after one warm-up batch, in this process,
so every model is timed on the same inputs, machine and thread count.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from pydantic import Field

from kd.metrics import accuracy, macro_f1, token_f1
from pipeline.artifact import write_json
from pipeline.stage import InputRole, Problem, ResourceConfig, StageContext, TaskStage, throughput, located


# The metric a report shows for a model, by task: the first of these that was scored.
PRIMARY_METRICS = ("accuracy", "bleu", "token_f1")


def model_dir(art_path: Path) -> Path:
    """Where the loadable model of an artifact lives (student dir, HF dir, or files/)."""
    files = Path(art_path) / "files"
    for sub in ("student", "model"):
        if (files / sub).is_dir():
            return files / sub
    return files


class EvaluateConfig(ResourceConfig):
    text_column: str = "text"
    pair_column: str | None = None
    label_column: str = Field("label", description="gold class (classification) or tag list (tagging)")
    target_column: str = Field("target", description="reference translation (seq2seq)")
    limit: int | None = Field(None, gt=0, description="score only the first N rows")
    speed_rows: int = Field(512, gt=0, description="inputs used to time each model")
    teacher_model: str | None = located(None, description="a local HF model dir as the speed reference, "
                                      "when the teacher is not an artifact of this run (no `teacher` input)")
    batch_size: int = throughput(64, gt=0)


class EvaluateStage(TaskStage):
    type = "evaluate"
    Config = EvaluateConfig
    inputs = {
        "data": InputRole(required=True, doc="gold artifact (dev or test)"),
        "models": InputRole(required=True, many=True, kind="files", doc="train and/or checkpoint artifacts"),
        "teacher": InputRole(required=False, kind="files", doc="reference model for speed-up"),
    }
    config: EvaluateConfig
    report_order = 1  # measured on held-out data with speed: these rows replace train's own

    @classmethod
    def report_section(cls, *, name: str, files_dir: Path, manifest: dict[str, Any]):
        """One row per evaluated model: its primary metric, speed and speed-up vs the teacher."""
        import json

        from pipeline.stage import ReportSection

        rows = []
        for model in json.loads((files_dir / "metrics.json").read_text()).get("models", []):
            scores = model.get("metrics", {})
            metric = next((k for k in PRIMARY_METRICS if k in scores), "")
            labels = model.get("labels_used")
            rows.append({
                "model": model["name"], "role": "teacher" if model.get("is_teacher") else "student",
                "type": model.get("type"), "params": model.get("parameters"), "size_bytes": model.get("size_bytes"),
                "metric": f"{metric} ({name})", "value": scores.get(metric), "sent/s": model.get("sentences_per_s"),
                "speed-up": model.get("speedup_vs_teacher"),
                "labels": "—" if model.get("is_teacher") else (", ".join(map(str, labels)) if labels else "gold only")})
        return ReportSection(rows)

    def validate(self, *, input_columns) -> list[Problem]:
        cfg = self.config
        problems = []
        for cols in input_columns.get("data") or []:
            if cols is not None and cfg.text_column not in cols:
                problems.append(Problem("config.text_column", f"data has no column {cfg.text_column!r} "
                                        f"(it has {', '.join(cols)})"))
            if cols is not None and cfg.label_column not in cols and cfg.target_column not in cols:
                problems.append(Problem("inputs.data", f"no gold column: neither {cfg.label_column!r} nor "
                                        f"{cfg.target_column!r} is in {', '.join(cols)}; set label_column"))
        if cfg.teacher_model and not (Path(cfg.teacher_model) / "config.json").is_file():
            problems.append(Problem("config.teacher_model", f"{cfg.teacher_model!r} is not an HF model directory "
                                    "(no config.json); give the teacher's checkpoint dir"))
        if cfg.teacher_model and input_columns.get("teacher"):
            problems.append(Problem("config.teacher_model", "give the teacher either as `inputs.teacher` or "
                                    "as `teacher_model`, not both"))
        return problems

    def fingerprint(self) -> dict[str, str]:
        """The teacher checkpoint's files, when `teacher_model` is given."""
        from pipeline.hashing import hash_tree

        path = self.config.teacher_model
        return {"teacher": hash_tree(path)} if path and Path(path).is_dir() else {}

    def run(self, ctx: StageContext) -> dict[str, Any]:
        from kd.students import load_student

        cfg = self.config
        data = ctx.input("data")
        table = data.read_table()
        if cfg.limit:
            table = table.slice(0, cfg.limit)
        texts = [t or "" for t in table[cfg.text_column].to_pylist()]
        pairs = [t or "" for t in table[cfg.pair_column].to_pylist()] if cfg.pair_column else None
        teacher_art = ctx.optional_input("teacher")
        arts = list(ctx.inputs.get("models") or [])
        if teacher_art is not None and teacher_art.path not in [a.path for a in arts]:
            arts.insert(0, teacher_art)
        entries = [(self._describe(a, teacher_art), model_dir(a.path)) for a in arts]
        if cfg.teacher_model:
            path = Path(cfg.teacher_model)
            entries.insert(0, ({"name": path.name, "key": None, "stage_type": None, "is_teacher": True,
                                "labels_used": None}, path))
        results = []
        for entry, directory in entries:
            model = load_student(directory)
            entry.update(task=model.task, type=getattr(model, "type", "?"), parameters=model.num_parameters(),
                         size_bytes=sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()))
            entry["metrics"] = self._score(model, table, texts, pairs, data)
            entry["sentences_per_s"] = self._speed(model, texts[: cfg.speed_rows],
                                                   None if pairs is None else pairs[: cfg.speed_rows])
            results.append(entry)
        ref = next((r for r in results if r["is_teacher"]), None)
        for r in results:
            r["speedup_vs_teacher"] = round(r["sentences_per_s"] / ref["sentences_per_s"], 3) if ref else None
        metrics = {"data": data.key, "rows": len(texts), "teacher": ref["name"] if ref else None, "models": results}
        write_json(ctx.out_dir / "metrics.json", metrics)
        return {"rows": len(texts), "teacher": metrics["teacher"],
                "models": {r["name"]: {"metrics": r["metrics"], "speedup_vs_teacher": r["speedup_vs_teacher"]}
                           for r in results}}

    @staticmethod
    def _describe(art, teacher_art) -> dict[str, Any]:
        try:
            manifest = art.manifest
        except (OSError, ValueError):
            manifest = {}
        labels = (manifest.get("summary") or {}).get("labels")
        return {"name": manifest.get("stage_name") or art.key, "key": art.key, "stage_type": manifest.get("type"),
                "is_teacher": teacher_art is not None and art.path == teacher_art.path,
                "labels_used": [lab.get("stage") or lab.get("key") for lab in labels] if labels is not None else None}

    def _score(self, model, table, texts, pairs, data) -> dict[str, float]:
        import sacrebleu

        cfg = self.config
        bs = cfg.batch_size
        if model.task == "seq2seq":
            refs = [t or "" for t in table[cfg.target_column].to_pylist()]
            hyps = model.predict(texts, batch_size=bs)
            return {"bleu": round(sacrebleu.corpus_bleu(hyps, [refs]).score, 3),
                    "chrf": round(sacrebleu.corpus_chrf(hyps, [refs]).score, 3),
                    **({"num_beams": model.num_beams} if hasattr(model, "num_beams") else {})}
        gold = table[cfg.label_column].to_pylist()
        if model.task == "token_classification":
            return {"token_f1": round(token_f1(model.predict(texts, batch_size=bs), gold), 4)}
        pred = model.predict(texts, pairs, batch_size=bs, return_names=False)
        gold_idx = _gold_indices(gold, model.label_names, data)
        return {"accuracy": round(accuracy(pred, gold_idx), 4), "macro_f1": round(macro_f1(pred, gold_idx), 4)}

    def _speed(self, model, texts, pairs) -> float:
        bs = self.config.batch_size
        kwargs = {} if pairs is None else {"pairs": pairs}
        if model.task != "classification":
            kwargs = {}
        model.predict(texts[:bs], **({k: v[:bs] for k, v in kwargs.items()}), batch_size=bs)  # warm-up
        start = time.perf_counter()
        model.predict(texts, **kwargs, batch_size=bs)
        return round(len(texts) / max(time.perf_counter() - start, 1e-9), 2)


def _gold_indices(gold: list[Any], model_names: list[str] | None, data) -> list[int]:
    """Gold values as the model's class indices, matched by name: an integer gold label names
    the data's label_names[i], which may sit at another index of the model (a teacher whose
    id2label is in another order). Without names on either side, integers are positions."""
    from kd.teachers import gold_indices
    from kd.train_data import _md

    data_names = [str(n) for n in _md(data, "label_names") or []] or None
    names = [str(n) for n in model_names] if model_names else None
    if not (names or data_names):
        if any(not isinstance(g, int) for g in gold if g is not None):
            raise ValueError("gold labels are strings but the model has no label names to map them to")
        names = [str(i) for i in range(max([g for g in gold if g is not None], default=0) + 1)]  # positions
    names = names or data_names
    known = set(names)
    unknown = sorted({str(data_names[g] if isinstance(g, int) and data_names and 0 <= g < len(data_names) else g)
                      for g in gold if g is not None} - known)
    if unknown and data_names and names != data_names:
        raise ValueError(f"the model's labels {names} do not name the data's label_names {data_names} "
                         f"(e.g. {unknown[0]!r}); evaluate models trained on these labels")
    return gold_indices(gold, names, data_names=data_names, unknown=-2)  # -2: counted wrong
