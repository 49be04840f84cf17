"""Errors the CLI turns into exit codes: bad input is exit 2 and names where and how to fix."""
from __future__ import annotations

from typing import Iterable


class KdpipeError(Exception):
    """A failure a user can act on; printed without a traceback."""

    exit_code = 1


class ManifestError(KdpipeError):
    """One or more problems found before any compute started."""

    exit_code = 2

    def __init__(self, problems: Iterable[object]):
        self.problems = [str(p) for p in problems]
        super().__init__("\n".join(self.problems))


class StageFailed(KdpipeError):
    exit_code = 1
