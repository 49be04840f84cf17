"""Claims: which run is writing which artifact, and which artifacts live runs use — stored in the
workdir itself, so they work on an object store shared by machines with no common disk.

    <workdir>/claims/runs/<owner>.json             a run's lease: every artifact it reads or writes
    <workdir>/claims/writers/<type>.<key>.json     the one run computing this artifact now
    <workdir>/claims/gc.json                       a `kdpipe gc` in progress

Every claim names its owner (host, pid, run) and an expiry `expires_at`; a heartbeat thread
renews them every TTL/4 (TTL: env KDPIPE_CLAIM_TTL_S, default 60 s). A claim whose expiry passed,
or whose owner is a dead process on this host, is void and may be taken over: a killed run never
blocks the next one for longer than the TTL (on its own host, not at all). Clocks of the machines
sharing a workdir must agree to well within the TTL.

What they give:
* two runs that need the same artifact never both compute it: the second waits for the writer
  claim, then finds the artifact complete (or resumes what a dead owner left);
* runs that need *different* artifacts never wait for each other (no workdir-wide lock), so a
  sweep of students over one label artifact trains in parallel;
* `gc` deletes nothing a live run reads or writes. gc first takes claims/gc.json, then reads
  the run leases; a run first writes its lease, then waits while a gc claim is live. Whichever
  order they interleave in, either gc sees the lease or the run waits for gc to finish.

Creating a claim is exclusive on a local disk (O_EXCL link). On an object store without
conditional writes it is write-then-read-back after a short settle delay: two runs racing within
that window could both believe they won; the artifact stays correct (shard writes are
idempotent, the manifest is written last), only work may be duplicated.
"""
from __future__ import annotations

import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Callable

from pipeline import storage

DEFAULT_TTL_S = 60.0
SETTLE_S = 0.3  # object stores: wait this long before reading a freshly written claim back


def claim_ttl() -> float:
    value = os.environ.get("KDPIPE_CLAIM_TTL_S")
    try:
        return max(1.0, float(value)) if value else DEFAULT_TTL_S
    except ValueError:
        raise ValueError(f"KDPIPE_CLAIM_TTL_S={value!r} is not a number of seconds") from None


def claims_root(workdir: str) -> str:
    return storage.join(storage.normalize(workdir), "claims")


def artifact_id(art_loc: str) -> str:
    """`<type>/<key>` of an artifact location."""
    return f"{storage.basename(storage.parent(art_loc))}/{storage.basename(art_loc)}"


def is_live(claim: dict[str, Any] | None, *, now: float | None = None) -> bool:
    if not claim:
        return False
    if float(claim.get("expires_at", 0)) <= (now if now is not None else time.time()):
        return False
    if claim.get("host") == socket.gethostname() and isinstance(claim.get("pid"), int):
        try:
            os.kill(claim["pid"], 0)
        except ProcessLookupError:
            return False  # its process is gone: no need to wait for the expiry
        except PermissionError:
            pass
    return True


def _read(loc: str) -> dict[str, Any] | None:
    try:
        return json.loads(storage.read_bytes(loc))
    except (OSError, ValueError):
        return None


class Claims:
    """One run's (or one gc's) claims on a workdir; use as a context manager."""

    def __init__(self, workdir: str, *, run: str, ttl_s: float | None = None,
                 log: Callable[[str], None] | None = None):
        self.root = claims_root(workdir)
        self.run = run
        self.ttl = ttl_s or claim_ttl()
        self.owner = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.uses: set[str] = set()
        self.held: set[str] = set()  # claim locations this owner holds (writers, gc)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- lease bodies -------------------------------------------------------------------------
    def _body(self, **extra: Any) -> bytes:
        return json.dumps({"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                           "run": self.run, "expires_at": time.time() + self.ttl, **extra},
                          sort_keys=True).encode()

    @property
    def lease_loc(self) -> str:
        return storage.join(self.root, "runs", f"{self.owner}.json")

    def writer_loc(self, art_loc: str) -> str:
        return storage.join(self.root, "writers", artifact_id(art_loc).replace("/", ".") + ".json")

    @property
    def gc_loc(self) -> str:
        return storage.join(self.root, "gc.json")

    # --- lifecycle ----------------------------------------------------------------------------
    def __enter__(self) -> "Claims":
        self._thread = threading.Thread(target=self._heartbeat, name="kdpipe-claims", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        for loc in list(self.held):
            self._release(loc)
        if self.uses:
            storage.delete(self.lease_loc)

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self._renew()
            except OSError as e:
                self.log(f"claims: could not renew leases in {self.root} ({e}); retrying")

    def _renew(self) -> None:
        with self._lock:
            if self.uses:
                storage.write_bytes(self.lease_loc, self._body(uses=sorted(self.uses)))
            for loc in list(self.held):
                current = _read(loc)
                if current and current.get("owner") != self.owner and is_live(current):
                    self.log(f"claims: {loc} was taken over by {current.get('owner')} "
                             f"(this run missed its heartbeats for over {self.ttl:.0f} s)")
                    self.held.discard(loc)
                    continue
                storage.write_bytes(loc, self._body())

    # --- what this run uses (gc keeps it) -------------------------------------------------------
    def declare(self, art_locs: list[str]) -> None:
        """Record every artifact this run reads or writes in its lease (before planning on it)."""
        with self._lock:
            self.uses.update(artifact_id(loc) for loc in art_locs)
            storage.write_bytes(self.lease_loc, self._body(uses=sorted(self.uses)))

    def wait_for_gc(self) -> bool:
        """Block while a live gc runs; True if it had to wait (the caller re-plans)."""
        waited = False
        while is_live(_read(self.gc_loc)):
            if not waited:
                self.log(f"waiting for `kdpipe gc` ({self.gc_loc}) to finish ...")
            waited = True
            time.sleep(min(1.0, self.ttl / 4))
        return waited

    # --- exclusive claims ---------------------------------------------------------------------
    def _try_take(self, loc: str) -> dict[str, Any] | None:
        """Take loc if free or void; None on success, else the live claim in the way."""
        current = _read(loc)
        if is_live(current) and current.get("owner") != self.owner:
            return current
        body = self._body()
        if current is None and not storage.is_remote(loc):
            if not storage.create_exclusive(loc, body):
                return _read(loc) or {"owner": "?"}
        else:
            storage.write_bytes(loc, body)
        if storage.is_remote(loc):
            time.sleep(SETTLE_S)
        after = _read(loc)
        if not after or after.get("owner") != self.owner:
            return after or {"owner": "?"}
        with self._lock:
            self.held.add(loc)
        return None

    def acquire(self, loc: str, *, what: str) -> bool:
        """Wait until this owner holds the claim at loc; True if it had to wait for another."""
        waited = False
        while True:
            other = self._try_take(loc)
            if other is None:
                return waited
            if not waited:
                self.log(f"waiting: {what} is held by run {other.get('run')!r} ({other.get('owner')}) ...")
            waited = True
            time.sleep(min(1.0, self.ttl / 4))

    def acquire_writer(self, art_loc: str) -> bool:
        return self.acquire(self.writer_loc(art_loc), what=f"artifact {artifact_id(art_loc)}")

    def release_writer(self, art_loc: str) -> None:
        self._release(self.writer_loc(art_loc))

    def _release(self, loc: str) -> None:
        with self._lock:
            if loc not in self.held:
                return
            self.held.discard(loc)
        current = _read(loc)
        if current is None or current.get("owner") == self.owner:
            storage.delete(loc)


def live_uses(workdir: str) -> dict[str, str]:
    """Artifacts (`type/key`) used or being written by live runs -> the run's name."""
    root = claims_root(workdir)
    now = time.time()
    out: dict[str, str] = {}
    for name in storage.list_files(storage.join(root, "runs"), recursive=False):
        lease = _read(storage.join(root, "runs", name))
        if is_live(lease, now=now):
            for art in lease.get("uses", []):
                out[art] = lease.get("run", "?")
    for name in storage.list_files(storage.join(root, "writers"), recursive=False):
        claim = _read(storage.join(root, "writers", name))
        if is_live(claim, now=now):
            out[name[:-len(".json")].replace(".", "/", 1)] = claim.get("run", "?")
    return out
