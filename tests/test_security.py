"""Security: manifests are inert data, product code never unpickles or evaluates untrusted bytes,
remote model code needs an explicit opt-in, and names from manifests cannot leave the workdir."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from pipeline.errors import ManifestError
from pipeline.manifest import NAME_RE, load_manifest, parse_manifest
from pipeline.plan import alias_path, artifact_dir

REPO = Path(__file__).resolve().parent.parent
PRODUCT_DIRS = ("pipeline", "stages", "bench")


# --- static scan of product code --------------------------------------------------------------

def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


UNSAFE_CALLS = {
    "pickle.load", "pickle.loads", "cPickle.load", "cPickle.loads", "cloudpickle.load", "cloudpickle.loads",
    "dill.load", "dill.loads", "marshal.load", "marshal.loads", "shelve.open", "yaml.unsafe_load",
    "yaml.full_load", "pandas.read_pickle", "pd.read_pickle", "joblib.load", "eval", "exec",
}


def unsafe_calls(source: str, filename: str = "<src>") -> list[str]:
    """Calls that can run code from untrusted bytes, as 'file:line: what'."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names]
            module = getattr(node, "module", None) or ""
            if {"pickle", "cPickle", "dill", "marshal", "shelve"} & {module, *names} or \
                    (module in ("pickle", "dill") and {"load", "loads"} & set(names)):
                found.append(f"{filename}:{node.lineno}: imports a pickle-like module")
            continue
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in UNSAFE_CALLS:
            found.append(f"{filename}:{node.lineno}: {name}()")
        elif name.endswith("torch.load"):
            if not _is_true(_kw(node, "weights_only")):
                found.append(f"{filename}:{node.lineno}: torch.load without weights_only=True")
        elif name == "yaml.load":
            loader = _dotted(_kw(node, "Loader") or (node.args[1] if len(node.args) > 1 else ast.Name("?")))
            if not loader.endswith(("SafeLoader", "CSafeLoader")):
                found.append(f"{filename}:{node.lineno}: yaml.load without SafeLoader")
        elif name.endswith(("np.load", "numpy.load")) and _is_true(_kw(node, "allow_pickle")):
            found.append(f"{filename}:{node.lineno}: numpy.load(allow_pickle=True)")
        if _is_true(_kw(node, "trust_remote_code")):
            found.append(f"{filename}:{node.lineno}: trust_remote_code=True hard-coded")
        if _is_true(_kw(node, "shell")):
            found.append(f"{filename}:{node.lineno}: subprocess with shell=True")
    return found


def _product_files() -> list[Path]:
    return sorted(p for d in PRODUCT_DIRS if (REPO / d).is_dir() for p in (REPO / d).rglob("*.py"))


def test_scanner_catches_every_unsafe_pattern():
    bad = """
import pickle
from dill import loads
import torch, yaml, numpy as np
pickle.loads(b"")
torch.load("x.pt")
torch.load("x.pt", weights_only=False)
yaml.load(text)
yaml.load(text, Loader=yaml.Loader)
yaml.unsafe_load(text)
np.load("a.npy", allow_pickle=True)
eval("1")
exec("x = 1")
AutoModel.from_pretrained(path, trust_remote_code=True)
subprocess.run(cmd, shell=True)
"""
    assert len(unsafe_calls(bad)) == 13
    good = """
import torch, yaml, json
torch.load("x.pt", weights_only=True)
yaml.safe_load(text)
yaml.load(text, Loader=yaml.SafeLoader)
AutoModel.from_pretrained(path, trust_remote_code=cfg.trust_remote_code)
json.loads("{}")
"""
    assert unsafe_calls(good) == []


def test_product_code_has_no_unsafe_deserialisation_or_eval():
    files = _product_files()
    assert len(files) >= 10, "expected to scan the engine and the stages"
    found = [hit for f in files for hit in unsafe_calls(f.read_text(encoding="utf-8"), str(f.relative_to(REPO)))]
    assert found == []


def test_remote_code_is_opt_in_in_every_stage_config():
    """Every `trust_remote_code` field of every registered stage defaults to False."""
    from pydantic import BaseModel

    from pipeline.registry import STAGES, get_stage_class

    seen = 0

    def walk(model: type[BaseModel], where: str) -> None:
        nonlocal seen
        for name, field in model.model_fields.items():
            if name == "trust_remote_code":
                seen += 1
                assert field.default is False, f"{where}.{name} must default to False"
            ann = field.annotation
            for sub in (ann, *getattr(ann, "__args__", ())):
                if isinstance(sub, type) and issubclass(sub, BaseModel):
                    walk(sub, f"{where}.{name}")

    for key in STAGES:
        try:
            cls = get_stage_class(key)
        except ModuleNotFoundError:
            continue  # a stage registered by a helper whose module has not landed yet
        walk(cls.Config, key)
    assert seen >= 1


# --- manifests are inert ----------------------------------------------------------------------

@pytest.mark.parametrize("tag", [
    "!!python/object/apply:os.system [\"touch {m}\"]",
    "!!python/object/new:subprocess.Popen [[\"touch\", \"{m}\"]]",
    "!!python/name:os.system",
    "!!python/module:os",
])
def test_yaml_python_tags_never_construct_objects(tmp_path, tag):
    marker = tmp_path / "pwned"
    path = tmp_path / "m.yaml"
    path.write_text(f"name: x\nvars:\n  v: {tag.format(m=marker)}\nstages:\n  - {{name: r, type: read}}\n")
    with pytest.raises(ManifestError) as exc:
        load_manifest(path)
    assert len(exc.value.problems) == 1 and "malformed YAML" in exc.value.problems[0]
    assert not marker.exists()


def test_variables_are_plain_text_not_expressions(tmp_path):
    m = parse_manifest({"name": "x", "vars": {"p": "__import__('os').system('true')"},
                        "stages": [{"name": "r", "type": "read", "config": {"path": "${p}"}}]})
    assert m.stages[0].config["path"] == "__import__('os').system('true')"


# --- names from manifests stay inside the workdir ----------------------------------------------

@pytest.mark.parametrize("name", ["read", "label-v2", "sst2.teacher_1", "A" * 100])
def test_valid_names(name):
    assert NAME_RE.match(name)


BAD_NAMES = ["..", "../x", "a/../../b", "/etc/passwd", "a/b", ".hidden", "", "A" * 101, "a\\b", "a\0b",
             "x\n", "~root", "$HOME", "a b", "run..x", "C:\\x"]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_stage_and_run_names_that_could_escape_are_rejected(name):
    for raw in ({"name": name, "stages": [{"name": "r", "type": "read"}]},
                {"name": "x", "stages": [{"name": name, "type": "read"}]}):
        with pytest.raises(ManifestError) as exc:
            parse_manifest(raw)
        assert len(exc.value.problems) == 1
        assert exc.value.problems[0].startswith(("name:", "stages[0].name:"))


def test_every_store_path_stays_under_the_workdir(tmp_path):
    workdir = tmp_path / "wd"
    for name in ("read", "a.b", "x-1_y", "A" * 100):
        assert alias_path(workdir, name, name).resolve().is_relative_to(workdir.resolve())
        assert artifact_dir(workdir, name, "0" * 20).resolve().is_relative_to(workdir.resolve())


def test_unknown_stage_type_is_never_imported(tmp_path):
    """A manifest cannot make the engine import an arbitrary module through `type`."""
    from pipeline.graph import build_graph

    m = parse_manifest({"name": "x", "workdir": str(tmp_path),
                        "stages": [{"name": "r", "type": "os:system"}]})
    with pytest.raises(ManifestError) as exc:
        build_graph(m)
    assert exc.value.problems[0].startswith("stages[0].type: unknown stage type")


def test_safe_load_is_what_the_manifest_loader_uses():
    source = (REPO / "pipeline" / "manifest.py").read_text(encoding="utf-8")
    assert "yaml.safe_load(" in source and unsafe_calls(source) == []
    assert yaml.safe_load("a: !!binary aGk=") == {"a": b"hi"}  # standard tags still fine


# --- checkpoints are safetensors -----------------------------------------------------------------

PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")  # pickle protocol >= 2; torch.save's zip container


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["bilstm", "cnn", "transformer"])
def test_student_checkpoints_are_safetensors_not_pickles(tmp_path, kind):
    import pyarrow as pa

    from pipeline.testing import make_artifact, make_context
    from kd.students import load_student
    from stages.train import TrainStage

    texts = ["a warm funny film", "a dull mess", "the cast is terrific", "so boring"] * 4
    data = make_artifact(tmp_path / "data", pa.table({"id": [f"r{i}" for i in range(16)], "text": texts,
                                                      "label": [1, 0, 1, 0] * 4}), rows_per_shard=8,
                         metadata={"kdpipe.label_names": '["neg", "pos"]'})
    student = {"type": kind, "embedding_dim": 8, "hidden_dim": 8, "mlp_dim": 8, "num_filters": 4}
    if kind == "transformer":
        student["hf_config"] = {"model_type": "bert", "hidden_size": 16, "num_hidden_layers": 1,
                                "num_attention_heads": 2, "intermediate_size": 16, "max_position_embeddings": 32}
    ctx = make_context(tmp_path, inputs={"data": [data]}, name=kind)
    TrainStage(config=TrainStage.Config(student=student, epochs=1, batch_size=8)).run(ctx)
    saved = sorted(p for p in (ctx.out_dir / "student").rglob("*") if p.is_file())
    assert "model.safetensors" in {p.name for p in saved}
    from safetensors import safe_open

    for weights in (p for p in saved if p.suffix == ".safetensors"):
        with safe_open(str(weights), framework="numpy") as f:  # parses as safetensors
            assert list(f.keys())
    pickles = [p.name for p in saved if p.suffix != ".safetensors" and p.read_bytes()[:4].startswith(PICKLE_MAGIC)]
    assert pickles == [], f"pickled files in the student checkpoint: {pickles}"
    assert not [p for p in saved if p.suffix in (".bin", ".pt", ".pth", ".pkl", ".ckpt")]
    assert load_student(ctx.out_dir / "student").predict(texts[:2]) is not None
