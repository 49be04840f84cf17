"""Content hashes for cache keys and shard checksums."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def canonical_json(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def hash_obj(obj: Any) -> str:
    return hashlib.sha256(canonical_json(obj).encode()).hexdigest()


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def hash_tree(path: str | Path, *, ignore: tuple[str, ...] = (".git", "__pycache__")) -> str:
    """Hash of a file, or of every file below a directory (relative names and bytes)."""
    path = Path(path)
    if path.is_file():
        return sha256_file(path)
    h = hashlib.sha256()
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path)
        if any(part in ignore for part in rel.parts):
            continue
        h.update(str(rel.as_posix()).encode() + b"\0" + sha256_file(file).encode() + b"\n")
    return h.hexdigest()
