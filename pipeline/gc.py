"""`kdpipe gc`: delete what nothing keeps — artifacts no run alias points to and no live run uses,
then stored models (pipeline/model_store.py) that no remaining artifact loaded.

An artifact records the stored models its stage loaded in its manifest.json (`models`: name ->
digest, written by the executor). A stored model goes only when every artifact gc keeps says
which models it loaded and none names it. Everything under models/ is kept instead when

* a live run holds a claim (pipeline/claims.py): it may be storing a model or about to load one
  before its artifact records it;
* a kept artifact cannot say what it loaded: no readable manifest.json, or one written before
  artifacts recorded `models` by a stage type that loads outside models.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from pipeline import storage
from pipeline.artifact import Artifact, list_aliases
from pipeline.claims import Claims, artifact_id, live_uses


@dataclass
class GcResult:
    removed: list[str] = field(default_factory=list)  # locations deleted (dry run: that would be)
    freed: int = 0  # bytes
    # why nothing under models/ was collected, when something made gc keep them all
    models_kept_because: str | None = None


def collect_garbage(workdir: str, *, dry_run: bool, log: Callable[[str], None] = print) -> GcResult:
    """Delete (or, dry_run, list) unreferenced artifacts and stored models."""
    root = storage.normalize(workdir)
    result = GcResult()
    with Claims(root, run="gc") as claims:
        claims.acquire(claims.gc_loc, what="`kdpipe gc` on this workdir")
        kept = {artifact_id(a.loc): a for stages in list_aliases(root).values() for a in stages.values()}
        in_use = live_uses(root)  # read after taking the gc claim: see claims.py
        _collect_artifacts(root, kept, in_use, result, dry_run=dry_run, log=log)
        _collect_models(root, list(kept.values()), in_use, result, dry_run=dry_run, log=log)
    log(f"{'would free' if dry_run else 'freed'} {result.freed / 1e6:.1f} MB")
    return result


def _remove(loc: str, result: GcResult, *, dry_run: bool, log: Callable[[str], None]) -> None:
    size = sum(storage.list_files(loc, hidden=True).values())
    log(f"{'would remove' if dry_run else 'removing'} {loc} ({size / 1e6:.1f} MB)")
    if not dry_run:
        # manifest.json marks an artifact or a stored model complete: it goes first, so a gc
        # interrupted mid-delete leaves something incomplete (recomputed / stored again), never a
        # complete-looking copy with files missing
        storage.delete(storage.join(loc, "manifest.json"))
        storage.delete_tree(loc)
    result.removed.append(loc)
    result.freed += size


def _collect_artifacts(root: str, kept: dict[str, Artifact], in_use: dict[str, str], result: GcResult, *,
                       dry_run: bool, log: Callable[[str], None]) -> None:
    arts_root = storage.join(root, "artifacts")
    for type_key, kind in storage.list_dir(arts_root).items():
        if kind != "dir":
            continue
        for key, sub in storage.list_dir(storage.join(arts_root, type_key)).items():
            ident = f"{type_key}/{key}"
            if sub != "dir" or ident in kept:
                continue
            loc = storage.join(arts_root, type_key, key)
            if ident in in_use:
                log(f"keeping {loc}: in use by running `kdpipe run` {in_use[ident]!r}")
                continue
            _remove(loc, result, dry_run=dry_run, log=log)


def _collect_models(root: str, kept: list[Artifact], in_use: dict[str, str], result: GcResult, *,
                    dry_run: bool, log: Callable[[str], None]) -> None:
    models_root = storage.join(root, "models")
    stored = [name for name, kind in sorted(storage.list_dir(models_root).items()) if kind == "dir"]
    if not stored:
        return
    referenced: set[str] = set()
    if in_use:
        run = sorted(set(in_use.values()))[0]
        result.models_kept_because = f"`kdpipe run` {run!r} is live (it may be storing one or about to load one)"
    for art in [] if in_use else sorted(kept, key=lambda a: a.loc):
        models = loaded_models(art)
        if models is None:
            result.models_kept_because = (f"{art.loc} does not record which stored models it loaded "
                                          "(no readable manifest.json, or written by an older kdpipe)")
            break
        referenced |= models
    if result.models_kept_because:
        log(f"keeping every stored model under {models_root}: {result.models_kept_because}")
        return
    for digest in stored:
        if digest not in referenced:
            _remove(storage.join(models_root, digest), result, dry_run=dry_run, log=log)


def loaded_models(art: Artifact) -> set[str] | None:
    """Digests of the stored models an artifact's stage loaded; None when it cannot tell."""
    try:
        manifest = art.manifest
    except (OSError, ValueError):
        # an alias to an artifact deleted by hand loaded nothing; a partial one cannot tell
        return None if storage.list_files(art.loc, hidden=True) else set()
    if isinstance(manifest.get("models"), dict):
        return set(manifest["models"].values())
    return None if _loads_outside_models(manifest.get("type")) else set()


def _loads_outside_models(type_key: str | None) -> bool:
    from pipeline.registry import get_stage_class
    from pipeline.stage import Stage

    try:
        cls = get_stage_class(type_key or "")
    except (KeyError, TypeError, ImportError):
        return True  # unknown type: it may have
    return cls.external_models is not Stage.external_models
