"""Can the cluster ever hold a stage's workers? Pure logic over the request and the nodes' totals
(the executor passes `ray.nodes()` in), so a run whose request no node can satisfy fails before
anything is written, with a message that names what is missing:

    label asks 1 GPU per actor; the cluster has 0 GPUs

A request the cluster could satisfy later (resources busy) is bounded by `ray.placement_timeout`
in the executor instead; with `ray.autoscaler: true` an unplaceable request waits for that
timeout too, since new nodes may come.
"""
from __future__ import annotations

from typing import Any, Iterable

from pipeline.errors import KdpipeError

# Stage resource names (Ray option names) -> Ray resource names.
RAY_NAMES = {"num_cpus": "CPU", "num_gpus": "GPU", "memory": "memory"}


class PlacementError(KdpipeError):
    """A stage's workers cannot be placed (never, or not within placement_timeout)."""

    exit_code = 1


def amount(resource: str, value: float) -> str:
    """'1 GPU', '0 GPUs', '0.5 GPU', '2 CPUs', '4.0 GiB memory'."""
    if resource == "memory":
        return f"{value / 2**30:.1f} GiB memory"
    text = f"{value:g} {resource}"
    return text if value == 1 or 0 < value < 1 else text + "s"


def worker_noun(kind: str) -> str:
    return "actor" if kind == "map" else "task"


def _wanted(res: dict[str, float]) -> dict[str, float]:
    return {RAY_NAMES[k]: float(v) for k, v in res.items() if k in RAY_NAMES and v}


def unplaceable(stage: str, res: dict[str, float], nodes: Iterable[dict[str, Any]], *, kind: str) -> str | None:
    """Why no alive node can ever hold one worker of `stage`, or None when one can.
    `nodes`: the `Resources` totals of alive nodes."""
    nodes = list(nodes)
    wanted = _wanted(res)
    if any(all(node.get(k, 0) >= v for k, v in wanted.items()) for node in nodes):
        return None
    per = worker_noun(kind)
    missing, why = [], []
    for k, v in wanted.items():
        total = sum(node.get(k, 0) for node in nodes)
        largest = max((node.get(k, 0) for node in nodes), default=0)
        if total < v:
            missing.append(amount(k, v))
            why.append(f"the cluster has {amount(k, total)}")
        elif largest < v:
            missing.append(amount(k, v))
            why.append(f"no node has {amount(k, v)} (the largest has {amount(k, largest)})")
    if not missing:  # each resource exists somewhere, never together on one node
        missing = [amount(k, v) for k, v in wanted.items()]
        shapes = "; ".join(", ".join(amount(k, node.get(k, 0)) for k in wanted) for node in nodes)
        why.append(f"no node has them together (nodes: {shapes})")
    fix = ", ".join(k for k in res if k in RAY_NAMES and RAY_NAMES[k] in wanted)
    return (f"{stage} asks {' and '.join(missing)} per {per}; {'; '.join(why)}. Lower {fix} in stage "
            f"{stage!r}'s config, or add nodes that have them (with an autoscaler, set ray.autoscaler: true)")


def timed_out(stage: str, res: dict[str, float], *, kind: str, timeout: float, available: dict[str, Any]) -> str:
    """The message when no worker of `stage` was placed within `timeout` seconds."""
    wanted = _wanted(res)
    asks = " and ".join(amount(k, v) for k, v in wanted.items())
    free = ", ".join(amount(k, float(available.get(k, 0))) for k in wanted)
    return (f"{stage}: no {worker_noun(kind)} was placed within ray.placement_timeout = {timeout:g} s; "
            f"it asks {asks} per {worker_noun(kind)} and the cluster has {free} free now (other work holds "
            "the rest, or nodes are still joining). Free or add resources, or raise ray.placement_timeout")
