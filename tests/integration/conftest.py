"""Everything under tests/integration is ``slow``: real S3, SLURM, multi-process runs or builds.

``pytest -m "not slow"`` then runs the fast unit tests only (tests/unit has a few
``slow`` tests of its own, marked one by one). The session fixture
``reference_weights`` is the uninterrupted run the fault and resume tests compare with.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def reference_weights(fashion_shards: Path, tmp_path_factory: pytest.TempPathFactory):
    """``stage -> final weights`` of the uninterrupted reference run of ``trainer_runs.REFERENCE``.

    Each stage is trained once per session, on first use: the fault tests
    (test_trainer_faults.py) and the SIGKILL/resume tests (test_checkpoint_e2e.py)
    compare against the same run instead of each training their own (the suite's time).
    """
    from tests.integration.trainer_runs import REFERENCE, ok, start_train, weights

    cache: dict[int, dict] = {}

    def get(stage: int) -> dict:
        if stage not in cache:
            run = tmp_path_factory.mktemp(f"reference-zero{stage}") / "run"
            ok(start_train(fashion_shards, run, *REFERENCE.overrides(stage)))
            cache[stage] = weights(run / "checkpoints" / f"step-{REFERENCE.steps:08d}")
        return cache[stage]

    return get
