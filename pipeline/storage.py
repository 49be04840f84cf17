"""One storage layer for everything under a workdir: a local folder or an object store URI.

A *location* is a string: a local path (`data/artifacts/label/ab12`) or a URI
(`s3://bucket/prefix/artifacts/label/ab12`, also gs:// and hdfs:// where pyarrow has them).
Object stores are reached through `pyarrow.fs.FileSystem.from_uri`, which reads the standard
variables (`AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`,
...), so kdpipe has no settings of its own.

Commit without rename: an object store has no atomic rename, so writers never rely on one. A
single object PUT is atomic (readers see the old object, none, or the whole new one); an artifact
is committed by writing its shards, then each shard's completion marker, then manifest.json last.
Local folders keep the temp-file + fsync + rename path, which is as fast as before.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from functools import lru_cache
from pathlib import Path
from typing import Any

_CHUNK = 1 << 20


def is_remote(loc: str | os.PathLike) -> bool:
    text = str(loc)
    return "://" in text and not text.startswith("file://")


def normalize(loc: str | os.PathLike) -> str:
    """Absolute local path (symlinks kept) or the URI without a trailing slash."""
    text = str(loc)
    if is_remote(text):
        return text.rstrip("/")
    if text.startswith("file://"):
        text = text[len("file://"):]
    return os.path.abspath(text)


def join(loc: str | os.PathLike, *parts: str) -> str:
    text = str(loc)
    if is_remote(text):
        return "/".join([text.rstrip("/"), *(p.strip("/") for p in parts)])
    return os.path.join(text, *parts)


def basename(loc: str | os.PathLike) -> str:
    return str(loc).rstrip("/").rsplit("/", 1)[-1]


def parent(loc: str | os.PathLike) -> str:
    return str(loc).rstrip("/").rsplit("/", 1)[0]


@lru_cache(maxsize=None)
def _remote_fs(scheme: str, bucket: str, endpoint: str | None):
    import pyarrow.fs as pafs

    uri = f"{scheme}://{bucket}"
    if scheme in ("s3", "s3a"):
        # New buckets: a fresh `s3://bucket/prefix` workdir needs no manual bucket creation.
        # Delayed open: a write under 5 MiB (markers, manifests, claims, most shards) is one PUT
        # on close instead of a multipart upload's three requests; errors still raise on close.
        uri += "?allow_bucket_creation=true&allow_delayed_open=true"
    fs, _ = pafs.FileSystem.from_uri(uri)
    return fs


def resolve(loc: str | os.PathLike):
    """(pyarrow FileSystem, path inside it) for a location."""
    import pyarrow.fs as pafs

    text = str(loc)
    if not is_remote(text):
        return pafs.LocalFileSystem(), os.path.abspath(text)
    scheme, rest = text.split("://", 1)
    bucket = rest.split("/", 1)[0]
    endpoint = os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("AWS_ENDPOINT_URL_S3")
    return _remote_fs(scheme, bucket, endpoint), rest.rstrip("/")


_BUCKETS_SEEN: set[tuple[str, str]] = set()


def _writable(loc: str):
    """resolve() for writing: creates the bucket the first time a process writes to it."""
    import pyarrow.fs as pafs

    fs, path = resolve(loc)
    bucket = path.split("/", 1)[0]
    if (loc.split("://", 1)[0], bucket) not in _BUCKETS_SEEN:
        if fs.get_file_info(bucket).type == pafs.FileType.NotFound:
            fs.create_dir(bucket)
        _BUCKETS_SEEN.add((loc.split("://", 1)[0], bucket))
    return fs, path


def _info(loc: str):
    fs, path = resolve(loc)
    return fs.get_file_info(path)


def exists(loc: str | os.PathLike) -> bool:
    if not is_remote(loc):
        return os.path.exists(loc)
    import pyarrow.fs as pafs

    return _info(str(loc)).type != pafs.FileType.NotFound


def is_file(loc: str | os.PathLike) -> bool:
    if not is_remote(loc):
        return os.path.isfile(loc)
    import pyarrow.fs as pafs

    return _info(str(loc)).type == pafs.FileType.File


def is_dir(loc: str | os.PathLike) -> bool:
    """A folder, or for an object store a prefix holding at least one object."""
    if not is_remote(loc):
        return os.path.isdir(loc)
    import pyarrow.fs as pafs

    return _info(str(loc)).type == pafs.FileType.Directory


def size(loc: str | os.PathLike) -> int:
    if not is_remote(loc):
        return os.stat(loc).st_size
    info = _info(str(loc))
    if info.size is None:
        raise FileNotFoundError(str(loc))
    return info.size


def read_bytes(loc: str | os.PathLike) -> bytes:
    if not is_remote(loc):
        with open(loc, "rb") as f:
            return f.read()
    import pyarrow.fs as pafs

    fs, path = resolve(loc)
    try:
        with fs.open_input_stream(path) as f:
            return f.read()
    except FileNotFoundError:
        raise
    except OSError as e:
        if _info(str(loc)).type == pafs.FileType.NotFound:
            raise FileNotFoundError(str(loc)) from e
        raise


def read_text(loc: str | os.PathLike) -> str:
    return read_bytes(loc).decode("utf-8")


def read_json(loc: str | os.PathLike) -> Any:
    return json.loads(read_bytes(loc))


def write_bytes(loc: str | os.PathLike, data: bytes) -> None:
    """Readers see the old content, none, or all of the new one (rename locally, one PUT remotely)."""
    if not is_remote(loc):
        path = Path(loc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return
    fs, path = _writable(str(loc))
    with fs.open_output_stream(path) as f:
        f.write(data)


def write_text(loc: str | os.PathLike, text: str) -> None:
    write_bytes(loc, text.encode("utf-8"))


def write_json(loc: str | os.PathLike, obj: Any) -> None:
    write_text(loc, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def create_exclusive(loc: str | os.PathLike, data: bytes) -> bool:
    """Create loc only if absent; False if it exists. Atomic on local disks (O_EXCL); on an object
    store it is check-then-put, so callers that need a winner must read back (see claims.py)."""
    if not is_remote(loc):
        path = Path(loc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        with open(tmp, "wb") as f:
            f.write(data)
        try:
            os.link(tmp, path)  # fails if path exists: the content appears complete or not at all
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)
    if exists(loc):
        return False
    write_bytes(loc, data)
    return True


def delete(loc: str | os.PathLike) -> None:
    """Remove one file; absent is fine."""
    if not is_remote(loc):
        Path(loc).unlink(missing_ok=True)
        return
    fs, path = resolve(loc)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def delete_tree(loc: str | os.PathLike) -> None:
    if not is_remote(loc):
        shutil.rmtree(loc, ignore_errors=True)
        return
    fs, path = resolve(loc)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def list_dir(loc: str | os.PathLike) -> dict[str, str]:
    """Direct children: name -> 'file' | 'dir'. A missing folder is empty. Hidden temp files
    (names starting with '.') are left out."""
    import pyarrow.fs as pafs

    fs, path = resolve(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return {i.base_name: ("dir" if i.type == pafs.FileType.Directory else "file")
            for i in infos if not i.base_name.startswith(".")}


def list_files(loc: str | os.PathLike, *, recursive: bool = True, hidden: bool = False) -> dict[str, int]:
    """Files below loc: relative posix name -> size in bytes, in one listing call. Names with a
    part starting with '.' (temp files of writes in progress) only if `hidden`."""
    import pyarrow.fs as pafs

    fs, path = resolve(loc)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=recursive))
    prefix = path.rstrip("/") + "/"
    out: dict[str, int] = {}
    for i in infos:
        if i.type != pafs.FileType.File:
            continue
        rel = i.path[len(prefix):] if i.path.startswith(prefix) else i.base_name
        if not hidden and any(part.startswith(".") for part in rel.split("/")):
            continue
        out[rel] = i.size
    return dict(sorted(out.items()))


def sha256(loc: str | os.PathLike) -> str:
    h = hashlib.sha256()
    if not is_remote(loc):
        with open(loc, "rb") as f:
            while chunk := f.read(_CHUNK):
                h.update(chunk)
        return h.hexdigest()
    fs, path = resolve(loc)
    with fs.open_input_stream(path) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def write_parquet(table, loc: str | os.PathLike, **kwargs: Any) -> int:
    """Write a Parquet file so that no reader sees half of it; returns its size in bytes."""
    import pyarrow.parquet as pq

    if not is_remote(loc):
        path = Path(loc)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
        try:
            pq.write_table(table, tmp, **kwargs)
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        return path.stat().st_size
    fs, path = _writable(str(loc))
    # One object: a single PUT or a multipart upload completed at close; both are all-or-nothing.
    pq.write_table(table, path, filesystem=fs, **kwargs)
    return size(loc)


def read_parquet(loc: str | os.PathLike, columns: list[str] | None = None):
    import pyarrow.parquet as pq

    if not is_remote(loc):
        return pq.read_table(loc, columns=columns)
    fs, path = resolve(loc)
    return pq.read_table(path, columns=columns, filesystem=fs)


def parquet_file(loc: str | os.PathLike):
    """A `pyarrow.parquet.ParquetFile` (footer, schema, row groups) for a location."""
    import pyarrow.parquet as pq

    if not is_remote(loc):
        return pq.ParquetFile(loc)
    fs, path = resolve(loc)
    return pq.ParquetFile(fs.open_input_file(path))


def upload_tree(local_dir: str | os.PathLike, loc: str | os.PathLike) -> None:
    """Copy a local folder to loc (overwriting same-named files)."""
    if not os.path.isdir(local_dir):
        return
    if not is_remote(loc):
        shutil.copytree(local_dir, loc, dirs_exist_ok=True)
        return
    for rel in sorted(_local_files(local_dir)):
        put_file(os.path.join(local_dir, rel), join(loc, rel))


def download_tree(loc: str | os.PathLike, local_dir: str | os.PathLike) -> int:
    """Copy every file below loc into local_dir; returns how many."""
    files = list_files(loc, hidden=True)
    for rel in files:
        get_file(join(loc, rel), os.path.join(local_dir, rel))
    return len(files)


def put_file(local: str | os.PathLike, loc: str | os.PathLike) -> None:
    if not is_remote(loc):
        Path(loc).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(local, loc)
        return
    fs, path = _writable(str(loc))
    with open(local, "rb") as src, fs.open_output_stream(path) as dst:
        while chunk := src.read(8 * _CHUNK):
            dst.write(chunk)


def get_file(loc: str | os.PathLike, local: str | os.PathLike) -> None:
    Path(local).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(local).with_name(f".{Path(local).name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        if not is_remote(loc):
            shutil.copyfile(loc, tmp)
        else:
            fs, path = resolve(loc)
            with fs.open_input_stream(path) as src, open(tmp, "wb") as dst:
                while chunk := src.read(8 * _CHUNK):
                    dst.write(chunk)
        os.replace(tmp, local)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _local_files(local_dir: str | os.PathLike) -> list[str]:
    base = Path(local_dir)
    return [p.relative_to(base).as_posix() for p in base.rglob("*") if p.is_file()]


def local_cache_root() -> Path:
    """Where remote artifacts are copied for libraries that need a folder (model loaders)."""
    import tempfile

    root = os.environ.get("KDPIPE_CACHE_DIR")
    return Path(root) if root else Path(tempfile.gettempdir()) / f"kdpipe-cache-{os.getuid()}"


def local_mirror(loc: str) -> Path:
    """A stable local folder for one remote location (same on every call in this machine)."""
    digest = hashlib.sha256(normalize(loc).encode()).hexdigest()[:16]
    return local_cache_root() / f"{basename(loc)}-{digest}"


class FolderSync:
    """Mirror a local folder to a store location while a task stage runs, so its scratch state
    (training checkpoints) survives the loss of the worker. Each pass uploads changed files
    oldest first — a stage that writes its checkpoint and then its state file gets them stored in
    that order — then removes stored files that vanished locally."""

    def __init__(self, local_dir: str | os.PathLike, loc: str, *, interval_s: float = 5.0):
        import threading

        self.local_dir, self.loc, self.interval_s = Path(local_dir), loc, interval_s
        self._seen: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="kdpipe-scratch-sync", daemon=True)

    def pull(self) -> int:
        """Bring the stored copy down (resume); returns how many files."""
        n = download_tree(self.loc, self.local_dir)
        for rel in _local_files(self.local_dir):
            st = (self.local_dir / rel).stat()
            self._seen[rel] = (st.st_mtime_ns, st.st_size)
        return n

    def sync(self) -> None:
        current = {}
        for rel in _local_files(self.local_dir):
            try:
                st = (self.local_dir / rel).stat()
            except FileNotFoundError:
                continue
            current[rel] = (st.st_mtime_ns, st.st_size)
        for rel in sorted((r for r in current if self._seen.get(r) != current[r]), key=lambda r: current[r][0]):
            try:
                put_file(self.local_dir / rel, join(self.loc, rel))
            except FileNotFoundError:
                continue  # removed while we looked: the next pass sees the new state
            self._seen[rel] = current[rel]
        for rel in [r for r in self._seen if r not in current]:
            delete(join(self.loc, rel))
            del self._seen[rel]

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.sync()
            except OSError:
                pass  # a transient store error: the next pass retries

    def __enter__(self) -> "FolderSync":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sync()
