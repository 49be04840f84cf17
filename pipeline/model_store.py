"""Model folders from outside the store, stored once in the workdir so that workers never read them
from a node-local path or the hub.

A teacher given by path, `pkg:` folder or pinned hub id lives on the driver's machine. Before a
stage that loads one runs, the engine copies the folder's model files to

    <workdir>/models/<digest>/files/...    config, weights (*.safetensors), tokenizer files
    <workdir>/models/<digest>/manifest.json   written last: each file's bytes and sha256

where `<digest>` is the content fingerprint of those files (the same one the cache key holds), so
the same teacher is stored once however many runs use it. A worker gets a local folder for it with
`model_dir(loc)`: the stored folder itself on a local workdir, else a copy downloaded once per node
into the local cache and checked against the recorded sha256.
"""
from __future__ import annotations

import hashlib
import os
from functools import lru_cache
from pathlib import Path

from pipeline import storage
from pipeline.hashing import sha256_file

# Weights of other frameworks (or training state) that transformers does not read when a
# *.safetensors file is present: left out of the stored copy and of its fingerprint.
OTHER_WEIGHTS = (".bin", ".h5", ".msgpack", ".onnx", ".ot", ".pt", ".pth", ".ckpt")
MANIFEST = "manifest.json"
_MIRRORED = ".kdpipe-mirrored"


class StoredModelError(OSError):
    """A stored model is incomplete or does not match its recorded checksums."""


def model_files(local: Path) -> list[str]:
    """What makes up the model in a checkpoint folder: its top-level files (config, weights,
    tokenizer), hidden files and subfolders (training checkpoints, ONNX exports) left out, and
    other frameworks' weights too when safetensors are there."""
    names = sorted(p.name for p in Path(local).iterdir() if p.is_file() and not p.name.startswith("."))
    if any(n.endswith(".safetensors") for n in names):
        names = [n for n in names if not n.endswith(OTHER_WEIGHTS)]
    return names


def _stamp(local: Path, names: list[str]) -> tuple:
    out = []
    for name in names:
        st = (local / name).stat()
        out.append((name, st.st_size, st.st_mtime_ns))
    return tuple(out)


@lru_cache(maxsize=32)
def _digests(path: str, stamp: tuple) -> tuple[str, tuple[tuple[str, str], ...]]:
    per_file = tuple((name, sha256_file(os.path.join(path, name))) for name, _, _ in stamp)
    h = hashlib.sha256()
    for name, digest in per_file:  # the formula of hashing.hash_tree, over model_files only
        h.update(name.encode() + b"\0" + digest.encode() + b"\n")
    return h.hexdigest(), per_file


def folder_digest(local: Path) -> str:
    """Content fingerprint of a model folder's `model_files`, memoised on their (name, size,
    mtime): plan and run both ask for it and weights are tens of MB or more."""
    local = Path(local).resolve()
    return _digests(str(local), _stamp(local, model_files(local)))[0]


def store_model(local: Path, workdir: str | os.PathLike) -> str:
    """Copy a model folder into the workdir (once: an existing complete copy is reused); returns
    its location. Files first, manifest.json last, so a crash leaves no copy that looks complete."""
    local = Path(local).resolve()
    names = model_files(local)
    digest, per_file = _digests(str(local), _stamp(local, names))
    loc = storage.join(storage.normalize(workdir), "models", digest)
    if storage.is_file(storage.join(loc, MANIFEST)):
        return loc
    files = {}
    for name, sha in per_file:
        storage.put_file(local / name, storage.join(loc, "files", name))
        files[name] = {"bytes": (local / name).stat().st_size, "sha256": sha}
    storage.write_json(storage.join(loc, MANIFEST), {"digest": digest, "source": str(local), "files": files})
    return loc


def model_dir(loc: str) -> Path:
    """A local folder holding the stored model at `loc`: the folder itself on a local workdir,
    else a copy in this node's cache (downloaded once per node, each file checked)."""
    try:
        manifest = storage.read_json(storage.join(loc, MANIFEST))
    except FileNotFoundError:
        raise StoredModelError(f"{loc} has no {MANIFEST}: the model was not stored completely; "
                               "rerun (the driver stores it again)") from None
    if not storage.is_remote(loc):
        return Path(loc) / "files"
    target = storage.local_mirror(loc)
    if (target / _MIRRORED).is_file():
        return target / "files"
    for name, rec in sorted(manifest["files"].items()):
        dest = target / "files" / name
        storage.get_file(storage.join(loc, "files", name), dest)
        if dest.stat().st_size != rec["bytes"] or sha256_file(dest) != rec["sha256"]:
            dest.unlink(missing_ok=True)
            raise StoredModelError(f"{storage.join(loc, 'files', name)} does not match its recorded sha256 "
                                   f"in {storage.join(loc, MANIFEST)}; delete {loc} and rerun to store it again")
    (target / _MIRRORED).write_text(manifest["digest"])
    return target / "files"


def stored_models(workdir: str | os.PathLike) -> list[str]:
    """Locations of every model stored in a workdir."""
    root = storage.join(storage.normalize(workdir), "models")
    return [storage.join(root, name) for name, kind in sorted(storage.list_dir(root).items()) if kind == "dir"]


def verify_model(loc: str) -> tuple[list[str], int]:
    """(problems, files checked) for one stored model: every file re-hashed against manifest.json."""
    try:
        recorded = storage.read_json(storage.join(loc, MANIFEST))["files"]
    except (OSError, ValueError, KeyError):
        return [f"BAD {loc}: no readable {MANIFEST} (an interrupted store; the next run stores it again)"], 0
    actual = storage.list_files(storage.join(loc, "files"), hidden=True)
    problems = []
    for name in sorted(set(recorded) | set(actual)):
        path = storage.join(loc, "files", name)
        if name not in actual:
            problems.append(f"BAD {path}: missing")
        elif name not in recorded:
            problems.append(f"BAD {path}: not listed in {MANIFEST}")
        elif actual[name] != recorded[name]["bytes"] or storage.sha256(path) != recorded[name]["sha256"]:
            problems.append(f"BAD {path}: differs from {MANIFEST} (altered); delete {loc} and rerun to store it again")
    return problems, len(set(recorded) | set(actual))
