"""Build and load the fused op's C++/CUDA extension (``torch.utils.cpp_extension`` + ninja).

The extension is compiled once per user and cached; every later process only
links it (ninja finds nothing to do). Two processes starting together (e.g. the
ranks of one node) share the build through cpp_extension's lock file.

Environment:
- ``VAE_TRAIN_OPS_DIR``: cache root (default ``$TORCH_EXTENSIONS_DIR/vae_train``
  if that is set, else ``~/.cache/vae_train/ops``). Builds live in a sub-folder
  named after the torch version, CPU/CUDA variant and CPU instruction set, so a
  shared home directory never hands one machine another's binary.
- ``VAE_TRAIN_OPS_ARCH``: ``auto`` (default: the best of AVX-512 / AVX2 this CPU
  has, else a portable binary), ``avx512``, ``avx2`` (set this when baking an
  image that must run on any AVX2 machine), ``native`` (``-march=native``; only for
  a cache that one kind of machine uses) or ``generic``.
- ``VAE_TRAIN_CUDA_ARCHS``: GPU architectures for nvcc (default ``80;86;89;90``,
  plus PTX of the last one so newer GPUs JIT it).
- ``VAE_TRAIN_REQUIRE_FUSED=1``: a failed build raises instead of falling back.
- ``CXX``: the C++ compiler (cpp_extension's own variable).
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import re
import sysconfig
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from vae_train.errors import VaeTrainError

CSRC = Path(__file__).resolve().parent / "csrc"
EXTENSION_NAME = "vae_train_reparam_kl"
REQUIRE_ENV = "VAE_TRAIN_REQUIRE_FUSED"
DEFAULT_CUDA_ARCHS = "80;86;89;90"
# -fno-math-errno / -fno-trapping-math let g++ vectorize sqrt and selects; unlike
# -ffast-math they keep NaN and infinity semantics intact.
COMMON_CFLAGS = ["-O3", "-fno-math-errno", "-fno-trapping-math", "-fopenmp"]


class FusedOpUnavailable(VaeTrainError):
    """The fused op could not be built or loaded (and the caller required it)."""


class FusedOpFallbackWarning(UserWarning):
    """Issued once per process when the reference replaces the fused op."""


@dataclass(frozen=True)
class BuildPlan:
    """What to compile, with which flags, and where the result is cached."""

    build_dir: Path
    sources: tuple[Path, ...]
    cflags: tuple[str, ...]
    cuda_cflags: tuple[str, ...]
    with_cuda: bool


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


ISA_LEVELS = {
    # tag: (CPU flags required, compiler flags)
    "avx512": ({"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512dq", "avx512vl"},
               ["-mavx2", "-mfma", "-mf16c", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl"]),
    "avx2": ({"avx2", "fma", "f16c"}, ["-mavx2", "-mfma", "-mf16c"]),
}


def isa_flags() -> tuple[str, list[str]]:
    """(cache tag, compiler flags) for the CPU instruction set; see ``VAE_TRAIN_OPS_ARCH``.

    The tag names the build directory, so a cache shared by different machines
    holds one binary per instruction set and never runs code a CPU lacks.
    """
    choice = os.environ.get("VAE_TRAIN_OPS_ARCH", "auto")
    if choice == "native":
        return "native", ["-march=native"]
    if choice == "generic":
        return "generic", []
    if choice in ISA_LEVELS:
        return choice, list(ISA_LEVELS[choice][1])
    if choice != "auto":
        raise FusedOpUnavailable(
            f"VAE_TRAIN_OPS_ARCH={choice!r} is not one of auto, {', '.join(ISA_LEVELS)}, native, generic."
        )
    if platform.machine() in ("x86_64", "AMD64"):
        cpu = _cpu_flags()
        for tag, (required, flags) in ISA_LEVELS.items():
            if required <= cpu:
                return tag, list(flags)
    return "generic", []


def cache_root() -> Path:
    """The per-user cache directory of built extensions."""
    if "VAE_TRAIN_OPS_DIR" in os.environ:
        return Path(os.environ["VAE_TRAIN_OPS_DIR"]).expanduser()
    if "TORCH_EXTENSIONS_DIR" in os.environ:
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]).expanduser() / "vae_train"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "vae_train" / "ops"


def cuda_buildable() -> bool:
    """True when the CUDA kernel can be compiled: CUDA torch and nvcc (CUDA_HOME) present."""
    from torch.utils.cpp_extension import CUDA_HOME

    return torch.version.cuda is not None and CUDA_HOME is not None


def _cuda_arch_flags() -> list[str]:
    archs = [a.strip().replace(".", "") for a in os.environ.get("VAE_TRAIN_CUDA_ARCHS", DEFAULT_CUDA_ARCHS).split(";")]
    archs = [a for a in archs if a]
    flags = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
    return flags + [f"-gencode=arch=compute_{archs[-1]},code=compute_{archs[-1]}"]


def plan(with_cuda: bool) -> BuildPlan:
    """The build for this machine; ``with_cuda`` adds the CUDA kernel."""
    isa_tag, isa = isa_flags()
    sources = [CSRC / "binding.cpp", CSRC / "reparam_kl_cpu.cpp"]
    cflags = COMMON_CFLAGS + isa
    cuda_cflags: list[str] = []
    variant = "cpu"
    if with_cuda:
        sources.append(CSRC / "reparam_kl_cuda.cu")
        cflags.append("-DVAE_TRAIN_WITH_CUDA")
        cuda_cflags = ["-O3", *_cuda_arch_flags()]
        variant = f"cu{torch.version.cuda}-{hashlib.sha1(' '.join(cuda_cflags).encode()).hexdigest()[:8]}"
    build_dir = cache_root() / f"torch{torch.__version__}-{variant}-{isa_tag}"
    return BuildPlan(build_dir, tuple(sources), tuple(cflags), tuple(cuda_cflags), with_cuda)


def _prebuilt(build_plan: BuildPlan) -> Path | None:
    """The compiled library of ``build_plan`` if one is already in the cache."""
    library = build_plan.build_dir / f"{EXTENSION_NAME}.so"
    return library if library.exists() else None


def _put_ninja_on_path() -> None:
    """cpp_extension runs ``ninja`` from PATH; the venv's own one is missing there
    when Python is started by its full path without activating the venv."""
    scripts = sysconfig.get_path("scripts")
    path = os.environ.get("PATH", "")
    if (Path(scripts) / "ninja").exists() and scripts not in path.split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join([scripts, path]) if path else scripts


def build(with_cuda: bool | None = None, verbose: bool = False) -> BuildPlan:
    """Compile (if needed) and load the extension; raises FusedOpUnavailable on failure.

    ``with_cuda=None`` builds the CUDA kernel only when a GPU is visible and nvcc
    is found; ``True`` builds it without a GPU (e.g. in a Docker image build).
    """
    from torch.utils import cpp_extension

    if with_cuda is None:
        with_cuda = torch.cuda.is_available() and (cuda_buildable() or _prebuilt(plan(True)) is not None)
    if with_cuda and not cuda_buildable():
        # No nvcc here (e.g. a runtime image): only a library baked by `vae-train
        # build-ops --cuda` can serve, loaded as is.
        prebuilt = _prebuilt(plan(True))
        if prebuilt is None:
            raise FusedOpUnavailable(
                "cannot build the CUDA kernel: this torch has no CUDA or nvcc was not found; "
                "install a CUDA build of torch and the CUDA toolkit (or set CUDA_HOME)."
            )
        try:
            torch.ops.load_library(str(prebuilt))
        except OSError as exc:
            raise FusedOpUnavailable(
                f"loading the prebuilt fused op {prebuilt} failed ({exc}); rebuild it with `vae-train build-ops --cuda`."
            ) from exc
        return plan(True)
    build_plan = plan(with_cuda)
    build_plan.build_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(build_plan.build_dir)
    _put_ninja_on_path()
    try:
        cpp_extension.load(
            name=EXTENSION_NAME,
            sources=[str(s) for s in build_plan.sources],
            extra_cflags=list(build_plan.cflags),
            extra_cuda_cflags=list(build_plan.cuda_cflags),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build_plan.build_dir),
            with_cuda=with_cuda,
            is_python_module=False,
            verbose=verbose,
        )
    except (RuntimeError, OSError, ImportError, FileNotFoundError) as exc:
        raise FusedOpUnavailable(
            f"building the fused reparam/KL op failed in {build_plan.build_dir}: {exc}".rstrip()
        ) from exc
    return build_plan


STALE_LOCK_S = 900.0  # a build takes about a minute on 2 cores (several with CUDA archs): older locks are orphans


def _clear_stale_lock(build_dir: Path) -> None:
    """Remove cpp_extension's build lock when a killed build left it behind.

    cpp_extension waits for its lock file without limit, so a process killed mid-build
    (preemption during the first start) would make every later start hang. A lock
    untouched for :data:`STALE_LOCK_S` is such an orphan.
    """
    lock = build_dir / "lock"
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_S:
        warnings.warn(f"removing the stale build lock {lock} ({age:.0f} s old: a build was killed)", stacklevel=2)
        lock.unlink(missing_ok=True)


def _summary(exc: BaseException) -> str:
    """The line of a build error that names the problem, for a one-line warning."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    for line in lines:
        if re.search(r"error:|not found|No such file|Ninja is required", line):
            return line[:300]
    return lines[0][:300] if lines else type(exc).__name__


@functools.cache
def loaded() -> BuildPlan | None:
    """Build/load once per process; None (after one warning) if that fails.

    With ``VAE_TRAIN_REQUIRE_FUSED=1`` a failure raises FusedOpUnavailable instead.
    """
    require = os.environ.get(REQUIRE_ENV, "") not in ("", "0")
    try:
        build_plan = build()
    except FusedOpUnavailable as exc:
        if require:
            raise FusedOpUnavailable(f"{exc}\n{REQUIRE_ENV} is set, so the reference fallback is disabled.") from exc
        warnings.warn(
            f"vae_train.ops: the fused reparam/KL op is unavailable ({_summary(exc)}); using the plain-PyTorch "
            f"reference instead (same math, slower, more memory). Fix: install g++ and ninja, then run "
            f"`vae-train build-ops` to see the full build log; set {REQUIRE_ENV}=1 to make this an error.",
            FusedOpFallbackWarning,
            stacklevel=3,
        )
        return None
    if torch.cuda.is_available() and not build_plan.with_cuda:
        message = (
            "vae_train.ops: a GPU is visible but nvcc was not found, so the CUDA kernel was not built; CUDA "
            "tensors use the plain-PyTorch reference. Fix: install the CUDA toolkit or set CUDA_HOME."
        )
        if require:
            raise FusedOpUnavailable(message)
        warnings.warn(message, FusedOpFallbackWarning, stacklevel=3)
    return build_plan
