"""YAML manifest -> typed models. Manifests are inert data: `yaml.safe_load` only, and `${var}`
substitution is plain string replacement (no expressions, no tags)."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from pipeline.errors import ManifestError
from pipeline.stage import Problem

# \Z, not $: `$` also matches before a trailing newline ("x\n" would pass).
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\Z")
_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _check_name(value: str) -> str:
    if not NAME_RE.match(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not a valid name: use letters, digits, '_', '-', '.' "
            "(no '/', no '..', at most 100 characters)"
        )
    return value


def check_ray_address(value: str | None) -> str | None:
    """Ray Client (`ray://`) runs the driver off the cluster; kdpipe's driver plans from and
    finalizes into the workdir, so it must be a cluster process: say so before anything runs."""
    if value and value.strip().lower().startswith("ray://"):
        raise ValueError(
            f"{value!r} is a Ray Client address, which kdpipe does not support: its driver reads and "
            "writes the workdir itself. Run kdpipe on a cluster node with the GCS address (host:6379, or "
            "'auto' on the head), or submit it as a job: ray job submit --address http://<head>:8265 "
            "-- kdpipe run m.yaml")
    return value


class RayConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    address: str | None = Field(None, description="Ray cluster (GCS) address, host:port or auto; "
                                "omitted = embedded local Ray; ray:// client addresses are refused")
    num_cpus: int | None = Field(None, gt=0, description="CPUs for embedded Ray (default: all)")
    placement_timeout: float = Field(600.0, gt=0, description="seconds a stage may wait for Ray to place "
                                     "and start a worker (model loading not included) before the run fails")
    autoscaler: bool = Field(False, description="the cluster adds nodes on demand: a request no current "
                             "node can hold waits up to placement_timeout instead of failing at once")

    _address = field_validator("address")(classmethod(lambda cls, v: check_ray_address(v)))


class StageSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    type: str
    inputs: dict[str, str | list[str]] = Field(default_factory=dict)
    config: dict[str, Any] = Field(default_factory=dict)

    _check = field_validator("name")(classmethod(lambda cls, v: _check_name(v)))

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_shorthand(cls, value: Any) -> Any:
        # `inputs: [read]` is shorthand for `inputs: {data: read}`.
        if isinstance(value, str):
            return {"data": value}
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], str):
            return {"data": value[0]}
        return value

    @field_validator("config", mode="before")
    @classmethod
    def _none_config(cls, value: Any) -> Any:
        return {} if value is None else value


class Manifest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    workdir: str = "data"
    seed: int = 0
    ray: RayConfig = Field(default_factory=RayConfig)
    vars: dict[str, str | int | float | bool] = Field(default_factory=dict)
    stages: list[StageSpec] = Field(min_length=1)

    _check = field_validator("name")(classmethod(lambda cls, v: _check_name(v)))

    # Set by load_manifest: where it came from, for messages.
    source: str = Field("<memory>", exclude=True)


def format_loc(loc: tuple[Any, ...] | list[Any]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out or "<manifest>"


def pydantic_problems(err: ValidationError, prefix: str = "") -> list[Problem]:
    problems = []
    for e in err.errors():
        loc = format_loc(e["loc"])
        loc = f"{prefix}.{loc}" if prefix and loc != "<manifest>" else (prefix or loc)
        msg = e["msg"]
        if e["type"] == "extra_forbidden":
            msg = "unknown key; remove it or check the spelling (`kdpipe schema` lists the keys)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        problems.append(Problem(loc, msg))
    return problems


def _substitute(value: Any, variables: dict[str, Any], loc: str, problems: list[Problem]) -> Any:
    if isinstance(value, str):
        full = _VAR_RE.fullmatch(value)
        if full and full.group(1) in variables:
            return variables[full.group(1)]  # keep the variable's type

        def repl(m: re.Match[str]) -> str:
            if m.group(1) not in variables:
                problems.append(Problem(loc, f"unknown variable ${{{m.group(1)}}}; define it under "
                                        f"`vars:` or pass --var {m.group(1)}=VALUE"))
                return m.group(0)
            return str(variables[m.group(1)])

        return _VAR_RE.sub(repl, value)
    if isinstance(value, dict):
        return {k: _substitute(v, variables, f"{loc}.{k}", problems) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute(v, variables, f"{loc}[{i}]", problems) for i, v in enumerate(value)]
    return value


def parse_var_overrides(pairs: list[str] | None) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        if "=" not in pair:
            raise ManifestError([Problem(f"--var {pair}", "expected NAME=VALUE")])
        k, v = pair.split("=", 1)
        out[k.strip()] = v
    return out


def load_manifest(path: str | Path, *, overrides: dict[str, str] | None = None) -> Manifest:
    path = Path(path)
    if not path.is_file():
        raise ManifestError([Problem(str(path), "manifest file not found")])
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise ManifestError([Problem(str(path), f"not UTF-8 text ({e.reason} at byte {e.start})")])
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ManifestError([Problem(where, f"malformed YAML: {problem}")])
    return parse_manifest(raw, source=str(path), overrides=overrides)


def parse_manifest(raw: Any, *, source: str = "<memory>", overrides: dict[str, str] | None = None) -> Manifest:
    if not isinstance(raw, dict):
        raise ManifestError([Problem(source, "a manifest is a YAML mapping with `name` and `stages`")])
    problems: list[Problem] = []
    variables = dict(raw.get("vars") or {}) if isinstance(raw.get("vars") or {}, dict) else {}
    unknown = set(overrides or {}) - set(variables)
    if unknown:
        problems.extend(Problem(f"--var {k}", f"no variable {k!r} in `vars:` of {source}") for k in sorted(unknown))
    variables.update(overrides or {})
    raw = dict(raw)
    if variables:
        raw["vars"] = variables
    for key in ("stages", "workdir"):
        if key in raw:
            raw[key] = _substitute(raw[key], variables, key, problems)
    try:
        manifest = Manifest.model_validate(raw)
    except ValidationError as e:
        raise ManifestError(problems + pydantic_problems(e))
    if problems:
        raise ManifestError(problems)
    manifest.source = source
    return manifest
