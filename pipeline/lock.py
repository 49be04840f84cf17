"""One writer per workdir: a second `kdpipe run` on the same workdir waits, then finds the first
run's artifacts complete and reuses them instead of writing the same shards twice."""
from __future__ import annotations

import fcntl
import os
import sys
from pathlib import Path


class WorkdirLock:
    def __init__(self, workdir: Path):
        self.path = Path(workdir) / ".kdpipe" / "lock"
        self._fd: int | None = None

    def __enter__(self) -> "WorkdirLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"waiting for another kdpipe run holding {self.path} ...", file=sys.stderr, flush=True)
            fcntl.flock(self._fd, fcntl.LOCK_EX)
        os.ftruncate(self._fd, 0)
        os.write(self._fd, f"{os.getpid()}\n".encode())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
