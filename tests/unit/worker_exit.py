"""How the torchrun workers of the unit tests end: tear the process group down, then leave without the
interpreter's finalization.

Why not a plain exit: the DeepSpeed engine (alive until the interpreter ends) holds the
gloo process groups, so ``destroy_process_group()`` does not join gloo's worker threads
(the core below still had them running), and one of them may
still be dropping the last reference to a finished collective while the interpreter
finalizes. Its tensor then needs the GIL, the finalizing interpreter ends the thread,
and the unwind through C++ calls ``std::terminate`` (a core of an aborted rank showed
exactly that: ``ProcessGroupGloo::runLoop`` -> ``~AsyncAllreduceWork`` ->
``decref_pyobject`` -> ``take_gil`` -> ``pthread_exit``; PyTorch issue 190489). About
one run in 30 of these short workers aborted so (5 of ~140), after their results were printed.
"""

import os
import sys

import torch.distributed as dist


def exit_after_teardown() -> None:
    """Destroy the process group, flush what the worker printed, and exit 0 at once."""
    dist.destroy_process_group()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
