"""`manifests/lm-distill.yaml` end to end through `kdpipe run` (real Ray, real stages) on tiny
files laid out like ../shared/data, then `kdpipe inspect` and README's pandas snippet on it."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from factories import DEFAULT_SENTENCES

REPO = Path(__file__).resolve().parent.parent
TINY = {"teacher_docs": 40, "sst2_docs": 20, "vocab_size": 90, "teacher_d_model": 16, "teacher_layers": 1,
        "teacher_epochs": 1, "student_d_model": 8, "student_layers": 1, "student_epochs": 1, "max_length": 24,
        "rows_per_shard": 16, "new_tokens": 12}


def _tiny_data(root: Path) -> Path:
    """multi30k/{train,val}.en and sst2/train.tsv, the files the manifest reads."""
    (root / "multi30k").mkdir(parents=True)
    (root / "sst2").mkdir()
    lines = [f"{s} {i}" for i, s in enumerate(DEFAULT_SENTENCES * 4)]
    lines[3] = " ".join(DEFAULT_SENTENCES)  # one document longer than max_length: several windows
    (root / "multi30k" / "train.en").write_text("\n".join(lines[:40]) + "\n")
    (root / "multi30k" / "val.en").write_text("\n".join(lines[40:50]) + "\n")
    (root / "sst2" / "train.tsv").write_text("sentence\tlabel\n" + "".join(f"{s}\t1\n" for s in lines[:20]))
    return root


def _readme_pandas_snippet() -> str:
    section = (REPO / "README.md").read_text().split("## Distil a causal LM", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_lm_distill_manifest_runs_end_to_end_and_its_labels_inspect(tmp_path):
    data = _tiny_data(tmp_path / "shared")
    ray_tmp = f"/tmp/kdm{os.getpid()}"
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONPATH": str(REPO), "KDPIPE_RAY_TMPDIR": ray_tmp}
    variables = [arg for name, value in {"data": data, **TINY}.items() for arg in ("--var", f"{name}={value}")]
    cmd = [sys.executable, "-m", "pipeline.cli", "run", str(REPO / "manifests" / "lm-distill.yaml"), *variables,
           "--workdir", str(tmp_path / "data"), "--no-progress", "--summary-json", str(tmp_path / "summary.json")]
    try:
        proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1100)
    finally:
        import shutil

        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    stages = {s["name"]: s["status"] for s in summary["stages"]}
    assert set(stages.values()) == {"ran"}
    assert {"teacher", "labels_topk8", "labels_topk64", "labels_sampled", "student_ce", "student_topk8",
            "student_topk64", "student_sampled", "generated", "student_seqkd"} <= set(stages)

    runs = tmp_path / "data" / "runs" / "lm-distill"
    for student in ("student_ce", "student_topk8", "student_topk64", "student_sampled", "student_seqkd"):
        metrics = json.loads((runs / student / "files" / "metrics.json").read_text())
        assert metrics["heldout"]["tokens"] > 0 and metrics["heldout"]["perplexity"] > 1
    assert json.loads((runs / "student_sampled" / "files" / "metrics.json").read_text())["targets"] == "sampled"
    assert json.loads((runs / "student_seqkd" / "files" / "metrics.json").read_text())["targets"] == "text"
    import pandas as pd

    generated = pd.read_parquet(runs / "generated" / "shards")
    assert len(generated) == 40 and (generated.completion.str.len() > 0).all()
    assert (generated.target_start == 2).all()  # start + 2 prompt tokens: the completion is the target

    for labels, mode, k in (("labels_topk8", "topk", 8), ("labels_sampled", "sampled", 12)):
        shown = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", f"lm-distill/{labels}", "--workdir",
                                str(tmp_path / "data")], cwd=tmp_path, env=env, capture_output=True, text=True,
                               timeout=300, check=True).stdout
        line = next(x for x in shown.splitlines() if x.startswith("token distributions:"))
        assert f"mode {mode}, k {k}" in line and "bytes/token on disk" in line and "KL(full || rebuilt)" in line
        assert float(re.search(r"([\d.]+) bytes/token", line).group(1)) > 0

    shown = subprocess.run([sys.executable, "-m", "pipeline.cli", "inspect", "lm-distill/generated", "--workdir",
                            str(tmp_path / "data")], cwd=tmp_path, env=env, capture_output=True, text=True,
                           timeout=300, check=True).stdout
    assert '"completions": 40' in shown and "ended_with_eos" in shown

    # README's "Distil a causal LM" snippet, verbatim, from a folder whose data/ is this workdir.
    run = subprocess.run([sys.executable, "-c", _readme_pandas_snippet()], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    pairs = re.findall(r"\(np\.uint\d+\((\d+)\), np\.uint8\((\d+)\)\)", run.stdout.splitlines()[-1])
    draws = [int(count) for _, count in pairs]
    assert sum(draws) == 12  # the draws at the first position of a sampled row
