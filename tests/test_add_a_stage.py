"""Follows ARCHITECTURE.md's "Add a stage" walkthrough literally: the stage, its test and its
manifest are the code blocks between the `add-a-stage:*` markers. The stage goes into a temporary
package instead of stages/ (tests write only under tmp_path) and is registered the way the
walkthrough says, as one entry in STAGES; then its test runs, and the manifest runs on Ray."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.artifact import Artifact
from pipeline.errors import ManifestError
from pipeline.graph import build_graph
from pipeline.manifest import parse_manifest
from pipeline.registry import STAGES
from pipeline.runner import run_graph

DOC = Path(__file__).resolve().parent.parent / "ARCHITECTURE.md"
PACKAGE = "kdpipe_walkthrough"


def block(name: str) -> str:
    """The fenced code block between <!-- add-a-stage:NAME --> and <!-- /add-a-stage:NAME -->."""
    text = DOC.read_text(encoding="utf-8")
    found = re.search(rf"<!-- add-a-stage:{name} -->\s*```\w+\n(.*?)```\s*<!-- /add-a-stage:{name} -->", text, re.S)
    assert found, f"ARCHITECTURE.md has no add-a-stage:{name} block between markers"
    return found.group(1)


@pytest.fixture
def word_count_registered(tmp_path, monkeypatch):
    """stages/word_count.py of the walkthrough, as <tmp>/kdpipe_walkthrough/word_count.py, plus
    the walkthrough's registry line pointing there."""
    import ray.cloudpickle

    package = tmp_path / "src" / PACKAGE
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "word_count.py").write_text(block("stage"), encoding="utf-8")
    line = re.search(r'^\s*("word_count": "stages\.word_count:WordCountStage"),\s*$', DOC.read_text(), re.M)
    assert line, "the walkthrough's registry line is missing"
    key, target = [part.strip().strip('"') for part in line.group(1).split(": ")]
    monkeypatch.setitem(STAGES, key, target.replace("stages.", f"{PACKAGE}.", 1))
    monkeypatch.syspath_prepend(str(package.parent))
    import importlib

    module = importlib.import_module(f"{PACKAGE}.word_count")
    # Ray workers cannot import a package under tmp_path: ship the module's code by value.
    ray.cloudpickle.register_pickle_by_value(module)
    yield module
    ray.cloudpickle.unregister_pickle_by_value(module)
    for name in [m for m in sys.modules if m == PACKAGE or m.startswith(PACKAGE + ".")]:
        del sys.modules[name]


def test_the_walkthroughs_own_test_passes(tmp_path, word_count_registered):
    namespace: dict = {}
    exec(compile(block("test"), "ARCHITECTURE.md:add-a-stage:test", "exec"), namespace)
    tests = [f for name, f in namespace.items() if name.startswith("test_")]
    assert tests
    for i, test in enumerate(tests):
        test(tmp_path / f"t{i}")


def walkthrough_manifest(tmp_path: Path, tsv: Path) -> dict:
    manifest = yaml.safe_load(block("manifest"))
    manifest["workdir"] = str(tmp_path / "wd")
    manifest["stages"][0]["config"]["path"] = str(tsv)
    return manifest


@pytest.mark.ray
def test_the_walkthroughs_manifest_runs_on_the_engine(tmp_path, sentiment_tsv, word_count_registered, ray_session):
    manifest = walkthrough_manifest(tmp_path, sentiment_tsv)
    summary = {s["name"]: s for s in run_graph(build_graph(parse_manifest(manifest)), progress=False,
                                               log=lambda *a: None)}
    assert summary["count"]["status"] == "ran"
    table = Artifact(Path(summary["count"]["path"])).read_table()
    texts, counts = table.column("text").to_pylist(), table.column("n_words").to_pylist()
    assert len(texts) == 40 and counts == [len(t.split()) for t in texts]
    again = run_graph(build_graph(parse_manifest(manifest)), progress=False, log=lambda *a: None)
    assert {s["name"]: s["status"] for s in again} == {"read": "cached", "count": "cached"}


def test_the_walkthroughs_stage_is_validated_before_running(tmp_path, sentiment_tsv, word_count_registered):
    manifest = walkthrough_manifest(tmp_path, sentiment_tsv)
    manifest["stages"][1]["config"] = {"text_column": "sentence"}  # read renames it to `text`
    with pytest.raises(ManifestError) as err:
        build_graph(parse_manifest(manifest))
    assert [p.split(": ")[0] for p in err.value.problems] == ["stages[1].config.text_column"]
    assert not (tmp_path / "wd").exists()
