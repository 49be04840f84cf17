"""Teachers as artifacts: a model folder from outside the store (a path or a pinned hub snapshot)
is stored once in the workdir under its content fingerprint, and workers read that copy — from
a local workdir in place, from an object store through a per-node copy checked against the
recorded sha256. A hub teacher must be pinned to a revision that cannot move."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from factories import tiny_bert_classifier

from pipeline import storage
from pipeline.model_store import StoredModelError, folder_digest, model_dir, model_files, store_model

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def teacher(tmp_path_factory) -> Path:
    folder = tiny_bert_classifier(tmp_path_factory.mktemp("t") / "tiny", 2, ["negative", "positive"],
                                  sentences=["a warm funny film"])
    (folder / "pytorch_model.bin").write_bytes(b"old weights")  # not read when safetensors exist
    (folder / "checkpoint-5").mkdir()
    (folder / "checkpoint-5" / "optimizer.pt").write_bytes(b"training state")
    return folder


def fake_hub_cache(root: Path, repo_id: str, folder: Path, sha: str = SHA) -> Path:
    """The HF cache layout (models--org--name/snapshots/<sha>, refs/main) holding `folder`."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(folder, repo / "snapshots" / sha)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(sha)
    return root


def test_model_files_are_the_top_level_files_without_other_weights(teacher):
    names = model_files(teacher)
    assert "model.safetensors" in names and "config.json" in names
    assert "pytorch_model.bin" not in names and not any("checkpoint" in n for n in names)


def test_stored_once_by_content_and_read_back_from_s3(teacher, s3_workdir, tmp_path, monkeypatch):
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "node-cache"))
    loc = store_model(teacher, s3_workdir)
    assert loc == storage.join(s3_workdir, "models", folder_digest(teacher))
    assert sorted(storage.list_files(storage.join(loc, "files"))) == model_files(teacher)
    assert store_model(teacher, s3_workdir) == loc  # a second store is a no-op
    assert list(storage.list_dir(storage.join(s3_workdir, "models"))) == [folder_digest(teacher)]
    local = model_dir(loc)
    assert local.is_relative_to(tmp_path / "node-cache")
    assert {p.name for p in local.iterdir()} == set(model_files(teacher))
    assert folder_digest(local) == folder_digest(teacher)

    # A copy that does not match its recorded sha256 is refused, not loaded.
    bad = storage.join(loc, "files", "config.json")
    storage.write_bytes(bad, storage.read_bytes(bad) + b" ")
    monkeypatch.setenv("KDPIPE_CACHE_DIR", str(tmp_path / "other-node"))
    with pytest.raises(StoredModelError, match="does not match its recorded sha256"):
        model_dir(loc)


def test_local_workdir_loads_the_stored_folder_in_place(teacher, tmp_path):
    loc = store_model(teacher, tmp_path / "wd")
    assert model_dir(loc) == Path(loc) / "files"
    storage.delete(storage.join(loc, "manifest.json"))  # an interrupted store is not a model
    with pytest.raises(StoredModelError, match="not stored completely"):
        model_dir(loc)


@pytest.mark.parametrize("revision, ok", [(None, False), ("main", False), (SHA, True)])
def test_a_hub_teacher_must_be_pinned(teacher, tmp_path, monkeypatch, revision, ok):
    from huggingface_hub import constants

    from kd.teachers import check_teacher, teacher_fingerprint

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hf", "kd-test/tiny", teacher)))
    problems = check_teacher("kd-test/tiny", revision=revision, task="classification", trust_remote_code=False,
                             allow_new_head=False, loc="config.teacher")
    assert not problems if ok else ["pin it" in p.message for p in problems] == [True], problems
    if ok:  # the fingerprint holds the snapshot's content, not only the id and revision
        before = teacher_fingerprint("kd-test/tiny", SHA)
        config = tmp_path / "hf" / "models--kd-test--tiny" / "snapshots" / SHA / "config.json"
        config.write_text(config.read_text().replace('"negative"', '"neg"'))
        assert teacher_fingerprint("kd-test/tiny", SHA) != before


def test_a_hub_base_model_for_finetune_must_be_pinned(teacher, tmp_path, monkeypatch):
    from huggingface_hub import constants

    from stages.finetune import FinetuneConfig, FinetuneStage

    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(fake_hub_cache(tmp_path / "hf", "kd-test/base", teacher)))
    for revision, locs in ((None, ["config.revision"]), ("main", ["config.revision"]), (SHA, [])):
        stage = FinetuneStage(config=FinetuneConfig(base_model="kd-test/base", revision=revision))
        assert [p.loc for p in stage.validate(input_columns={})] == locs, revision


def test_verify_rehashes_stored_teachers(teacher, tmp_path, capsys):
    import pyarrow as pa

    from pipeline.cli import main
    from pipeline.testing import make_artifact

    wd = tmp_path / "wd"
    make_artifact(wd / "artifacts" / "read" / "k1", pa.table({"id": ["a"], "text": ["x"]}))
    loc = store_model(teacher, wd)
    assert main(["verify", "--workdir", str(wd)]) == 0
    config = Path(loc) / "files" / "config.json"
    config.write_text(config.read_text() + " ")
    capsys.readouterr()
    assert main(["verify", "--workdir", str(wd)]) == 1
    assert f"BAD {config}" in capsys.readouterr().err
