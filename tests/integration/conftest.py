"""Everything under tests/integration is ``slow``: real S3, SLURM, multi-process runs or builds.

``pytest -m "not slow"`` then runs the fast unit tests only (tests/unit has a few
``slow`` tests of its own, marked one by one). The session fixture
``reference_run`` is the uninterrupted run the fault and resume tests compare with.
"""

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in item.path.resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def reference_run(fashion_shards: Path, s3_server, tmp_path_factory: pytest.TempPathFactory):
    """``stage -> Reference``: the uninterrupted run of ``trainer_runs.REFERENCE`` at that ZeRO stage.

    Each stage is trained once per session, on first use: the fault tests
    (test_trainer_faults.py) and the SIGKILL/resume tests (test_checkpoint_e2e.py)
    compare against the same run instead of each training their own, and the
    run's checkpoints, committed to ``s3://BUCKET/run`` (a bucket of its own),
    serve the test that tampers with a complete remote history (the suite's time).
    """
    from tests.integration.trainer_runs import REFERENCE, Reference, ok, start_train, weights

    made: dict[int, Reference] = {}

    def get(stage: int) -> Reference:
        if stage not in made:
            run = tmp_path_factory.mktemp(f"reference-zero{stage}") / "run"
            bucket = s3_server.new_bucket()
            ok(start_train(fashion_shards, run, *REFERENCE.overrides(stage), f"checkpoint.remote=s3://{bucket}/run",
                           env=s3_server.env()))
            made[stage] = Reference(weights(run / "checkpoints" / f"step-{REFERENCE.steps:08d}"), bucket)
        return made[stage]

    return get
