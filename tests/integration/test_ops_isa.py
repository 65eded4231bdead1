"""Every CPU instruction-set build of the fused op draws the same noise and computes the same result.

The default build on this machine uses its best instruction set (AVX-512 here);
the AVX2 and portable builds have their own Philox code paths, so they are built
too (once per cache) and compared with the default: bit for bit for the noise
between FMA-capable builds, to float rounding for the portable one.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from vae_train import ops
from vae_train.ops import build

pytestmark = [pytest.mark.timeout(600), pytest.mark.slow]

SCRIPT = """
import sys, torch
from vae_train import ops
assert ops.backend() == "cpu-fused", ops.backend()
mu = torch.zeros(3, 5, 7, 11); logvar = torch.zeros(3, 5, 7, 11)
z, kl = ops.reparam_kl(mu, logvar, generator=torch.Generator().manual_seed(123))
g = torch.Generator().manual_seed(4)
mu2 = torch.randn(4, 3, 9, 9, generator=g); lv2 = torch.randn(4, 3, 9, 9, generator=g) * 8
z2, kl2 = ops.reparam_kl(mu2, lv2, generator=torch.Generator().manual_seed(5))
torch.save({"z": z, "z2": z2, "kl2": kl2}, sys.argv[1])
"""


@pytest.mark.parametrize("arch", ["avx2", "generic"])
def test_other_instruction_sets_match_the_default_build(arch, tmp_path):
    default_tag, _ = build.isa_flags()
    if arch == default_tag:
        pytest.skip(f"{arch} is this machine's default build, covered by test_ops.py")
    if arch == "avx2" and not build.ISA_LEVELS["avx2"][0] <= build._cpu_flags():
        pytest.skip("this CPU has no AVX2")
    out = tmp_path / f"{arch}.pt"
    env = {**os.environ, "VAE_TRAIN_OPS_ARCH": arch, "VAE_TRAIN_REQUIRE_FUSED": "1"}
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(out)], env=env, capture_output=True, text=True,
                            timeout=580)
    assert result.returncode == 0, result.stderr[-3000:]
    other = torch.load(out, weights_only=True)
    assert ops.backend() == "cpu-fused"
    z, _ = ops.reparam_kl(torch.zeros(3, 5, 7, 11), torch.zeros(3, 5, 7, 11),
                          generator=torch.Generator().manual_seed(123))
    if arch == "generic":  # no FMA: the Box-Muller floats round differently, the Philox bits do not
        torch.testing.assert_close(other["z"], z, rtol=2e-6, atol=2e-6)
    else:  # z = eps here: the noise is bit-identical
        assert torch.equal(other["z"], z)
    g = torch.Generator().manual_seed(4)
    mu2 = torch.randn(4, 3, 9, 9, generator=g)
    lv2 = torch.randn(4, 3, 9, 9, generator=g) * 8
    z2, kl2 = ops.reparam_kl(mu2, lv2, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(other["z2"], z2, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(other["kl2"], kl2, rtol=1e-6, atol=1e-5)
