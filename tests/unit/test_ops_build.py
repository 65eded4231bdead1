"""Building the fused op: the CUDA source compiles, a failed build falls back once, or errors when required."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures import skip_or_fail
from vae_train.ops import build

pytestmark = pytest.mark.timeout(300)


def _nvcc() -> str | None:
    return shutil.which("nvcc") or next(
        (p for p in ("/usr/local/cuda/bin/nvcc", "/usr/local/bin/nvcc") if Path(p).exists()), None
    )


@pytest.mark.skipif(_nvcc() is None, reason="nvcc is not installed")
def test_cuda_kernel_compiles_for_sm80_and_sm90(tmp_path):
    """The .cu file needs no torch headers, so nvcc alone can keep it from rotting."""
    obj = tmp_path / "reparam_kl_cuda.o"
    cmd = [
        _nvcc(), "-std=c++17", "-O3", "-c", str(build.CSRC / "reparam_kl_cuda.cu"), "-o", str(obj),
        "-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
        "-Werror", "all-warnings",
        # What torch.utils.cpp_extension adds to every nvcc call (COMMON_NVCC_FLAGS).
        "-D__CUDA_NO_HALF_OPERATORS__", "-D__CUDA_NO_HALF_CONVERSIONS__", "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
        "-D__CUDA_NO_HALF2_OPERATORS__", "--expt-relaxed-constexpr",
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr
    cuobjdump = Path(_nvcc()).with_name("cuobjdump")
    if cuobjdump.exists():
        listing = subprocess.run([str(cuobjdump), "--list-elf", str(obj)], capture_output=True, text=True).stdout
        assert "sm_80" in listing and "sm_90" in listing


def _cuda_include() -> Path | None:
    nvcc = _nvcc()
    candidates = [Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "include"]
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent / "include")
    return next((c for c in candidates if (c / "cuda_runtime_api.h").exists()), None)


@pytest.mark.skipif(_cuda_include() is None or shutil.which("g++") is None, reason="no CUDA headers or g++")
def test_cuda_binding_compiles_against_torch_and_cuda_headers(tmp_path):
    """binding.cpp's CUDA half is only built where torch has CUDA; check its syntax
    here. CPU wheels lack one generated c10 header, so a stub stands in for it
    (searched after torch's own include paths, so a CUDA torch uses the real one)."""
    from torch.utils.cpp_extension import include_paths

    stub = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    stub.parent.mkdir(parents=True)
    stub.write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [
        "g++", "-std=c++20", "-fsyntax-only", "-Wall", "-Werror", "-DVAE_TRAIN_WITH_CUDA",
        *(f"-isystem{p}" for p in include_paths()), f"-isystem{tmp_path}", f"-isystem{_cuda_include()}",
        str(build.CSRC / "binding.cpp"),
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=280)
    assert result.returncode == 0, result.stderr[-3000:]


def _run_python(code: str, tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "CXX": "/nonexistent/bin/c++", "VAE_TRAIN_OPS_DIR": str(tmp_path / "cache"), **env}
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=full_env, timeout=280, cwd=tmp_path
    )


FALLBACK_SCRIPT = """
import warnings, torch
from vae_train import ops
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    for _ in range(3):
        z, kl = ops.reparam_kl(torch.zeros(2, 3, 4), torch.zeros(2, 3, 4))
    name = ops.backend()
fallback = [w for w in caught if issubclass(w.category, ops.FusedOpFallbackWarning)]
print(name, len(fallback), tuple(z.shape), tuple(kl.shape))
print(fallback[0].message)
"""


def test_broken_compiler_falls_back_to_reference_with_one_warning(tmp_path):
    result = _run_python(FALLBACK_SCRIPT, tmp_path, VAE_TRAIN_REQUIRE_FUSED="0")
    assert result.returncode == 0, result.stderr
    first, message = result.stdout.splitlines()[:2]
    assert first == "reference 1 (2, 3, 4) (2,)"
    assert "vae-train build-ops" in message and "VAE_TRAIN_REQUIRE_FUSED=1" in message


def test_require_fused_turns_a_failed_build_into_an_error(tmp_path):
    result = _run_python(FALLBACK_SCRIPT, tmp_path, VAE_TRAIN_REQUIRE_FUSED="1")
    assert result.returncode != 0
    assert "FusedOpUnavailable" in result.stderr and "VAE_TRAIN_REQUIRE_FUSED is set" in result.stderr


def test_build_ops_command_reports_a_failed_build_without_traceback(tmp_path):
    result = _run_python("from vae_train.cli import main; raise SystemExit(main(['build-ops']))", tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "building the fused reparam/KL op failed" in result.stderr


def test_build_ops_command_builds_and_prints_the_backend(capsys):
    from vae_train.cli import main

    assert main(["build-ops"]) == 0
    out = capsys.readouterr().out
    assert "backend: cpu-fused" in out and "cuda kernel: no" in out


@pytest.mark.skipif(build.cuda_buildable(), reason="this machine can build the CUDA kernel")
def test_build_ops_cuda_without_cuda_torch_names_the_fix():
    from vae_train.cli import main

    with pytest.raises(build.FusedOpUnavailable, match="CUDA toolkit"):
        build.build(with_cuda=True)
    assert main(["build-ops", "--cuda"]) == 2


def test_cache_directory_is_per_user_and_names_torch_and_isa(monkeypatch, tmp_path):
    monkeypatch.delenv("VAE_TRAIN_OPS_DIR", raising=False)
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setenv("VAE_TRAIN_OPS_ARCH", "generic")
    plan = build.plan(with_cuda=False)
    assert plan.build_dir.parent == tmp_path / "vae_train" / "ops"
    assert "generic" in plan.build_dir.name and "cpu" in plan.build_dir.name
    assert not any(flag.startswith("-march") or flag.startswith("-mavx") for flag in plan.cflags)
    monkeypatch.setenv("VAE_TRAIN_OPS_ARCH", "fastest")
    with pytest.raises(build.FusedOpUnavailable, match="VAE_TRAIN_OPS_ARCH"):
        build.plan(with_cuda=False)


HEADER_PROGRAM = r"""
#include <cmath>
#include <cstdio>
#include "reparam_kl_math.h"
using namespace vae_train_ops;

int main() {
  // Random123's known answers for Philox4x32-10.
  const uint32_t kat[3][10] = {
      {0, 0, 0, 0, 0, 0, 0x6627e8d5u, 0xe169c58du, 0xbc57ac4cu, 0x9b00dbd8u},
      {~0u, ~0u, ~0u, ~0u, ~0u, ~0u, 0x408f276du, 0x41c83b0eu, 0xa20bc7c6u, 0x6d5451fdu},
      {0x243f6a88u, 0x85a308d3u, 0x13198a2eu, 0x03707344u, 0xa4093822u, 0x299f31d0u,
       0xd16cfe09u, 0x94fdccebu, 0x5001e420u, 0x24126ea1u}};
  for (const auto& v : kat) {
    uint32_t out[4];
    philox4x32_10(v[0], v[1], v[2], v[3], v[4], v[5], out);
    for (int i = 0; i < 4; ++i) std::printf("%s ", out[i] == v[6 + i] ? "ok" : "BAD");
  }
  std::printf("\n");
  // Worst relative errors of the float approximations against libm in double.
  double exp_err = 0, log_err = 0, sincos_err = 0;
  for (int i = 0; i <= 200000; ++i) {
    const float x = -87.0f + 175.0f * i / 200000.0f;
    exp_err = std::fmax(exp_err, std::fabs(vt_exp(x) / std::exp(double(x)) - 1));
    const float u = (i + 1) / 200001.0f;
    log_err = std::fmax(log_err, std::fabs(vt_log(u) - std::log(double(u))) / std::fmax(1e-3, std::fabs(std::log(double(u)))));
    float s, c;
    vt_sincos_2pi(u, s, c);
    sincos_err = std::fmax(sincos_err, std::fmax(std::fabs(s - std::sin(2 * M_PI * u)), std::fabs(c - std::cos(2 * M_PI * u))));
  }
  std::printf("%g %g %g\n", exp_err, log_err, sincos_err);
  return 0;
}
"""


def test_shared_math_header_philox_known_answers_and_accuracy(tmp_path):
    """The header alone (no torch): Philox matches Random123's published vectors and
    the branch-free exp/log/sincos are accurate to a few float ulps."""
    if shutil.which("g++") is None:
        skip_or_fail("g++ is not installed (the fused op's CPU build needs it too)")
    source = tmp_path / "check.cpp"
    source.write_text(HEADER_PROGRAM)
    exe = tmp_path / "check"
    compiled = subprocess.run(
        ["g++", "-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror", f"-I{build.CSRC}", str(source), "-o", str(exe)],
        capture_output=True, text=True, timeout=120,
    )
    assert compiled.returncode == 0, compiled.stderr
    kats, errors = subprocess.run([str(exe)], capture_output=True, text=True, timeout=60).stdout.splitlines()
    assert kats.split() == ["ok"] * 12
    exp_err, log_err, sincos_err = (float(e) for e in errors.split())
    assert exp_err < 2.5e-7 and log_err < 2.5e-7 and sincos_err < 2.5e-7  # about 2 ulps


def test_a_lock_left_by_a_killed_build_is_removed_and_a_fresh_one_kept(tmp_path):
    """cpp_extension waits on its lock forever: an orphan must not hang every later start."""
    orphan = tmp_path / "lock"
    orphan.touch()
    old = orphan.stat().st_mtime - build.STALE_LOCK_S - 60
    os.utime(orphan, (old, old))
    with pytest.warns(UserWarning, match="stale build lock"):
        build._clear_stale_lock(tmp_path)
    assert not orphan.exists()
    orphan.touch()  # a build in progress right now: its lock stays
    build._clear_stale_lock(tmp_path)
    assert orphan.exists()
