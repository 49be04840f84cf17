"""Shared set-up of the benchmark scripts: import kdpipe from this checkout, run offline, and use
an embedded Ray without token auth. Imported first by every script in bench/.

Also the two options every bench takes, with one meaning everywhere:
  --scale S   a fraction in (0, 1] of that bench's full-size run (its docstring says what 1 is)
  --json P    also write the figures as JSON to P (bench/run_all.py collects these)
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
for _var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
    os.environ.setdefault(_var, "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# The real data sets (as in tests/conftest.py): ../shared/data unless KDPIPE_SHARED_DATA names another folder.
SHARED_DATA = Path(os.environ.get("KDPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))
SST2_TRAIN = SHARED_DATA / "sst2" / "train.tsv"


def scale_fraction(text: str, *, full_rows: int | None = None) -> float:
    """argparse type of --scale: a fraction in (0, 1]; anything else names the fix."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--scale must be a number in (0, 1], got {text!r}") from None
    if not 0 < value <= 1:
        hint = ""
        if value > 1 and full_rows:
            hint = f"; for {value:g} of the full run's {full_rows:,} rows give --scale {min(1.0, value / full_rows):.4g}"
        raise argparse.ArgumentTypeError(
            f"--scale is a fraction in (0, 1] of the full-size run (1 = the documented run), got {text}{hint}")
    return value


def add_bench_args(parser: argparse.ArgumentParser, *, default_scale: float, full: str,
                   full_rows: int | None = None) -> None:
    """--scale and --json, the same in every bench; `full` says what --scale 1 is."""
    def scale_type(text: str) -> float:
        return scale_fraction(text, full_rows=full_rows)

    scale_type.__name__ = "scale"  # argparse names the type in its error messages
    parser.add_argument("--scale", type=scale_type, default=default_scale,
                        help=f"fraction in (0, 1] of the full-size run ({full}); default {default_scale}")
    parser.add_argument("--json", type=Path, default=None, help="also write the figures to this JSON file")


def scaled(full: int, scale: float, *, minimum: int = 1) -> int:
    """round(full x scale), at least `minimum` and at most `full`."""
    return max(minimum, min(full, round(full * scale)))


def write_json(path: Path | None, result: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, sort_keys=True, default=str) + "\n", encoding="utf-8")
