"""Shared fixtures: offline Hugging Face, one local Ray session per test run, tiny corpora."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parent.parent
SHARED_DATA = Path(os.environ.get("KDPIPE_SHARED_DATA", REPO.parent / "shared" / "data"))


def shared_data(*parts: str) -> Path:
    """A file under ../shared/data, or skip the test saying what is missing."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real data not found at {path} (set KDPIPE_SHARED_DATA to its folder)")
    return path


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models gain nothing from threads, and on a shared machine OpenMP spin-waiting makes
    two threads ~20x slower than one. Test modules opt in with
    `pytestmark = pytest.mark.usefixtures("one_torch_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def ray_session():
    """One embedded Ray for the whole test run (start-up costs ~5 s); short temp dir for sockets."""
    import ray

    if not ray.is_initialized():
        tmp = tempfile.mkdtemp(prefix="kdr", dir="/tmp")
        ray.init(num_cpus=2, include_dashboard=False, _temp_dir=tmp, logging_level="WARNING")
    yield ray
    ray.shutdown()


@pytest.fixture
def sentiment_tsv(tmp_path: Path) -> Path:
    """A small labeled TSV in the GLUE SST-2 layout."""
    pos = ["a warm , funny and touching film", "the cast is terrific", "an absolute joy to watch",
           "smart and beautifully made", "one of the best films of the year", "i loved every minute of it"]
    neg = ["a dull , lifeless mess", "the plot makes no sense", "painfully boring from start to finish",
           "the worst acting i have seen", "a waste of a good cast", "i wanted my money back"]
    lines = ["sentence\tlabel"]
    for i in range(20):
        lines.append(f"{pos[i % len(pos)]} {i}\t1")
        lines.append(f"{neg[i % len(neg)]} {i}\t0")
    path = tmp_path / "sample.tsv"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


from s3 import s3_server, s3_workdir  # noqa: E402,F401  (fixtures: a moto S3 server on loopback)
