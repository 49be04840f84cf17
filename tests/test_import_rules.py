"""The layers only look down: `pipeline/` (the engine) knows stages and the `kd/` library only
through the registry's strings; a stage module never imports another stage module; library code
never imports a stage module. Checked on the source (AST), so lazy imports inside functions count."""
from __future__ import annotations

import ast
from pathlib import Path

from pipeline.registry import STAGES

REPO = Path(__file__).resolve().parent.parent

def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, name: str | None = None) -> set[str]:
    """Every module a file imports, top level or inside functions; `from a import b` yields both
    `a` and `a.b` since b may be a module."""
    package = (name or module_name(path)).split(".")
    if path.name != "__init__.py":
        package = package[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names)
    return found


def first_named(modules: list[str]) -> list[str]:
    """`a.b` only where `a` is not listed too: `from a import b` reported once."""
    return [m for m in modules if m.rpartition(".")[0] not in modules]


def within(module: str, prefixes) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def stage_modules() -> set[str]:
    return {target.split(":")[0] for target in STAGES.values()}


def sources(folder: str) -> list[Path]:
    return sorted((REPO / folder).rglob("*.py"))


def test_pipeline_reaches_stages_and_the_library_only_through_the_registry():
    bad = [f"{module_name(path)} imports {mod}"
           for path in sources("pipeline") if path.name != "registry.py"
           for mod in first_named(sorted(m for m in imported_modules(path) if within(m, ("stages", "kd"))))]
    assert not bad, "pipeline/ must ask the registry (or the stage class) instead:\n" + "\n".join(bad)


def test_no_stage_module_imports_another_stage_module():
    stages = stage_modules()
    bad = [f"{module_name(path)} imports {mod}"
           for path in sources("stages") if module_name(path) in stages
           for mod in first_named(sorted(m for m in imported_modules(path) if within(m, stages - {module_name(path)})))]
    assert not bad, "move what stages share into kd/:\n" + "\n".join(bad)


def test_library_code_never_imports_a_stage_module():
    stages = stage_modules()
    library = sources("kd")
    bad = [f"{module_name(path)} imports {mod}" for path in library
           for mod in first_named(sorted(m for m in imported_modules(path) if within(m, stages)))]
    assert not bad, "library code sits below the stages:\n" + "\n".join(bad)


def test_stages_folder_holds_only_stage_modules():
    stages = stage_modules()
    strays = [module_name(p) for p in sources("stages") if p.name != "__init__.py" or p.parent.name != "stages"]
    strays = [m for m in strays if m != "stages" and m not in stages]
    assert not strays, ("stages/ holds one module per registered stage type; register these or move them "
                        "to kd/: " + ", ".join(strays))


def test_the_checker_sees_lazy_and_relative_imports(tmp_path):
    # A checker that found nothing would pass every rule above.
    source = tmp_path / "train.py"
    source.write_text("import json\n\ndef f():\n    from stages.evaluate import accuracy\n"
                      "    from . import unigram\n    from .students import common\n")
    found = imported_modules(source, "stages.train")
    assert {"json", "stages.evaluate", "stages.unigram", "stages.students.common"} <= found
    assert within("kd.students.common", ["kd.students"]) and not within("stages.trainer", ["stages.train"])
