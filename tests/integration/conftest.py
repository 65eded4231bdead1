"""Everything under tests/integration is ``slow``: real S3, SLURM, multi-process runs or builds.

``pytest -m "not slow"`` then runs the fast unit tests only (tests/unit has a few
``slow`` tests of its own, marked one by one).
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.slow)
