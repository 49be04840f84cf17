"""`kdpipe gc` and the teachers stored under models/: a stored model goes only when no artifact gc
keeps loaded it, never while a live run holds a claim, and never when a kept artifact cannot say
what it loaded. Local and S3 workdirs (moto on loopback)."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import storage
from pipeline.artifact import Artifact, write_alias
from pipeline.claims import Claims
from pipeline.cli import main
from pipeline.gc import collect_garbage
from pipeline.model_store import store_model, verify_model


@pytest.fixture(params=["local", "s3"])
def workdir(request, tmp_path) -> str:
    return str(tmp_path / "wd") if request.param == "local" else request.getfixturevalue("s3_workdir")


@pytest.fixture
def teachers(tmp_path) -> dict[str, Path]:
    """Two model folders with different content (gc only moves bytes; what they hold is irrelevant)."""
    out = {}
    for name in ("a", "b"):
        folder = tmp_path / f"teacher-{name}"
        folder.mkdir()
        (folder / "config.json").write_text(f'{{"name": "{name}"}}')
        (folder / "model.safetensors").write_bytes(name.encode() * 50_000)
        out[name] = folder
    return out


def _artifact(workdir: str, type_key: str, key: str, models: dict[str, str] | None) -> Artifact:
    """A finished artifact as the executor leaves it; models=None: a manifest from before
    artifacts recorded the stored models they loaded."""
    loc = storage.join(workdir, "artifacts", type_key, key)
    storage.write_bytes(storage.join(loc, "shards", "00000.parquet"), b"x" * 1000)
    manifest = {"type": type_key, "key": key, "key_parts": {}, "shards": []}
    if models is not None:
        manifest["models"] = models
    storage.write_json(storage.join(loc, "manifest.json"), manifest)
    return Artifact(loc)


def _digest(loc: str) -> str:
    return storage.basename(loc)


def _models(workdir: str) -> list[str]:
    return sorted(storage.list_dir(storage.join(workdir, "models")))


def _quiet(msg: str) -> None:
    pass


def test_gc_removes_only_the_model_no_kept_artifact_loaded(workdir, teachers):
    a, b = store_model(teachers["a"], workdir), store_model(teachers["b"], workdir)
    kept = _artifact(workdir, "label", "k" * 20, {"teacher a": _digest(a)})
    old = _artifact(workdir, "label", "o" * 20, {"teacher b": _digest(b)})  # its alias moved on to `kept`
    train = _artifact(workdir, "train", "t" * 20, {})
    write_alias(workdir, "run", "label", kept)
    write_alias(workdir, "run", "train", train)

    dry = collect_garbage(workdir, dry_run=True, log=_quiet)
    assert sorted(dry.removed) == sorted([old.loc, b]) and dry.models_kept_because is None
    assert _models(workdir) == sorted([_digest(a), _digest(b)]) and old.is_complete(), "dry run deleted"

    assert main(["gc", "--workdir", workdir]) == 0  # the command itself, as users run it
    assert _models(workdir) == [_digest(a)]
    assert not old.is_complete() and kept.is_complete() and train.is_complete()
    assert verify_model(a) == ([], 2), "the kept model must stay whole"
    assert collect_garbage(workdir, dry_run=True, log=_quiet).removed == [], "gc removed less than it listed"


def test_a_live_claim_keeps_every_model(tmp_path, teachers):
    wd = str(tmp_path / "wd")
    a, b = store_model(teachers["a"], wd), store_model(teachers["b"], wd)
    kept = _artifact(wd, "label", "k" * 20, {"teacher a": _digest(a)})
    write_alias(wd, "run", "label", kept)
    # A run that has planned a new artifact and may be storing (or about to load) teacher b.
    with Claims(wd, run="busy", log=_quiet) as busy:
        busy.declare([storage.join(wd, "artifacts", "label", "n" * 20)])
        result = collect_garbage(wd, dry_run=False, log=_quiet)
        assert result.removed == [] and "'busy' is live" in result.models_kept_because
        assert _models(wd) == sorted([_digest(a), _digest(b)])
    result = collect_garbage(wd, dry_run=False, log=_quiet)
    assert result.removed == [b] and result.models_kept_because is None
    assert _models(wd) == [_digest(a)], "once the run is gone, the model no artifact loaded goes"


def test_a_kept_artifact_that_cannot_say_what_it_loaded_keeps_every_model(tmp_path, teachers):
    wd = str(tmp_path / "wd")
    a, b = store_model(teachers["a"], wd), store_model(teachers["b"], wd)
    write_alias(wd, "run", "label", _artifact(wd, "label", "k" * 20, {"teacher a": _digest(a)}))
    # A read artifact from an older kdpipe loaded no outside model: it does not block gc.
    write_alias(wd, "run", "read", _artifact(wd, "read", "r" * 20, None))
    legacy = _artifact(wd, "label", "l" * 20, None)  # an older label artifact: it may have loaded b
    write_alias(wd, "old", "label", legacy)
    result = collect_garbage(wd, dry_run=False, log=_quiet)
    assert result.removed == [] and result.models_kept_because.startswith(legacy.loc)
    assert _models(wd) == sorted([_digest(a), _digest(b)])

    storage.delete(storage.join(wd, "runs", "old", "label.alias.json"))
    (Path(wd) / "runs" / "old" / "label").unlink()
    assert sorted(collect_garbage(wd, dry_run=False, log=_quiet).removed) == sorted([legacy.loc, b])
    assert _models(wd) == [_digest(a)]


def test_a_gc_killed_mid_delete_leaves_no_complete_looking_model(tmp_path, teachers, monkeypatch):
    """The delete of a model's files fails (a crash at that moment): its manifest.json is already
    gone, so the next run stores the teacher again instead of loading a copy with files missing."""
    wd = str(tmp_path / "wd")
    b = store_model(teachers["b"], wd)

    def crash(loc):
        raise OSError("killed mid-delete")

    monkeypatch.setattr(storage, "delete_tree", crash)
    with pytest.raises(OSError, match="killed mid-delete"):
        collect_garbage(wd, dry_run=False, log=_quiet)
    monkeypatch.undo()
    assert storage.is_file(storage.join(b, "files", "model.safetensors")), "the files are still there"
    assert not storage.is_file(storage.join(b, "manifest.json"))
    assert store_model(teachers["b"], wd) == b
    assert verify_model(b) == ([], 2)
