"""Ray starts its workers at niceness +15 (raylet `worker_niceness`), so on a busy machine every
other process, the driver and Ray's own daemons included, preempts the teacher: the label stage's
model time was 0.55x the same forward in the driver under load (BENCHMARKS.md, label profile).
kdpipe's embedded Ray runs its workers at the driver's priority."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPT = """
import os, sys, tempfile
sys.path.insert(0, {repo!r})
import ray
from pipeline.executor import init_ray

assert init_ray(address=None, num_cpus=1, temp_dir=tempfile.mkdtemp(prefix="kdnice", dir="/tmp"))

@ray.remote(num_cpus=1)
class Actor:
    def niceness(self):
        return os.nice(0)

@ray.remote(num_cpus=1)
def task():
    return os.nice(0)

actor = Actor.remote()
print("driver", os.nice(0), "actor", ray.get(actor.niceness.remote()))
ray.kill(actor)
print("task", ray.get(task.remote()))
ray.shutdown()
"""


@pytest.mark.ray
@pytest.mark.slow
def test_embedded_ray_workers_run_at_the_drivers_priority(tmp_path):
    out = subprocess.run([sys.executable, "-c", SCRIPT.format(repo=str(REPO))], capture_output=True, text=True,
                         timeout=600, cwd=tmp_path, env={**__import__("os").environ, "RAY_AUTH_MODE": "disabled"})
    assert out.returncode == 0, out.stderr[-2000:]
    words = out.stdout.split()
    values = {words[i]: int(words[i + 1]) for i in range(0, len(words) - 1, 2) if words[i] in ("driver", "actor", "task")}
    assert values["actor"] == values["driver"] and values["task"] == values["driver"], values
