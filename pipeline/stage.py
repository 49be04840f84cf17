"""The stage contract: every stage in `stages/` is a subclass of one of three small classes.

* `SourceStage` reads something outside the store (files, a HF dataset) and returns one table;
  the engine splits it into deterministic shards of `rows_per_shard` rows.
* `MapStage` turns each shard of its `data` input into one output shard (same index). `setup`
  runs once per worker (load a model there); `process` is pure table -> table, so a test can call
  it on a small `pyarrow.Table` without Ray.
* `TaskStage` runs once over its whole inputs and writes files (a checkpoint, a table, metrics)
  into `ctx.out_dir`. `ctx.scratch_dir` survives a crash so long work can resume.

Heavy imports (torch, transformers, spacy) belong inside methods, never at module top level.
"""
from __future__ import annotations

import dataclasses
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.artifact import Artifact
    from pipeline.devices import Numerics


class StageConfig(BaseModel):
    """Base of every stage's typed config. Unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", frozen=True, protected_namespaces=())


def throughput(default: Any, **kwargs: Any) -> Any:
    """A config field that changes speed, never results: left out of the cache key."""
    return Field(default, json_schema_extra={"throughput": True}, **kwargs)


def resolved(default: Any, **kwargs: Any) -> Any:
    """A config field whose *resolved* value enters the key instead of the raw one (device and
    dtype: `auto` and the value it resolves to give the same numbers)."""
    return Field(default, json_schema_extra={"resolved": True}, **kwargs)


def located(default: Any, **kwargs: Any) -> Any:
    """A config field naming a local file or folder whose bytes the stage's `fingerprint()` hashes.
    While the value names an existing path, the key holds that content and not the spelling, so
    a relative or absolute path, another checkout or another node's mount of the same bytes
    reuse the same artifacts. Any other value (a hub id, `pkg:`, a package name) stays in the key."""
    return Field(default, json_schema_extra={"located": True}, **kwargs)


def _marked(config_cls: type[StageConfig], marker: str) -> set[str]:
    return {
        name
        for name, field in config_cls.model_fields.items()
        if isinstance(field.json_schema_extra, dict) and field.json_schema_extra.get(marker)
    }


def key_config(config: StageConfig) -> dict[str, Any]:
    """The config as it enters the cache key: throughput and resolved fields left out, and each
    `located` field that names an existing local path replaced by a placeholder (its content is in
    the fingerprint). Nested configs (e.g. a list of teachers) are treated the same way."""
    dumped = config.model_dump(mode="json", exclude=unkeyed_fields(type(config)))
    return _unlocate(config, dumped)


LOCATED = "<local path: its content is in the fingerprint>"


def _unlocate(value: Any, dumped: Any) -> Any:
    if isinstance(value, StageConfig) and isinstance(dumped, dict):
        located_names = located_fields(type(value))
        for name in list(dumped):
            field_value = getattr(value, name, None)
            if name in located_names:
                dumped[name] = _placeholder(field_value, dumped[name])
            else:
                dumped[name] = _unlocate(field_value, dumped[name])
        return dumped
    if isinstance(value, (list, tuple)) and isinstance(dumped, list):
        return [_unlocate(v, d) for v, d in zip(value, dumped)]
    return dumped


def _placeholder(value: Any, dumped: Any) -> Any:
    if isinstance(value, str):
        return LOCATED if value and Path(value).exists() else dumped
    if isinstance(value, dict):  # name -> path (e.g. read's parallel `files`)
        return {k: _placeholder(v, dumped[k]) for k, v in value.items()}
    return dumped


def located_fields(config_cls: type[StageConfig]) -> set[str]:
    return _marked(config_cls, "located")


def throughput_fields(config_cls: type[StageConfig]) -> set[str]:
    return _marked(config_cls, "throughput")


def unkeyed_fields(config_cls: type[StageConfig]) -> set[str]:
    """Fields left out of the raw config in the key: throughput knobs and resolved fields."""
    return _marked(config_cls, "throughput") | _marked(config_cls, "resolved")


_MEMORY_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2,
                 "mib": 1024**2, "g": 1000**3, "gb": 1000**3, "gib": 1024**3}


def _memory_bytes(value: Any) -> Any:
    """`memory: 4GiB` (or 4GB, 512MiB, bytes as a number) -> bytes, as Ray's `memory` wants."""
    if not isinstance(value, str):
        return value
    match = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([A-Za-z]*)\s*", value)
    unit = match.group(2).lower() if match else None
    if unit not in _MEMORY_UNITS:
        raise ValueError(f"{value!r} is not an amount of memory; write e.g. 4GiB, 512MiB or a number of bytes")
    return int(float(match.group(1)) * _MEMORY_UNITS[unit])


class ResourceConfig(StageConfig):
    """What one worker of a stage (an actor of a map stage, the task of a source/task stage) asks
    Ray for. Every stage's config derives from this. Placement decides speed, not results; the
    device a GPU request implies enters the key through `pipeline.devices` (numerics)."""

    num_cpus: float | None = throughput(None, gt=0, description="CPUs per worker (default: the stage's own)")
    num_gpus: float = throughput(0, ge=0, description="GPUs per worker; for model stages > 0 means CUDA (the resolved device is in the key)")
    memory: int | None = throughput(None, gt=0, description="memory reserved per worker: bytes, or 4GiB, 512MiB")

    _memory = field_validator("memory", mode="before")(classmethod(lambda cls, v: _memory_bytes(v)))


@dataclasses.dataclass(frozen=True)
class InputRole:
    """One named input of a stage, as written under `inputs:` in the manifest."""

    required: bool = True
    many: bool = False  # accepts a list of upstream stages (e.g. a teacher ensemble)
    kind: Literal["shards", "files", "any"] = "shards"
    doc: str = ""


@dataclasses.dataclass(frozen=True)
class Problem:
    """A validation finding: where in the manifest, and what to do about it."""

    loc: str
    message: str

    def __str__(self) -> str:
        return f"{self.loc}: {self.message}"


@dataclasses.dataclass
class Facts:
    """Plan-time facts about an artifact; `origins` maps each fact to the manifest place
    ('stages[2].config.mask_token') that set it, so errors can point there."""

    values: dict[str, Any] = dataclasses.field(default_factory=dict)
    origins: dict[str, str] = dataclasses.field(default_factory=dict)

    def get(self, key: str, default: Any = None) -> Any:
        return self.values.get(key, default)


@dataclasses.dataclass
class ReportSection:
    """What one finished artifact adds to `kdpipe report`: rows of the model table, one per model,
    with the keys model, role ('teacher' or 'student'), type, params, size_bytes, metric, value,
    sent/s, speed-up, labels (a missing key is an empty cell); and figures as (title, png path)."""

    rows: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    figures: list[tuple[str, Path]] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class StageContext:
    """What a running stage may touch. Built by the engine, or by `pipeline.testing` in tests."""

    stage_name: str
    out_dir: Path
    scratch_dir: Path
    inputs: dict[str, list["Artifact"]]
    seed: int | None = 0  # None for stages whose output must not depend on the manifest seed
    num_cpus: int = 1
    workdir: Path | str | None = None
    # Where this stage's artifact lives (a path or an s3:// URI); default: out_dir's parent.
    artifact_loc: str | None = None
    # name -> where the engine stored each of the stage's `external_models()` in the workdir;
    # None outside the engine (a test calling setup directly).
    models: dict[str, str] | None = None

    def model_dir(self, name: str) -> Path | None:
        """Local folder of the model the stage declared as `name` in external_models(): the copy
        stored in the workdir (downloaded once per node from an object store), never the
        driver's path. None outside the engine (tests calling setup load models in place)."""
        if self.models is None:
            return None
        from pipeline.model_store import model_dir

        return model_dir(self.models[name])

    def output(self) -> "Artifact":
        """This stage's own artifact (map stages read their finished shards in finalize/summarize)."""
        from pipeline.artifact import Artifact

        return Artifact(self.artifact_loc or self.out_dir.parent)

    def input(self, role: str) -> "Artifact":
        arts = self.inputs.get(role) or []
        if len(arts) != 1:
            raise KeyError(f"stage {self.stage_name!r} expected exactly one {role!r} input")
        return arts[0]

    def optional_input(self, role: str) -> "Artifact | None":
        arts = self.inputs.get(role) or []
        return arts[0] if arts else None


class Stage:
    """Common part of the three stage kinds. Subclasses set the class attributes."""

    type: ClassVar[str]
    kind: ClassVar[Literal["source", "map", "task"]]
    Config: ClassVar[type[StageConfig]]
    # Whether the manifest's global `seed` can change this stage's output. Only then does it
    # enter the cache key and reach the stage as `ctx.seed` (None otherwise). The code itself
    # needs no version: its digest enters the key (pipeline/code_identity.py).
    seeded: ClassVar[bool] = False
    inputs: ClassVar[dict[str, InputRole]] = {}
    # Ray resources per worker; model stages raise this.
    default_num_cpus: ClassVar[float] = 1
    # The folder under files/ where a finished artifact keeps a model `predict` can load
    # (a student directory or an HF checkpoint); None for stages that produce no model.
    model_folder: ClassVar[str | None] = None
    # `kdpipe report` merges sections in this order; a later row replaces an earlier one for the
    # same model (evaluate's measured rows replace the rows train reports for its own student).
    report_order: ClassVar[int] = 0

    def __init__(self, *, config: StageConfig, input_refs: dict[str, list[str]] | None = None):
        self.config = config
        # role -> the manifest's names of the upstream stages (`name` or `@RUN/STAGE`), for
        # stages whose output names its inputs (label's teacher columns); None outside a graph.
        self.input_refs = input_refs

    # --- planning (driver side, before Ray; must be cheap and side-effect free) -----------
    def validate(self, *, input_columns: dict[str, list[list[str] | None]]) -> list[Problem]:
        """Config checks that need the outside world (files, installed models) or the columns
        of upstream artifacts (`None` when an upstream stage cannot tell before running).
        Locations are relative to the stage: 'config.text_column', 'inputs.data'."""
        return []

    def output_columns(self, *, input_columns: dict[str, list[list[str] | None]]) -> list[str] | None:
        """Columns of this stage's shards, for downstream validation; None = unknown/no shards."""
        return None

    def output_facts(self, *, input_facts: dict[str, list["Facts"]]) -> "Facts":
        """Facts about this stage's output known before it runs (label names, mask token), for
        downstream validation. Map stages pass their `data` input's facts through by default."""
        if self.kind == "map" and input_facts.get("data"):
            return Facts(dict(input_facts["data"][0].values), dict(input_facts["data"][0].origins))
        return Facts()

    def validate_facts(self, *, input_facts: dict[str, list["Facts"]]) -> list[Problem]:
        """Checks that need upstream facts (e.g. the teacher's label count vs the data's label
        names). A Problem whose loc starts with 'stages[' points at the stage that must change."""
        return []

    def uses_seed(self) -> bool:
        """True when the manifest seed changes this stage's output (override when a config
        field decides it; its docstring's first line then appears in the key table)."""
        return self.seeded

    def fingerprint(self) -> dict[str, str]:
        """Content hashes of everything outside the store the output depends on
        (source files, model weights), keyed by a readable name for `plan` to report."""
        return {}

    def external_models(self) -> dict[str, Path]:
        """Model folders from outside the store that this stage's workers load (a teacher given
        by path, `pkg:` folder or pinned hub id): name -> the folder on the driver's machine.
        Before the stage runs, the engine stores each once in the workdir
        (pipeline/model_store.py); workers load it with `ctx.model_dir(name, ...)`."""
        return {}

    @classmethod
    def artifact_facts(cls, metadata: dict[str, str]) -> Facts:
        """Facts of a finished artifact of this type that another manifest reads (`@RUN/STAGE`),
        from its shards' Parquet key-value metadata (`kdpipe.` prefix removed): by default every
        value, JSON lists and objects decoded (label names), other values as written."""
        import json

        values: dict[str, Any] = {}
        for key, raw in metadata.items():
            try:
                decoded = json.loads(raw)
            except ValueError:
                decoded = raw
            values[key] = decoded if isinstance(decoded, (list, dict)) else raw
        return Facts(values)

    @classmethod
    def report_section(cls, *, name: str, files_dir: Path, manifest: dict[str, Any]) -> ReportSection | None:
        """This stage's part of `kdpipe report` for its finished artifact `name` (the run's alias),
        whose files are in `files_dir` and whose manifest.json is `manifest`; None = nothing to show."""
        return None

    def resources(self) -> dict[str, float]:
        """The Ray request of one worker, from the config alone (never from the driver's hardware)."""
        cfg = self.config
        out = {"num_cpus": float(getattr(cfg, "num_cpus", None) or self.default_num_cpus)}
        if getattr(cfg, "num_gpus", 0):
            out["num_gpus"] = float(cfg.num_gpus)
        if getattr(cfg, "memory", None):
            out["memory"] = float(cfg.memory)
        return out

    def numerics(self) -> "Numerics | None":
        """Resolved (device kind, dtype) for stages whose numbers depend on them; None otherwise.
        Known at plan time from the config and the placement it asks for (pipeline.devices)."""
        from pipeline.devices import NumericsConfig, plan_numerics

        if isinstance(self.config, NumericsConfig):
            return plan_numerics(self.config)
        return None


@dataclasses.dataclass(frozen=True)
class RowIndex:
    """What the driver learns of a source before several tasks read it in parts: its row count,
    `starts[k]` = where shard k (row k * rows_per_shard on) begins (for a text file a byte offset,
    line number and a digest of the shard's lines; empty where the stage finds rows itself, as
    Parquet does from row-group metadata), and the fingerprint of the bytes it looked at (None if
    it read none), which the engine compares with the plan's so a source that changed since
    `plan` is not written under the old key."""

    rows: int
    starts: tuple[Any, ...] = ()
    fingerprint: dict[str, str] | None = None


class SourceStage(Stage):
    kind = "source"

    def read(self, ctx: StageContext) -> "pa.Table":
        raise NotImplementedError

    def rows_per_shard(self) -> int:
        return int(getattr(self.config, "rows_per_shard", 10_000))

    # A large source may be read by several tasks side by side. Each reads the rows of a run of
    # whole shards and writes them: the same shards, ids and order as one task reading it all.
    def read_tasks(self) -> int:
        """How many tasks read the source (1: one task calls `read`)."""
        return 1

    def index_rows(self, *, rows_per_shard: int) -> "RowIndex":
        """On the driver, before the tasks start (when read_tasks() > 1): the rows `read` would
        return, and where each shard's first row lies, found without parsing the rows."""
        raise NotImplementedError

    def read_rows(self, ctx: StageContext, *, start: int, stop: int, at: Any = None) -> "pa.Table":
        """Rows [start, stop) of what `read` returns, same ids (when read_tasks() > 1); `at` is
        the index's `starts` entries for the shards these rows fill (None: find the first)."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        return {}


class MapStage(Stage):
    kind = "map"

    def setup(self, ctx: StageContext) -> None:
        """Load models and side inputs once per worker."""

    def process(self, table: "pa.Table", ctx: StageContext, *, shard_index: int) -> "pa.Table":
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        """Extra Parquet key-value metadata (e.g. label names), after setup."""
        return {}

    def finalize(self, shard_stats: list[dict[str, Any]], ctx: StageContext) -> list[dict[str, Any]]:
        """Optional post-pass on the driver once every shard is done (e.g. whole-artifact dedup).
        It may rewrite shards with `pipeline.artifact.write_shard` and returns their stats. Runs
        again on resume, so it must be idempotent."""
        return shard_stats

    def summarize(self, shard_stats: list[dict[str, Any]], ctx: StageContext) -> dict[str, Any]:
        """Extra fields for manifest.json once every shard is done (e.g. bytes per token)."""
        return {}


class TaskStage(Stage):
    kind = "task"

    def run(self, ctx: StageContext) -> dict[str, Any]:
        """Write outputs under ctx.out_dir; return a JSON-able summary stored in manifest.json."""
        raise NotImplementedError
