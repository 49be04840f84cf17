"""What `train_multitask` trains, on the one training loop (`kd.training.fit`): task tables,
single-task batches drawn by `TaskSampler`, MT-DNN soft targets mixed with gold (fixed or
BAM!-annealed gold weight), per-task loss weights, and the optional adversarial term on one task."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np


@dataclasses.dataclass
class TaskData:
    spec: Any                       # the stage's TaskSpec
    label_names: list[str]
    texts: list[str]
    pairs: list[str] | None
    gold: list[int]                 # -1 = no gold label
    teachers: list[np.ndarray]      # one (rows, classes) array per teacher, rows in `texts` order
    dev: dict[str, Any] | None      # {"texts", "pairs", "gold"}


def _names(art) -> list[str] | None:
    md = art.file_metadata().get("kdpipe.label_names")
    return [str(n) for n in json.loads(md)] if md else None


def _rows(art, spec, names: list[str] | None) -> dict[str, Any]:
    cols = ["id", spec.text_column, spec.label_column] + ([spec.pair_column] if spec.pair_column else [])
    table = art.read_table(cols)
    rows = sorted(table.to_pylist(), key=lambda r: r["id"])
    index = {n: i for i, n in enumerate(names or [])}
    gold = []
    for r in rows:
        v = r[spec.label_column]
        gold.append(-1 if v is None else int(v) if isinstance(v, int) else index.get(str(v), -1))
    return {"ids": [r["id"] for r in rows], "texts": [r[spec.text_column] or "" for r in rows],
            "pairs": [r[spec.pair_column] or "" for r in rows] if spec.pair_column else None, "gold": gold}


def load_task(spec, *, data, labels: list, dev) -> TaskData:
    names = _names(data)
    rows = _rows(data, spec, names)
    if names is None:
        names = [str(i) for i in range(max(rows["gold"]) + 1)]
    teachers = []
    for art in labels:
        theirs = _names(art)
        if theirs is not None and theirs != names:
            raise ValueError(f"task {spec.name!r}: labels {art.key} are in label order {theirs}, the data's is "
                             f"{names}; label this task's data")
        table = art.read_table(["id", "logits"])
        by_id = dict(zip(table["id"].to_pylist(), table["logits"].to_pylist()))
        missing = [i for i in rows["ids"] if i not in by_id]
        if missing:
            raise ValueError(f"task {spec.name!r}: {len(missing)} of {len(rows['ids'])} rows have no logits in "
                             f"labels {art.key} (e.g. id {missing[0]!r}); label the task's data artifact")
        teachers.append(np.asarray([by_id[i] for i in rows["ids"]], dtype=np.float32))
    dev_rows = _rows(dev, spec, _names(dev) or names) if dev is not None else None
    return TaskData(spec, names, rows["texts"], rows["pairs"], rows["gold"], teachers, dev_rows)


def train_multitask(cfg, tasks: list[TaskData], *, seed: int, device, scratch: Path, identity: Any) -> dict[str, Any]:
    """Train on the one training loop (`kd.training.fit`: seeded dropout, checkpoints every
    epoch, resume to the same weights). An "epoch" is the sum of the tasks' batches per epoch;
    the task of each update comes from the sampler, so a resumed run replays the same tasks."""
    import torch

    from kd import training
    from kd.adversarial import FeatureDiscriminator, discriminator_accuracy, discriminator_loss, reverse_gradient
    from kd.multitask import AnnealWindow, TaskSampler, ensemble_soft_targets, gold_weight, interleave, mtdnn_kd_loss
    from kd.multitask_student import MultiTaskStudent
    from kd.students.common import WordVocab
    from pipeline.devices import move

    torch.manual_seed(training.derive_seed(seed, "multitask-init"))
    vocab = WordVocab.build((t for task in tasks for t in task.texts + (task.pairs or [])),
                            max_size=cfg.vocab_size)
    student = MultiTaskStudent(vocab_size=len(vocab), pad_id=vocab.pad_id,
                               heads={t.spec.name: (len(t.label_names), t.pairs is not None) for t in tasks},
                               **cfg.encoder.model_dump())
    by_name = {t.spec.name: t for t in tasks}
    adv_task = cfg.adversarial.task if cfg.adversarial else None
    if adv_task and not by_name[adv_task].teachers:
        raise ValueError(f"adversarial.task {adv_task!r} has no teacher labels to imitate")
    # The discriminator lives beside the student, so the loop checkpoints and resumes both.
    model = torch.nn.ModuleDict({"student": student})
    if adv_task:
        model["discriminator"] = FeatureDiscriminator(feature_dim=len(by_name[adv_task].label_names),
                                                      hidden_dim=cfg.adversarial.hidden_dim)
    model.to(device)
    groups = [{"params": list(student.parameters()), "lr": cfg.lr}]
    if adv_task:
        groups.append({"params": list(model["discriminator"].parameters()), "lr": cfg.adversarial.lr})
    optimizer = torch.optim.Adam(groups)

    encoded = {t.spec.name: _encode(vocab, t.texts, t.pairs, cfg.max_length) for t in tasks}
    soft = {t.spec.name: (ensemble_soft_targets([torch.from_numpy(x) for x in t.teachers], cfg.temperature)
                          if t.teachers else None) for t in tasks}
    per_epoch = {n: -(-len(t.texts) // cfg.batch_size) for n, t in by_name.items()}
    steps_per_epoch = sum(per_epoch.values())
    total = max(1, round(cfg.epochs * steps_per_epoch))
    sampler = TaskSampler({n: len(t.texts) for n, t in by_name.items()}, alpha=cfg.sampling_alpha, seed=seed)

    def task_epochs(name: str):
        def one_epoch(epoch: int):
            order = np.random.default_rng(training.derive_seed(seed, "batches", name, epoch)).permutation(
                len(by_name[name].texts))
            for start in range(0, len(order), cfg.batch_size):
                yield order[start:start + cfg.batch_size].tolist()
        return one_epoch

    streams = {n: task_epochs(n) for n in by_name}

    def batches(epoch: int, skip: int):
        start = epoch * steps_per_epoch + skip
        for _, name, idx in interleave(sampler, streams, start=start, stop=min(total, (epoch + 1) * steps_per_epoch)):
            yield name, idx

    adv_curve: list[list[float]] = []

    def loss_fn(item, step: int):
        name, idx = item
        task, spec = by_name[name], by_name[name].spec
        batch = move(student.collate([encoded[name][i] for i in idx]), device)
        gold = torch.tensor([task.gold[i] for i in idx], device=device)
        logits = student(name, batch).float()
        if soft[name] is None:
            if not (gold >= 0).any():  # a batch without gold labels contributes nothing
                return logits.sum() * 0
            return spec.weight * torch.nn.functional.cross_entropy(logits, gold, ignore_index=-1)
        target = soft[name][idx].to(device)
        weight = (gold_weight(step / total, AnnealWindow(spec.anneal_start, spec.anneal_end)) if spec.anneal
                  else spec.gold_weight)
        loss = spec.weight * mtdnn_kd_loss(logits, target, gold, gold_weight=weight, temperature=cfg.temperature)
        if name != adv_task:
            return loss
        # One backward pass (Ganin & Lempitsky): the discriminator learns to tell the teacher's
        # distribution from the student's; through the reversed gradient the student learns to
        # make them indistinguishable.
        disc = model["discriminator"]
        features = torch.softmax(logits / cfg.temperature, -1)
        accuracy = discriminator_accuracy(disc, target, features.detach())
        adv_curve.append([step, round(accuracy, 4)])
        adversarial = discriminator_loss(disc, target, reverse_gradient(features, 1.0))
        return loss + cfg.adversarial.weight * adversarial, {"discriminator_accuracy": accuracy}

    result = training.fit(model, optimizer=optimizer, loss_fn=loss_fn, batches=batches,
                          steps_per_epoch=steps_per_epoch, total_steps=total, scratch=scratch, seed=seed,
                          device=device, clip_grad_norm=5.0, identity=identity, desc="train_multitask")

    schedule = sampler.schedule(0, total)
    results = {}
    for name, task in by_name.items():
        entry: dict[str, Any] = {"rows": len(task.texts), "steps": schedule.count(name),
                                 "teachers": len(task.teachers), "labels": list(task.spec.labels),
                                 "sampling_probability": round(sampler.probabilities[name], 4)}
        if task.dev is not None:
            pred = _predict(student, name, _encode(vocab, task.dev["texts"], task.dev["pairs"], cfg.max_length),
                            cfg.eval_batch_size, device, move)
            scored = [(p, g) for p, g in zip(pred, task.dev["gold"]) if g >= 0]
            entry["dev_accuracy"] = round(sum(p == g for p, g in scored) / max(1, len(scored)), 4)
            entry["dev_rows"] = len(scored)
        results[name] = entry
    metrics: dict[str, Any] = {"tasks": results, "steps": total, "vocab_size": len(vocab),
                               "parameters": sum(p.numel() for p in student.parameters()),
                               "loss_curve": result.curve, "history": result.history,
                               "resumed_from": result.resumed_from}
    if adv_task:
        # Per-epoch means come from the loop's history (they survive a resume); the per-step
        # curve covers the updates of this process.
        accs = [a for _, a in adv_curve]
        k = max(1, len(accs) // 10)
        metrics["discriminator_curve"] = adv_curve
        if accs:
            metrics["discriminator_accuracy_first"] = round(float(np.mean(accs[:k])), 4)
            metrics["discriminator_accuracy_last"] = round(float(np.mean(accs[-k:])), 4)

    def save(directory: Path) -> None:
        from safetensors.torch import save_model

        directory.mkdir(parents=True, exist_ok=True)
        save_model(student, str(directory / "model.safetensors"))
        meta = {"type": "multitask", "tokenizer": vocab.save(directory),
                "tasks": {n: {"label_names": t.label_names, "pair": t.pairs is not None} for n, t in by_name.items()},
                "encoder": cfg.encoder.model_dump(), "max_length": cfg.max_length}
        (directory / "student.json").write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")

    metrics["save"] = save
    return metrics


def _encode(vocab, texts: list[str], pairs: list[str] | None, max_length: int) -> list[dict[str, Any]]:
    return [{"ids": vocab.encode(t)[:max_length],
             "ids2": vocab.encode(pairs[i])[:max_length] if pairs is not None else None}
            for i, t in enumerate(texts)]


def _predict(model, task: str, rows: list[dict[str, Any]], batch_size: int, device, move) -> list[int]:
    import torch

    out: list[int] = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            batch = move(model.collate(rows[start:start + batch_size]), device)
            out.extend(model(task, batch).argmax(-1).tolist())
    return out
