"""`audit_label_artifact`: every figure of `kdpipe audit` for one label artifact, as a dict.

The label artifact's manifest names its `data` input (gold labels, text, augmentation lineage) and
its `teacher` input (whose training rows make calibration and label issues in-sample)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from kd.audit import calibration, ensemble, gold, lineage, topk
from pipeline.artifact import Artifact
from pipeline.errors import KdpipeError


def _input_dir(art: Artifact, role: str) -> Path | None:
    """An upstream artifact directory recorded in manifest.json (path as run, else by key beside it)."""
    entries = art.manifest.get("inputs", {}).get(role) or []
    if not entries:
        return None
    entry = entries[0]
    path = Path(entry.get("path", ""))
    if (path / "manifest.json").is_file():
        return path
    found = sorted(art.path.parent.parent.glob(f"*/{entry.get('key')}"))
    return found[0] if found else None


def _label_table(art: Artifact):
    if not art.is_complete():
        raise KdpipeError(f"{art.path} is not a complete artifact (no manifest.json); finish its run first")
    if art.manifest.get("type") not in ("label", "test") or not art.num_shards():
        raise KdpipeError(f"{art.path} is a {art.manifest.get('type')!r} artifact; `kdpipe audit` reads the "
                          "output of a `label` stage (e.g. quickstart/label)")
    return art.read_table()


def _probs(table, columns: list[str]) -> dict[str, np.ndarray]:
    out = {}
    for col in columns:
        flat = table.column(col).combine_chunks()
        width = flat.type.list_size
        out[col] = flat.flatten().to_numpy(zero_copy_only=False).astype(np.float64).reshape(-1, width)
    return out


def _gold_indices(values: list[Any], names: list[str]) -> np.ndarray:
    """Gold labels as class indices (-1 = missing or not one of `names`)."""
    from kd.teachers import gold_indices

    return np.array(gold_indices(values, names, unknown=-1), dtype=np.int64)


def audit_label_artifact(label_dir: str | Path, *, data_dir: str | Path | None = None, top: int = 10,
                         seed: int = 0) -> dict[str, Any]:
    art = Artifact(Path(label_dir))
    table = _label_table(art)
    md = art.file_metadata()
    task = md.get("kdpipe.task", "classification")
    report: dict[str, Any] = {"artifact": str(art.path), "task": task, "rows": table.num_rows, "notes": []}
    if task == "seq2seq":
        return _audit_seq2seq(table, md, report)
    if task != "classification":
        report["notes"].append(f"task {task!r}: only classification and seq2seq top-k caches are audited")
        return report

    logit_cols = json.loads(md.get("kdpipe.logit_columns", '["logits"]'))
    teachers = json.loads(md.get("kdpipe.teachers", "[]")) or [c.removeprefix("logits_") for c in logit_cols]
    logits_by_member = _probs(table, logit_cols)
    logits = np.mean(list(logits_by_member.values()), axis=0)  # an ensemble is audited as its mean logits
    names = json.loads(md.get("kdpipe.label_names", "null")) or [str(i) for i in range(logits.shape[1])]
    pred = logits.argmax(axis=1)
    probs = calibration.softmax(logits)
    ids = table.column("id").to_pylist()
    report.update(label_names=names, teachers=teachers,
                  teacher_label_counts={n: int((pred == c).sum()) for c, n in enumerate(names)})
    if len(logit_cols) > 1:
        report["notes"].append(f"{len(logit_cols)} ensemble members: calibration and gold figures use their mean logits")

    data_dir = Path(data_dir) if data_dir is not None else _input_dir(art, "data")
    data = _data_rows(data_dir, ids) if data_dir is not None else None
    if data is None:
        report["notes"].append("no data artifact found: gold, augmentation and text columns are not audited")
        data = {}
    texts = data.get("text") or [None] * len(ids)

    is_original = np.array([a == -1 for a in data["aug_index"]]) if "aug_index" in data else np.ones(len(ids), bool)
    gold_all = _gold_indices(data["label"], names) if "label" in data else np.full(len(ids), -1)
    # Augmented rows inherit their parent's label: not gold evidence about the teacher.
    has_gold = (gold_all >= 0) & is_original
    report["ece"] = report["temperature"] = None
    if has_gold.any():
        g, lg, pg = gold_all[has_gold], logits[has_gold], probs[has_gold]
        report["gold"] = gold.accuracy_by_class(pred[has_gold], g, names)
        report["ece"] = round(calibration.ece(pg, g), 5)
        temp = calibration.temperature_report(lg, g, seed=seed)
        report["temperature"] = temp["temperature"]
        report["calibration"] = {**temp, "n_bins": calibration.N_BINS, "bins": calibration.reliability_bins(pg, g)}
        rows = np.flatnonzero(has_gold)
        issues = rows[gold.label_issues(pg, g)]
        report["label_issues"] = {
            "count": int(len(issues)), "share": round(len(issues) / len(rows), 4),
            "top": [{"id": ids[r], "text": texts[r], "gold": names[gold_all[r]], "teacher": names[pred[r]],
                     "p_gold": round(float(probs[r, gold_all[r]]), 4)} for r in issues[:top]]}
        if report["gold"]["accuracy"] < 0.9 and len(issues):
            report["notes"].append(f"teacher accuracy {report['gold']['accuracy']}: confident learning flags rows where "
                                   "the teacher confidently disagrees with gold, so with a teacher this weak many flags "
                                   "are teacher errors; read them as rows worth a look, not as wrong gold labels")
        overlap = _teacher_overlap(art, {ids[r] for r in rows})
        if overlap:
            report["teacher_training_overlap"] = overlap
            report["notes"].append(f"{overlap} of {len(rows)} gold rows were in the teacher's training data: "
                                   "accuracy, calibration and label issues on them are in-sample (optimistic)")
    else:
        report["notes"].append("no gold labels on the labelled rows: accuracy, calibration and label issues skipped")

    if data and all(c in data for c in lineage.LINEAGE_COLUMNS):
        report["augmentation"] = lineage.augmentation_agreement(ids, pred, data["parent_id"], data["aug_index"], data["ops"])

    if len(logit_cols) > 1:
        member_probs = {t: calibration.softmax(z) for t, z in zip(teachers, logits_by_member.values())}
        agree = ensemble.member_agreement(member_probs)
        js, member_pred = agree.pop("_js"), agree.pop("_preds")
        agree["top_disagreements"] = [
            {"id": ids[r], "text": texts[r], "js_divergence": round(float(js[r]), 5),
             "predictions": {t: names[int(member_pred[t][r])] for t in teachers}}
            for r in np.argsort(-js, kind="stable")[:top]]
        report["ensemble"] = agree
    return report


def _data_rows(data_dir: Path, ids: list[str]) -> dict[str, list[Any]] | None:
    """The data artifact's text, gold and lineage columns, aligned to `ids` (join by id)."""
    data = Artifact(data_dir)
    cols = [c for c in ("id", "text", "label", *lineage.LINEAGE_COLUMNS) if c in (data.columns() or [])]
    if "id" not in cols:
        return None
    table = data.read_table(cols)
    position = {v: i for i, v in enumerate(table.column("id").to_pylist())}
    missing = [i for i in ids if i not in position]
    if missing:
        raise KdpipeError(f"{len(missing)} labelled ids (e.g. {missing[0]!r}) are not in the data artifact {data_dir}; "
                          "give the artifact that was labelled with --data")
    take = [position[i] for i in ids]
    out = {}
    for c in cols[1:]:
        values = table.column(c).to_pylist()
        out[c] = [values[t] for t in take]
    return out


def _teacher_overlap(art: Artifact, gold_ids: set[str]) -> int:
    teacher_dir = _input_dir(art, "teacher")
    if teacher_dir is None:
        return 0
    train_dir = _input_dir(Artifact(teacher_dir), "data")
    if train_dir is None or not Artifact(train_dir).num_shards():
        return 0
    train_ids = set(Artifact(train_dir).read_table(["id"]).column("id").to_pylist())
    return len(gold_ids & train_ids)


def _audit_seq2seq(table, md: dict[str, str], report: dict[str, Any]) -> dict[str, Any]:
    k = int(md.get("kdpipe.topk", "0") or 0)
    cols = [c for c in table.column_names if c.startswith("topk_logprobs")]
    if not k or not cols:
        report["notes"].append("seq2seq labels without a top-k cache: nothing to audit beyond `kdpipe inspect`")
        return report
    mass = np.concatenate([topk.topk_mass(table.column(c)) for c in cols])
    report["topk"] = topk.mass_report(mass, k=k)
    report["_topk_mass"] = mass
    return report
