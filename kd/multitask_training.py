"""The training loop of `train_multitask` (kept apart from the stage so it can move onto the
shared training core): task tables, single-task batches drawn by `TaskSampler`, MT-DNN soft
targets mixed with gold (fixed or BAM!-annealed gold weight), per-task loss weights, and the
optional adversarial imitation term on one task."""
from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Callable

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


def _seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest(), "little") >> 1


def train_multitask(cfg, tasks: list[TaskData], *, seed: int, device, move: Callable) -> dict[str, Any]:
    import torch

    from kd.adversarial import AdversarialKD, FeatureDiscriminator, discriminator_accuracy
    from kd.multitask import (AnnealWindow, TaskSampler, ensemble_soft_targets, gold_weight, interleave,
                              mtdnn_kd_loss)
    from kd.multitask_student import MultiTaskStudent
    from kd.students.common import WordVocab

    torch.manual_seed(_seed("multitask-init", seed))
    vocab = WordVocab.build((t for task in tasks for t in task.texts + (task.pairs or [])),
                            max_size=cfg.vocab_size)
    model = MultiTaskStudent(vocab_size=len(vocab), pad_id=vocab.pad_id,
                             heads={t.spec.name: (len(t.label_names), t.pairs is not None) for t in tasks},
                             **cfg.encoder.model_dump()).to(device)
    by_name = {t.spec.name: t for t in tasks}
    encoded = {t.spec.name: _encode(vocab, t.texts, t.pairs, cfg.max_length) for t in tasks}
    soft = {t.spec.name: (ensemble_soft_targets([torch.from_numpy(x) for x in t.teachers], cfg.temperature)
                          if t.teachers else None) for t in tasks}
    batches_per_epoch = {n: -(-len(t.texts) // cfg.batch_size) for n, t in by_name.items()}
    total = max(1, round(cfg.epochs * sum(batches_per_epoch.values())))
    sampler = TaskSampler({n: len(t.texts) for n, t in by_name.items()}, alpha=cfg.sampling_alpha, seed=seed)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)

    def epochs(name: str):
        def one_epoch(epoch: int):
            order = np.random.default_rng(_seed(seed, name, epoch)).permutation(len(by_name[name].texts))
            for start in range(0, len(order), cfg.batch_size):
                yield order[start:start + cfg.batch_size].tolist()
        return one_epoch

    adv, adv_curve = None, []
    if cfg.adversarial is not None:
        if soft[cfg.adversarial.task] is None:
            raise ValueError(f"adversarial.task {cfg.adversarial.task!r} has no teacher labels to imitate")
        disc = FeatureDiscriminator(feature_dim=len(by_name[cfg.adversarial.task].label_names),
                                    hidden_dim=cfg.adversarial.hidden_dim).to(device)
        adv = AdversarialKD(discriminator=disc, disc_optimizer=torch.optim.Adam(disc.parameters(), lr=cfg.adversarial.lr),
                            student_optimizer=optimizer, weight=cfg.adversarial.weight)

    steps_per_task = {n: 0 for n in by_name}
    curve: list[list[float]] = []
    model.train()
    for step, name, idx in interleave(sampler, {n: epochs(n) for n in by_name}, start=0, stop=total):
        task, spec = by_name[name], by_name[name].spec
        steps_per_task[name] += 1
        batch = move(model.collate([encoded[name][i] for i in idx]), device)
        gold = torch.tensor([task.gold[i] for i in idx], device=device)
        target = soft[name][idx].to(device) if soft[name] is not None else None
        progress = step / total
        weight = (gold_weight(progress, AnnealWindow(spec.anneal_start, spec.anneal_end)) if spec.anneal
                  else spec.gold_weight)

        def loss_of(logits):
            if target is None:  # gold only; a batch without gold labels contributes nothing
                if not (gold >= 0).any():
                    return logits.sum() * 0
                return spec.weight * torch.nn.functional.cross_entropy(logits, gold, ignore_index=-1)
            return spec.weight * mtdnn_kd_loss(logits, target, gold, gold_weight=weight, temperature=cfg.temperature)

        if adv is not None and name == cfg.adversarial.task:
            def student_forward():
                logits = model(name, batch)
                return torch.softmax(logits / cfg.temperature, -1), loss_of(logits)
            with torch.no_grad():
                model.eval()
                before = discriminator_accuracy(adv.disc, target, torch.softmax(model(name, batch) / cfg.temperature, -1))
                model.train()
            out = adv.step(teacher_features=target, student_forward=student_forward)
            adv_curve.append([step, round(before, 4), round(out["disc_loss"], 5)])
            loss_value = out.get("kd", 0.0)
        else:
            loss = loss_of(model(name, batch))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 5.0)
            optimizer.step()
            loss_value = float(loss.detach())
        if step % 10 == 0:
            curve.append([step, name, round(float(loss_value), 5)])

    model.eval()
    results = {}
    for name, task in by_name.items():
        entry: dict[str, Any] = {"rows": len(task.texts), "steps": steps_per_task[name],
                                 "teachers": len(task.teachers), "labels": list(task.spec.labels),
                                 "sampling_probability": round(sampler.probabilities[name], 4)}
        if task.dev is not None:
            pred = _predict(model, name, _encode(vocab, task.dev["texts"], task.dev["pairs"], cfg.max_length),
                            cfg.eval_batch_size, device, move)
            scored = [(p, g) for p, g in zip(pred, task.dev["gold"]) if g >= 0]
            entry["dev_accuracy"] = round(sum(p == g for p, g in scored) / max(1, len(scored)), 4)
            entry["dev_rows"] = len(scored)
        results[name] = entry
    metrics: dict[str, Any] = {"tasks": results, "steps": total, "parameters": sum(p.numel() for p in model.parameters()),
                               "vocab_size": len(vocab), "loss_curve": curve}
    if adv_curve:
        accs = [a for _, a, _ in adv_curve]
        k = max(1, len(accs) // 10)
        metrics["discriminator_curve"] = adv_curve
        metrics["discriminator_accuracy_first"] = round(float(np.mean(accs[:k])), 4)
        metrics["discriminator_accuracy_last"] = round(float(np.mean(accs[-k:])), 4)

    def save(directory: Path) -> None:
        from safetensors.torch import save_model

        directory.mkdir(parents=True, exist_ok=True)
        save_model(model, str(directory / "model.safetensors"))
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
