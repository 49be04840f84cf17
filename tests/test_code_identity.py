"""Code identity: which modules a stage runs, normalised digests, library versions, the alias
override, `kdpipe code-digest` / `kdpipe keys`, and the plain-words reasons `plan` gives."""
from __future__ import annotations

import json
import textwrap
from pathlib import Path

import pytest

from pipeline import code_identity
from pipeline.cli import main
from pipeline.code_identity import CodeIdentity, closure, combined_digest, normalized_source, numeric_libraries
from pipeline.key_table import checked_in_block, render
from pipeline.key_table import rows as key_table_rows
from pipeline.plan import explain_change
from pipeline.registry import STAGES

REPO = Path(__file__).resolve().parent.parent


def write(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
    return root


PROJECT = {
    "stages/__init__.py": "",
    "stages/student.py": """
        '''A stage module.'''
        import json
        from stages import absolute_helper

        def run():
            from .lazy_helper import f  # imported only when run() runs
            return f()
        """,
    "stages/absolute_helper.py": "import numpy\nX = 1\n",
    "stages/lazy_helper.py": """
        import importlib
        PLUGINS = {"a": "lib.plugin:Plugin"}

        def f():
            return importlib.import_module(PLUGINS["a"].split(":")[0])
        """,
    "stages/unused.py": "import torch\n",
    "lib/__init__.py": "",
    "lib/plugin.py": "import transformers\nclass Plugin: pass\n",
}


def test_closure_follows_absolute_relative_lazy_and_registry_string_imports(tmp_path):
    root = write(tmp_path, PROJECT)
    modules, imported = closure("stages.student", root)
    assert set(modules) == {"stages/__init__.py", "stages/student.py", "stages/absolute_helper.py",
                            "stages/lazy_helper.py", "lib/__init__.py", "lib/plugin.py"}
    assert {"numpy", "transformers", "json", "importlib"} <= imported and "torch" not in imported
    # transformers' numbers also depend on tokenizers and torch
    assert numeric_libraries(imported) == ["numpy", "tokenizers", "torch", "transformers"]


def test_comments_docstrings_and_layout_do_not_count_but_code_does():
    base = 'def f(x):\n    """Doc."""\n    return x + 1\n'
    same = '# a comment\ndef f( x ):\n    """Another docstring,\n    longer."""\n\n    return (x + 1)  # why\n'
    other = 'def f(x):\n    """Doc."""\n    return x + 2\n'
    assert normalized_source(base) == normalized_source(same)
    assert normalized_source(base) != normalized_source(other)


def test_a_helper_module_change_changes_the_digest_of_stages_that_import_it(tmp_path):
    root = write(tmp_path, PROJECT)
    before = combined_digest(closure("stages.student", root)[0])
    (root / "lib/plugin.py").write_text("import transformers\nclass Plugin:\n    x = 1\n")
    changed = combined_digest(closure("stages.student", root)[0])
    assert changed != before
    (root / "lib/plugin.py").write_text("import transformers\nclass Plugin:\n    x = 2\n")  # same size, same tick
    assert combined_digest(closure("stages.student", root)[0]) not in (before, changed)
    (root / "stages/unused.py").write_text("import torch\nY = 2\n")  # imported by nobody
    after = combined_digest(closure("stages.student", root)[0])
    (root / "stages/unused.py").write_text("import torch\nY = 3\n")
    assert combined_digest(closure("stages.student", root)[0]) == after


def test_every_stage_type_digests_its_own_module_and_shared_helpers():
    label = CodeIdentity("label")
    assert {"stages/label.py", "kd/teachers.py", "pipeline/stage.py"} <= set(label.modules)
    assert {"torch", "transformers", "tokenizers"} <= set(label.library_names)
    train = CodeIdentity("train")
    assert {"kd/losses.py", "kd/train_data.py", "kd/students/bilstm.py"} <= set(train.modules)
    assert "stages/train.py" not in CodeIdentity("split").modules
    assert "spacy" in CodeIdentity("pos_tag").library_names
    assert CodeIdentity("split").libraries()["python"] == code_identity.python_version()


def test_alias_keeps_old_artifacts_for_a_declared_same_output_change(tmp_path):
    aliases = tmp_path / "code_aliases.json"
    current = code_identity.pin_alias("split", to_digest="0" * 16, reason="renamed a variable", path=aliases)
    pinned = CodeIdentity("split", aliases_file=aliases)
    assert current == pinned.own_digest and pinned.digest == "0" * 16
    assert pinned.alias_reason == "renamed a variable"
    # An alias names one exact digest: the next real code change is not covered by it.
    data = json.loads(aliases.read_text())
    data["split"] = {"f" * 16: data["split"][current]}
    aliases.write_text(json.dumps(data))
    assert CodeIdentity("split", aliases_file=aliases).digest == current


def test_checked_in_alias_file_is_valid():
    for type_key, pins in code_identity.load_aliases().items():
        assert type_key in STAGES
        for digest, pin in pins.items():
            assert len(digest) == code_identity.DIGEST_LENGTH and set(pin) == {"as", "reason"} and pin["reason"]


def test_code_digest_command_lists_modules_and_libraries(capsys):
    assert main(["code-digest", "split", "pos_tag"]) == 0
    out = capsys.readouterr().out
    assert f"split  code {CodeIdentity('split').digest}" in out
    assert "stages/split.py" in out and "spacy " in out
    assert main(["code-digest", "nope"]) != 0


def test_code_digest_pin_needs_a_reason(capsys):
    assert main(["code-digest", "split", "--same-as", "0" * 16]) != 0
    assert "--reason" in capsys.readouterr().err


def test_reliability_key_table_is_generated_from_the_code():
    checked_in = checked_in_block(REPO / "RELIABILITY.md")
    assert checked_in == render(), "RELIABILITY.md's key table is stale: run `kdpipe keys --write RELIABILITY.md`"


def test_key_table_names_seed_use_and_documented_fingerprints():
    rows = {row["stage type"].strip("`"): row for row in key_table_rows()}
    assert {t for t, r in rows.items() if r["manifest seed"] == "yes"} == {
        "augment", "finetune", "seq2seq_teacher", "train", "train_seq2seq", "lm_teacher", "train_lm",
        "train_multitask"}
    assert rows["label"]["manifest seed"].startswith("when config.allow_new_head")
    assert rows["lm_label"]["manifest seed"].startswith("when mode: sampled")
    assert rows["lm_generate"]["manifest seed"].startswith("when strategy: sample")
    assert all("undocumented" not in r["outside content"] for r in rows.values())
    assert "batch_size" in rows["label"]["left out (throughput)"] and "batch_size" not in rows["label"]["config fields"]


def test_plan_reasons_name_the_changed_file_library_and_field():
    old = {"type": "augment", "code": "a", "libraries": {"python": "3.11", "transformers": "5.1"},
           "config": {"p_mask": 0.1}, "inputs": {"data": ["k1"]}, "fingerprint": {"teacher t": "x"}, "seed": 1}
    new = {**old, "code": "b", "libraries": {"python": "3.11", "transformers": "5.2"},
           "config": {"p_mask": 0.2}, "inputs": {"data": ["k2"]}, "fingerprint": {"teacher t": "y"},
           "numerics": {"dtype": "float32"}}
    del new["seed"]
    reason = explain_change(old, new, old_modules={"stages/augment.py": "1", "stages/unigram.py": "2"},
                            new_modules={"stages/augment.py": "3", "stages/unigram.py": "2"})
    for part in ("code changed: stages/augment.py", "transformers 5.1 -> 5.2", "config.p_mask changed 0.1 -> 0.2",
                 "input data changed", "teacher t changed", "manifest seed changed 1 -> unused",
                 'numerics changed null -> {"dtype": "float32"}'):
        assert part in reason
    assert "unigram" not in reason
    legacy = {"type": "augment", "code_version": "1", "config": {}, "inputs": {}, "fingerprint": {}, "seed": 0}
    assert explain_change(legacy, {**legacy, "code": "b"}).startswith("made before code digests existed")


@pytest.mark.parametrize("bad", ["0" * 15, "not-a-digest"])
def test_pin_from_an_unknown_artifact_is_an_error(bad, tmp_path, capsys):
    assert main(["code-digest", "split", "--same-as", bad, "--reason", "r", "--workdir", str(tmp_path)]) != 0
    assert "no artifact" in capsys.readouterr().err
