"""Where tests find the shared data: ``../shared/data`` beside the repository root.

Not a test module: tests import it as ``from shared_data import ...`` (tests/ is on ``sys.path``).
A test that needs a shared file calls ``require_shared("corpora/wikitext2/valid.txt")``. On a
developer's clone without the folder the test skips, naming the missing path; in CI
(``CI=true``), where the folder is always provided, a missing file is a failure instead, so a
misplaced data folder can never turn the suite green by skipping.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO_ROOT.parent / "shared" / "data"


def in_ci() -> bool:
    """Whether this run is CI's (it always sets ``CI=true``)."""
    return os.environ.get("CI") == "true"


def require_shared(relative: str) -> Path:
    """``SHARED_DATA / relative`` if it exists; otherwise skip the test (fail it under CI)."""
    path = SHARED_DATA / relative
    if path.exists():
        return path
    message = (
        f"shared data {relative!r} not found: expected {path} "
        "(the shared data folder ../shared/data beside the repository root)"
    )
    if in_ci():
        pytest.fail(f"{message}; CI=true, so this is a failure, not a skip", pytrace=False)
    pytest.skip(message)
