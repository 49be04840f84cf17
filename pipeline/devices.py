"""Device and dtype of model stages: resolved from the config and the placement it asks for.

A stage's numbers depend on where it runs (CUDA kernels and bf16 give other logits than float32
on a CPU), so the resolved pair enters its cache key. Resolution happens at plan time, from the
config alone: `device: auto` means CUDA exactly when the stage asks Ray for a GPU (`num_gpus > 0`),
never "whatever the driver's machine has". On the worker, `worker_device` checks that reality
matches the plan and fails with `DeviceUnavailable` (naming node and stage) when it does not:
a GPU request landing on a node without usable CUDA is an error, not a silent CPU run under a
CUDA key.

No torch import at module level: `plan` must stay cheap.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import model_validator

from pipeline.errors import KdpipeError
from pipeline.stage import ResourceConfig, resolved

DTYPES = ("float32", "float16", "bfloat16")


class DeviceUnavailable(KdpipeError):
    """The worker Ray placed a stage on cannot run it as planned (no CUDA, no bf16)."""

    exit_code = 1


@dataclasses.dataclass(frozen=True)
class Numerics:
    device: Literal["cpu", "cuda"]
    dtype: str  # one of DTYPES

    def as_dict(self) -> dict[str, str]:
        return {"device": self.device, "dtype": self.dtype}

    def __str__(self) -> str:
        return f"{self.device}/{self.dtype}"


class NumericsConfig(ResourceConfig):
    """Config of a stage that runs a torch model: its device and dtype, validated together with
    its GPU request. Both fields are left out of the raw config key: their *resolved* values go in."""

    device: Literal["auto", "cpu", "cuda"] = resolved(
        "auto", description="auto = cuda when num_gpus > 0, else cpu; cuda needs num_gpus > 0")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = resolved(
        "auto", description="auto = bfloat16 on CUDA, float32 on CPU; float16/bfloat16 need CUDA")

    @model_validator(mode="after")
    def _device_matches_request(self) -> "NumericsConfig":
        plan_numerics(self)  # raises ValueError with the fix
        return self


def plan_numerics(cfg: Any) -> Numerics:
    """(device kind, dtype) a worker of this config will use. Pure: config in, Numerics out."""
    gpus = float(getattr(cfg, "num_gpus", 0) or 0)
    device = cfg.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    elif device == "cuda" and gpus <= 0:
        raise ValueError("device: cuda needs num_gpus > 0 (Ray gives a worker a GPU only when it asks for one); "
                         "set num_gpus: 1, or device: auto")
    elif device == "cpu" and gpus > 0:
        raise ValueError(f"device: cpu with num_gpus: {gpus:g} would reserve a GPU and not use it; "
                         "set num_gpus: 0, or device: auto")
    dtype = cfg.dtype
    if dtype == "auto":
        dtype = "bfloat16" if device == "cuda" else "float32"
    elif device == "cpu" and dtype != "float32":
        raise ValueError(f"dtype: {dtype} needs CUDA but this stage runs on CPU (num_gpus: 0); "
                         "use dtype: float32 (or auto), or ask for a GPU with num_gpus: 1")
    return Numerics(device, dtype)


def _where() -> str:
    """This worker's node and what Ray assigned it, for messages (or 'outside Ray')."""
    try:
        import ray

        if ray.is_initialized():
            ctx = ray.get_runtime_context()
            return (f"node {ray.util.get_node_ip_address()} (Ray node {ctx.get_node_id()[:12]}; assigned "
                    f"{ctx.get_assigned_resources()}, GPU ids {ctx.get_accelerator_ids().get('GPU', [])})")
    except Exception:  # messages must not fail
        pass
    return "this machine (outside Ray)"


def worker_device(expected: Numerics, *, stage: str):
    """On the worker: (torch.device, torch.dtype) as planned, or DeviceUnavailable."""
    import torch

    dtype = getattr(torch, expected.dtype)
    if expected.device == "cpu":
        return torch.device("cpu"), dtype
    if not torch.cuda.is_available():
        raise DeviceUnavailable(
            f"stage {stage!r} was planned for CUDA ({expected}) because it asks for a GPU, and Ray placed it on "
            f"{_where()}, but torch there sees no CUDA device (torch {torch.__version__}, CUDA build "
            f"{torch.version.cuda or 'none'}); install a CUDA build of torch on the GPU nodes and check the "
            "driver, or set num_gpus: 0 to run on CPUs")
    if expected.dtype == "bfloat16" and not torch.cuda.is_bf16_supported():
        raise DeviceUnavailable(
            f"stage {stage!r} was planned for bfloat16 on CUDA, but the GPU on {_where()} "
            f"({torch.cuda.get_device_name(0)}) has no bfloat16 support; set dtype: float16 or float32")
    # Ray sets CUDA_VISIBLE_DEVICES to the GPUs it assigned: the first visible one is ours.
    return torch.device("cuda", 0), dtype


def move(obj: Any, device) -> Any:
    """Tensors inside dicts, lists and tuples moved to `device`; everything else unchanged."""
    if hasattr(obj, "to") and hasattr(obj, "device"):
        return obj.to(device)
    if isinstance(obj, dict):
        return {k: move(v, device) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(move(v, device) for v in obj)
    return obj


def autocast(device, dtype):
    """Mixed precision for training on CUDA in a reduced dtype (weights stay float32); a no-op
    context otherwise."""
    import contextlib

    import torch

    if device.type == "cuda" and dtype != torch.float32:
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()

