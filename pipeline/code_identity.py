"""What code a stage type runs, as a digest nobody has to remember to bump.

A stage's code identity is the set of project modules it can execute: its own module, every
project module it imports (absolute, relative, inside functions) and every module named by a
registry string ("kd.students.bilstm", "stages.read:ReadStage"), transitively, with the
`__init__` of each package on the way. Each module is parsed and its AST dumped without
docstrings, so comments, docstrings and formatting do not count; a changed line of code does.

Beside the code, the versions of the third-party libraries that change numbers (a new torch
or spaCy release can change every logit) are recorded for the stage types whose modules
import them, plus Python's major.minor.

Deliberate "same output, new code" changes (a pure refactor) can keep old artifacts through
`pipeline/code_aliases.json`, written by `kdpipe code-digest pin` and reviewed like code.
"""
from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import json
import re
import sys
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
ALIASES_FILE = Path(__file__).resolve().parent / "code_aliases.json"
DIGEST_LENGTH = 16

# import name -> distributions whose versions change what that import computes. Libraries that
# only move bytes (pyarrow, pydantic, yaml) are left out: their versions do not change numbers,
# and the artifact checksums catch a format change anyway.
NUMERIC_LIBRARIES: dict[str, tuple[str, ...]] = {
    "torch": ("torch",),
    "transformers": ("transformers", "tokenizers", "torch"),
    "tokenizers": ("tokenizers",),
    "sentence_transformers": ("sentence-transformers", "transformers", "tokenizers", "torch"),
    "numpy": ("numpy",),
    "scipy": ("scipy",),
    "sklearn": ("scikit-learn",),
    "sentencepiece": ("sentencepiece",),
    "spacy": ("spacy", "thinc"),
    "thinc": ("thinc",),
    "sacrebleu": ("sacrebleu",),
    "torchmetrics": ("torchmetrics",),
    "cleanlab": ("cleanlab",),
    "datasets": ("datasets",),
}

_MODULE_STRING = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)+(:[A-Za-z_][A-Za-z0-9_]*)?$")


def project_packages(root: Path | None = None) -> frozenset[str]:
    """Top-level packages of this project (folders with an `__init__.py` beside `pipeline/`)."""
    root = root or PROJECT_ROOT
    return frozenset(p.parent.name for p in root.glob("*/__init__.py"))


def module_file(name: str, root: Path | None = None) -> Path | None:
    """The source file of project module `name`, or None if it is not one."""
    root = root or PROJECT_ROOT
    parts = name.split(".")
    if parts[0] not in project_packages(root):
        return None
    base = root.joinpath(*parts)
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def _strip_docstring(node: ast.AST) -> None:
    if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
        body = node.body
        if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                and isinstance(body[0].value.value, str):
            node.body = body[1:] or [ast.Pass()]


def _strip_docstrings(tree: ast.AST) -> ast.AST:
    for node in ast.walk(tree):
        _strip_docstring(node)
    return tree


def _dump(tree: ast.AST) -> str:
    return ast.dump(tree, annotate_fields=True, include_attributes=False)


def normalized_source(source: str) -> str:
    """The module's AST without docstrings: comments, docstrings and layout do not count."""
    return _dump(_strip_docstrings(ast.parse(source)))


def _package_of(name: str, is_package: bool) -> str:
    return name if is_package else name.rpartition(".")[0]


def _referenced_modules(tree: ast.AST, name: str, is_package: bool) -> tuple[set[str], set[str]]:
    """(candidate module names, third-party top-level imports) referenced anywhere in `tree`;
    strips docstrings on the way (one walk: this runs for every module of every plan)."""
    candidates: set[str] = set()
    external: set[str] = set()
    for node in ast.walk(tree):
        _strip_docstring(node)
        if isinstance(node, ast.Import):
            for alias in node.names:
                candidates.add(alias.name)
                external.add(alias.name.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = _package_of(name, is_package)
                for _ in range(node.level - 1):
                    base = base.rpartition(".")[0]
                target = f"{base}.{node.module}" if node.module else base
            else:
                target = node.module or ""
                external.add(target.split(".")[0])
            candidates.add(target)
            candidates.update(f"{target}.{alias.name}" for alias in node.names)  # `from pkg import mod`
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and _MODULE_STRING.match(node.value):
            candidates.add(node.value.partition(":")[0])  # registry strings, importlib.import_module("...")
    return candidates, external


def _with_parents(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[: i + 1]) for i in range(len(parts))]


@functools.lru_cache(maxsize=None)
def _module_info(source: bytes, name: str, is_package: bool) -> tuple[str, frozenset[str], frozenset[str]]:
    """(digest of the normalized source, referenced module names, third-party imports) of one
    module; cached by its bytes, so planning a long manifest parses each file once."""
    tree = ast.parse(source.decode("utf-8"))
    candidates, external = _referenced_modules(tree, name, is_package)
    digest = hashlib.sha256(_dump(tree).encode()).hexdigest()
    return digest, frozenset(candidates), frozenset(external)


def closure(module: str, root: Path | None = None) -> tuple[dict[str, str], set[str]]:
    """Every project module `module` can run, transitively: ({relative path: digest}, third-party
    top-level names imported along the way)."""
    root = root or PROJECT_ROOT
    modules: dict[str, str] = {}
    external: set[str] = set()
    packages = project_packages(root)
    pending = _with_parents(module)
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        path = module_file(name, root)
        if path is None:
            continue
        digest, candidates, imported = _module_info(path.read_bytes(), name, path.name == "__init__.py")
        modules[path.relative_to(root).as_posix()] = digest
        external |= {e for e in imported if e and e not in packages}
        for candidate in candidates:
            if candidate.split(".")[0] in packages:
                pending.extend(p for p in _with_parents(candidate) if p not in seen)
    return dict(sorted(modules.items())), external


def combined_digest(modules: dict[str, str]) -> str:
    h = hashlib.sha256()
    for rel, digest in sorted(modules.items()):
        h.update(f"{rel}\0{digest}\n".encode())
    return h.hexdigest()[:DIGEST_LENGTH]


def library_version(distribution: str) -> str:
    """The installed version of a distribution (tests monkeypatch this)."""
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def numeric_libraries(imported: set[str]) -> list[str]:
    """Distributions whose versions can change the numbers of code importing `imported`."""
    out: set[str] = set()
    for name in imported:
        out.update(NUMERIC_LIBRARIES.get(name, ()))
    return sorted(out)


def python_version() -> str:
    return f"{sys.version_info.major}.{sys.version_info.minor}"


def load_aliases(path: Path | None = None) -> dict[str, dict[str, dict[str, str]]]:
    """{stage type: {new digest: {"as": old digest, "reason": why}}}."""
    path = path or ALIASES_FILE
    if not path.is_file():
        return {}
    return json.loads(path.read_text(encoding="utf-8"))


def stage_module(type_key: str) -> str:
    from pipeline.registry import STAGES

    return STAGES[type_key].partition(":")[0]


class CodeIdentity:
    """The code and library identity of one stage type, as it enters the cache key."""

    def __init__(self, type_key: str, *, root: Path | None = None, aliases_file: Path | None = None):
        self.type = type_key
        self.modules, imported = closure(stage_module(type_key), root)
        self.own_digest = combined_digest(self.modules)
        alias = load_aliases(aliases_file).get(type_key, {}).get(self.own_digest)
        self.alias_reason = alias["reason"] if alias else None
        self.digest = alias["as"] if alias else self.own_digest
        self.library_names = numeric_libraries(imported)

    def libraries(self) -> dict[str, str]:
        return {"python": python_version(), **{name: library_version(name) for name in self.library_names}}


def code_identity(type_key: str) -> CodeIdentity:
    return CodeIdentity(type_key)


def pin_alias(type_key: str, *, to_digest: str, reason: str, path: Path | None = None) -> str:
    """Record that the current code of `type_key` produces what `to_digest` produced; returns
    the current digest."""
    path = path or ALIASES_FILE
    current = CodeIdentity(type_key).own_digest
    aliases = load_aliases(path)
    aliases.setdefault(type_key, {})[current] = {"as": to_digest, "reason": reason}
    path.write_text(json.dumps(aliases, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return current


def describe_change(old_modules: dict[str, str], new_modules: dict[str, str]) -> list[str]:
    changed = [m for m in sorted(set(old_modules) | set(new_modules)) if old_modules.get(m) != new_modules.get(m)]
    return [f"{m}{'' if m in old_modules and m in new_modules else (' (new)' if m in new_modules else ' (gone)')}"
            for m in changed]


def _digest_from(target: str, workdir: str) -> str:
    """A code digest given as hex, or read from an artifact (path or RUN/STAGE) made by the old code."""
    if re.fullmatch(r"[0-9a-f]{%d}" % DIGEST_LENGTH, target):
        return target
    from pipeline.artifact import Artifact
    from pipeline.cli import resolve_target

    parts = Artifact(resolve_target(target, workdir)).manifest.get("key_parts", {})
    if "code" not in parts:
        raise ValueError(f"{target}: the artifact records no code digest (made before code digests existed)")
    return parts["code"]


def cmd_code_digest(args) -> int:
    from pipeline.errors import KdpipeError
    from pipeline.registry import STAGES, stage_types

    types = args.types or stage_types()
    unknown = [t for t in types if t not in STAGES]
    if unknown:
        raise KdpipeError(f"unknown stage type(s) {unknown}; known: {', '.join(stage_types())}")
    if args.same_as:
        if len(types) != 1 or not args.reason:
            raise KdpipeError("--same-as needs exactly one stage type and --reason (why the output is unchanged)")
        try:
            old = _digest_from(args.same_as, args.workdir)
        except ValueError as e:
            raise KdpipeError(str(e)) from None
        current = pin_alias(types[0], to_digest=old, reason=args.reason)
        print(f"{types[0]}: code {current} now keys as {old} (recorded in {ALIASES_FILE}; commit it)")
        return 0
    for type_key in types:
        identity = CodeIdentity(type_key)
        pinned = f" (pinned as {identity.digest}: {identity.alias_reason})" if identity.alias_reason else ""
        print(f"{type_key}  code {identity.own_digest}{pinned}")
        for rel, digest in identity.modules.items():
            print(f"    {digest[:DIGEST_LENGTH]}  {rel}")
        print("    libraries: " + ", ".join(f"{k} {v}" for k, v in identity.libraries().items()))
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("code-digest", help="show each stage type's code digest, or pin a same-output change")
    p.add_argument("types", nargs="*", metavar="TYPE", help="stage types (default: all)")
    p.add_argument("--same-as", metavar="DIGEST|RUN/STAGE",
                   help="declare that TYPE's current code gives the same output as this older digest (or the "
                        "code of this artifact), so its artifacts stay cached; written to code_aliases.json")
    p.add_argument("--reason", help="why the output is unchanged (kept in the alias file)")
    p.add_argument("--workdir", default="data", help="workdir for RUN/STAGE (default: data)")
    p.set_defaults(func=cmd_code_digest)
