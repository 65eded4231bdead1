"""``train.py``, SIGKILLed right after the checkpoint of step ``$VAE_TEST_KILL_AFTER_STEP`` committed.

Test-only fault injection (the library has no such hook): it wraps
``CheckpointManager.save`` so that, once that step is committed locally and its
upload to S3 has finished on every rank, each rank SIGKILLs its launcher
(torchrun) and then itself -- a preemption with no chance to clean up.
Run it like ``train.py``: ``torchrun ... tests/integration/train_kill_after_save.py --config ...``.
"""

import os
import runpy
import signal
from pathlib import Path

from vae_train import checkpoint, distributed

KILL_AFTER = int(os.environ["VAE_TEST_KILL_AFTER_STEP"])
_original_save = checkpoint.CheckpointManager.save


def _save_then_die(self, step, *, final=False):
    path = _original_save(self, step, final=final)
    if step == KILL_AFTER:
        self.wait_for_uploads(120)
        distributed.barrier()
        os.kill(os.getppid(), signal.SIGKILL)
        os.kill(os.getpid(), signal.SIGKILL)
    return path


checkpoint.CheckpointManager.save = _save_then_die
os.chdir(Path(__file__).resolve().parents[2])
runpy.run_path("train.py", run_name="__main__")
