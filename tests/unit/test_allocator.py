"""glibc keeps freed memory once ``keep_freed_memory`` ran, and a user's own malloc settings win.

Each case runs in a fresh interpreter: the thresholds are process-wide and cannot be
unset, and the heap must start from what a command would see. The probe allocates
64 x 1 MiB blocks through libc, frees them, and reads the heap's size with glibc's
``mallinfo2``: a trimmed heap shrinks back, a kept one stays at least 64 MiB.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

PROBE = r"""
import ctypes, json, sys
from vae_train.allocator import keep_freed_memory

class MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in
                ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks", "keepcost")]

libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
libc.mallinfo2.restype = MallInfo2
applied = keep_freed_memory() if sys.argv[1] == "call" else None
blocks = [libc.malloc(2**20) for _ in range(64)]
ctypes.memset(blocks[-1], 1, 2**20)
held = libc.mallinfo2()
for block in reversed(blocks):
    libc.free(block)
after = libc.mallinfo2()
print(json.dumps({"applied": applied, "heap_held": held.arena + held.hblkhd, "heap_after": after.arena + after.hblkhd}))
"""

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc is what is tuned")


def _probe(mode: str, **env: str) -> dict:
    environ = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES" and not k.startswith("MALLOC_")}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], cwd=REPO, env={**environ, **env},
                          capture_output=True, text=True, timeout=60, check=True)
    return json.loads(done.stdout)


def test_freed_memory_stays_in_the_process() -> None:
    plain, kept = _probe("skip"), _probe("call")
    assert plain["heap_held"] >= 64 * 2**20 and kept["heap_held"] >= 64 * 2**20
    assert plain["heap_after"] < 16 * 2**20, "glibc's default should hand the freed blocks back"
    assert kept["applied"] is True
    assert kept["heap_after"] >= 64 * 2**20, "the freed blocks should stay in the heap for reuse"


@pytest.mark.parametrize("env", [{"MALLOC_TRIM_THRESHOLD_": "131072"},
                                 {"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=131072"}])
def test_a_users_malloc_settings_are_left_alone(env: dict[str, str]) -> None:
    probe = _probe("call", **env)
    assert probe["applied"] is False
    assert probe["heap_after"] < 16 * 2**20  # the user's 128 KiB trim threshold is what glibc followed
