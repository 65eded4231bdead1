"""The typed config: YAML + dotted overrides round-trip, and every rejection path is readable."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vae_train.config import Config, ConfigError, describe_fields, load_config, parse_overrides, resolve_binarize

REPO = Path(__file__).resolve().parents[2]


def test_defaults_validate_and_every_field_is_documented() -> None:
    config = load_config(None)
    assert isinstance(config, Config)
    rows = describe_fields()
    assert len(rows) > 40
    undocumented = [key for key, _, description in rows if not description]
    assert undocumented == []


def test_yaml_round_trip_preserves_every_value(tmp_path: Path) -> None:
    original = load_config(None, ["model.channel_mult=[1,2,4]", "kl.free_bits=0.25", "optimizer.betas=[0.5,0.9]"])
    path = tmp_path / "resolved.yaml"
    original.save(path)
    reloaded = load_config(path)
    assert reloaded == original
    assert reloaded.model.channel_mult == [1, 2, 4]
    assert reloaded.optimizer.betas == (0.5, 0.9)


def test_overrides_apply_over_yaml_and_are_typed(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump({"train": {"max_steps": 7}, "model": {"latent_channels": 8}}))
    config = load_config(path, ["train.max_steps=11", "optimizer.lr=3e-4", "data.strict=true", "run_dir=/tmp/x"])
    assert config.train.max_steps == 11
    assert config.model.latent_channels == 8
    assert config.optimizer.lr == pytest.approx(3e-4)
    assert config.data.strict is True
    assert config.run_dir == "/tmp/x"


def test_shipped_configs_are_valid() -> None:
    configs = sorted((REPO / "configs").glob("*.yaml"))
    for path in configs:
        load_config(path)


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("model.latent_chanels=3", "'model.latent_chanels': unknown key; did you mean 'model.latent_channels'?"),
        ("trian.max_steps=3", "'trian': unknown key; did you mean 'train'?"),
        ("train.max_steps=abc", "'train.max_steps' = 'abc': Input should be a valid integer"),
        ("distributed.zero_stage=4", "'distributed.zero_stage' = 4: Input should be less than or equal to 3"),
        ("distributed.precision=fp8", "'distributed.precision' = 'fp8': Input should be 'fp32', 'bf16', 'fp16' or 'auto'"),
        ("optimizer.lr=-1", "'optimizer.lr' = -1: Input should be greater than 0"),
        ("model.norm_groups=5", "norm_groups=5 does not divide stage channels 32"),
    ],
)
def test_rejections_name_key_value_and_what_is_allowed(override: str, expected: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(None, [override])
    assert expected in str(info.value)


def test_bad_files_and_override_syntax_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")
    not_yaml = tmp_path / "bad.yaml"
    not_yaml.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(not_yaml)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("3\n")
    with pytest.raises(ConfigError, match="must hold a mapping"):
        load_config(scalar)
    with pytest.raises(ConfigError, match="key.sub=value"):
        parse_overrides(["train.max_steps"])


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "vae_train", *args], capture_output=True, text=True, timeout=120)


def test_config_show_prints_resolved_yaml() -> None:
    result = _cli("config", "show", "train.max_steps=42")
    assert result.returncode == 0, result.stderr
    assert yaml.safe_load(result.stdout)["train"]["max_steps"] == 42


def test_config_show_bad_key_is_one_message_without_traceback() -> None:
    result = _cli("config", "show", "model.latent_chanels=3")
    assert result.returncode == 2
    assert "did you mean 'model.latent_channels'" in result.stderr
    assert "Traceback" not in result.stderr


def test_binarize_auto_follows_the_likelihood_and_refuses_binary_pixels_elsewhere() -> None:
    assert load_config(None).data.binarize == "dynamic"
    assert load_config(None, ["model.likelihood=logistic"]).data.binarize == "none"
    assert load_config(None, ["data.binarize=fixed"]).data.binarize == "fixed"
    with pytest.raises(ConfigError, match="only the bernoulli likelihood"):
        load_config(None, ["model.likelihood=gaussian_fixed", "data.binarize=dynamic"])


def test_binarize_is_resolved_by_one_function() -> None:
    assert [resolve_binarize("auto", lik) for lik in ("bernoulli", "logistic")] == ["dynamic", "none"]
    assert resolve_binarize("fixed", "bernoulli") == "fixed"


def test_a_removed_key_is_named_as_removed() -> None:
    with pytest.raises(ConfigError, match="'data.samples_per_epoch' was removed: nothing read it"):
        load_config(None, ["data.samples_per_epoch=100"])
