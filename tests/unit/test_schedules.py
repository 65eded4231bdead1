"""KL and LR schedules: values at chosen steps, purity, and the plot command."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from vae_train.cli import main
from vae_train.config import Config, KLConfig, OptimizerConfig, load_config
from vae_train.schedules import beta_at, build_beta_schedule, build_lr_schedule, lr_multiplier_at

pytestmark = pytest.mark.timeout(60)


def test_constant_beta() -> None:
    kl = KLConfig(schedule="constant", beta=0.7, beta_start=0.1)
    assert [beta_at(s, kl, 100) for s in (0, 50, 10_000)] == [0.7, 0.7, 0.7]


def test_linear_warmup() -> None:
    kl = KLConfig(schedule="linear", beta=1.0, beta_start=0.2, warmup_steps=100)
    assert beta_at(0, kl, 1000) == pytest.approx(0.2)
    assert beta_at(25, kl, 1000) == pytest.approx(0.4)
    assert beta_at(100, kl, 1000) == pytest.approx(1.0)
    assert beta_at(5000, kl, 1000) == pytest.approx(1.0)
    assert beta_at(0, KLConfig(schedule="linear", warmup_steps=0, beta=0.5), 10) == 0.5


def test_sigmoid_ramp_hits_both_ends_and_its_midpoint() -> None:
    kl = KLConfig(schedule="sigmoid", beta=2.0, beta_start=0.0, warmup_steps=200, sigmoid_steepness=10.0)
    assert beta_at(0, kl, 1000) == pytest.approx(0.0, abs=1e-12)
    assert beta_at(100, kl, 1000) == pytest.approx(1.0)  # symmetric: halfway at the middle
    assert beta_at(200, kl, 1000) == pytest.approx(2.0)
    assert beta_at(999, kl, 1000) == pytest.approx(2.0)
    # at a quarter of the ramp: (sig(-2.5) - sig(-5)) / (sig(5) - sig(-5)), times beta
    sig = lambda u: 1 / (1 + math.exp(-u))  # noqa: E731
    expected = 2.0 * (sig(-2.5) - sig(-5)) / (sig(5) - sig(-5))
    assert beta_at(50, kl, 1000) == pytest.approx(expected)


def test_cyclical_follows_fu_et_al() -> None:
    """4 cycles over 1000 steps: period 250, linear ramp over the first half, then flat."""
    kl = KLConfig(schedule="cyclical", beta=1.0, beta_start=0.0, cycles=4, ramp_ratio=0.5)
    values = {s: beta_at(s, kl, 1000) for s in (0, 62, 125, 200, 249, 250, 375, 999)}
    assert values[0] == 0.0
    assert values[62] == pytest.approx(62 / 125)
    assert values[125] == pytest.approx(1.0)
    assert values[200] == pytest.approx(1.0)
    assert values[249] == pytest.approx(1.0)
    assert values[250] == 0.0  # a new cycle starts from beta_start
    assert values[375] == pytest.approx(1.0)
    assert values[999] == pytest.approx(1.0)


def test_lr_warmup_then_cosine() -> None:
    opt = OptimizerConfig(schedule="cosine", warmup_steps=10, min_lr_ratio=0.1)
    assert lr_multiplier_at(0, opt, 110) == pytest.approx(0.1)  # (0+1)/10: step 0 already moves
    assert lr_multiplier_at(9, opt, 110) == pytest.approx(1.0)
    assert lr_multiplier_at(10, opt, 110) == pytest.approx(1.0)
    assert lr_multiplier_at(60, opt, 110) == pytest.approx(0.55)  # halfway: 0.1 + 0.9 * 0.5
    assert lr_multiplier_at(110, opt, 110) == pytest.approx(0.1)
    assert lr_multiplier_at(500, opt, 110) == pytest.approx(0.1)


def test_lr_constant_and_no_warmup() -> None:
    opt = OptimizerConfig(schedule="constant", warmup_steps=4)
    assert [lr_multiplier_at(s, opt, 100) for s in (0, 1, 3, 4, 99)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert lr_multiplier_at(0, OptimizerConfig(schedule="cosine", warmup_steps=0), 100) == pytest.approx(1.0)


def test_schedules_are_pure_functions_of_the_step() -> None:
    """Evaluating in any order (as after a resume) gives the same values."""
    cfg = load_config(None, ["kl.schedule=cyclical", "train.max_steps=300", "optimizer.warmup_steps=20"])
    beta, lr = build_beta_schedule(cfg.kl, 300), build_lr_schedule(cfg.optimizer, 300)
    forward = [(beta(s), lr(s)) for s in range(300)]
    backward = [(beta(s), lr(s)) for s in reversed(range(300))][::-1]
    assert forward == backward
    assert beta(150) == beta_at(150, cfg.kl, 300)
    assert lr(150) == lr_multiplier_at(150, cfg.optimizer, 300)


def test_build_from_default_config() -> None:
    cfg = Config()
    assert build_beta_schedule(cfg.kl, cfg.train.max_steps)(cfg.kl.warmup_steps) == pytest.approx(cfg.kl.beta)
    assert build_lr_schedule(cfg.optimizer, cfg.train.max_steps)(cfg.train.max_steps) == pytest.approx(cfg.optimizer.min_lr_ratio)


def test_plot_command_writes_a_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "schedules.png"
    config = tmp_path / "run.yaml"
    config.write_text("train:\n  max_steps: 400\nkl:\n  schedule: cyclical\n")
    assert main(["schedules", "plot", str(config), "kl.cycles=3", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "wrote" in capsys.readouterr().out


def test_plot_command_reports_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["schedules", "plot", "kl.schedul=linear", "--out", str(tmp_path / "a.png")]) == 2
    assert "did you mean 'kl.schedule'" in capsys.readouterr().err
    assert main(["schedules", "plot", "--out", str(tmp_path / "missing" / "a.png")]) == 2
    assert "does not exist" in capsys.readouterr().err
