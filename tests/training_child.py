"""Runs one trainer stage in a process of its own, for the kill -9 tests of test_training_core:
    python training_child.py SPEC.json
SPEC: {"stage": "module:Class", "config": {...}, "inputs": {role: [artifact dirs]}, "tmp": dir,
"name": context name, "seed": int, "delay": seconds to sleep before each update (0 = none)}.
Writes <tmp>/<name>-summary.json when the stage returns."""
from __future__ import annotations

import importlib
import json
import sys
import time
from pathlib import Path


def main(spec_file: str) -> None:
    import torch

    from pipeline.artifact import Artifact
    from pipeline.testing import make_context

    torch.set_num_threads(1)
    spec = json.loads(Path(spec_file).read_text())
    if spec.get("delay"):
        import kd.training as training

        update = training._update

        def slow_update(*args, **kwargs):  # gives the parent time to kill mid-training
            time.sleep(spec["delay"])
            return update(*args, **kwargs)

        training._update = slow_update
    module, cls = spec["stage"].split(":")
    stage_cls = getattr(importlib.import_module(module), cls)
    stage = stage_cls(config=stage_cls.Config(**spec["config"]))
    inputs = {role: [Artifact(p) for p in paths] for role, paths in spec["inputs"].items()}
    ctx = make_context(Path(spec["tmp"]), inputs=inputs, name=spec["name"], seed=spec.get("seed", 0))
    summary = stage.run(ctx)
    (Path(spec["tmp"]) / f"{spec['name']}-summary.json").write_text(json.dumps(summary, default=str))


if __name__ == "__main__":
    main(sys.argv[1])
