"""Fine-tuning part of an imported AutoencoderKL: real 2-rank DeepSpeed runs on Fashion-MNIST.

A random diffusers ``AutoencoderKL`` (1 channel, the test extra) is saved locally and brought in with
``vae-train import``; ``train.py`` starts from it (``model.init_from``) with ``train.trainable=decoder``
under ZeRO-3 (the stage that partitions the parameters themselves) and ``train.trainable=encoder``
under ZeRO-2 (frozen parameters kept outside the optimizer's flat partitions). Afterwards the
consolidated checkpoint's frozen part equals the imported weights bitwise, every trained tensor moved,
the optimizer state covers only the trained part, and the checkpoint records what was frozen.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests.launching import clean_env, run, torchrun
from vae_train.checkpoint.safe_load import restricted_torch_load
from vae_train.cli import main as cli
from vae_train.export import consolidated_state_dict, load_model

diffusers = pytest.importorskip("diffusers")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]
STEPS = 3


def _exp_avg_numel(tree: object) -> int:
    """Elements of every Adam ``exp_avg`` tensor in a (nested) optimizer state."""
    if isinstance(tree, dict):
        return sum(v.numel() if k == "exp_avg" and torch.is_tensor(v) else _exp_avg_numel(v) for k, v in tree.items())
    if isinstance(tree, (list, tuple)):
        return sum(_exp_avg_numel(v) for v in tree)
    return 0


@pytest.mark.parametrize("stage,trainable", [(3, "decoder"), (2, "encoder")])
def test_frozen_part_stays_bitwise_and_is_recorded(fashion_shards: Path, tmp_path: Path, capsys, stage: int,
                                                   trainable: str):
    torch.manual_seed(0)
    diffusers.AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                            up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
                            latent_channels=4, norm_num_groups=4, sample_size=28).save_pretrained(tmp_path / "vae")
    assert cli(["import", str(tmp_path / "vae"), "--out", str(tmp_path / "init")]) == 0
    overrides = capsys.readouterr().out.split("train from it with: ")[1].split()
    run_dir = tmp_path / "run"
    result = run(torchrun("train.py", "--config", "configs/tiny.yaml", f"run_dir={run_dir}",
                          f"data.train={fashion_shards}", f"data.val={fashion_shards}", *overrides,
                          f"train.trainable={trainable}", f"distributed.zero_stage={stage}", f"train.max_steps={STEPS}",
                          f"checkpoint.every_steps={STEPS}", "logging.image_every=0", "logging.histogram_every=0"),
                 env=clean_env(), timeout_s=360)
    assert result.returncode == 0, result.stderr[-4000:]

    ckpt = run_dir / "checkpoints" / f"step-{STEPS:08d}"
    trained, config = consolidated_state_dict(ckpt)
    initial = load_model(tmp_path / "init").state_dict()
    assert trained.keys() == initial.keys() and config["model"]["arch"] == "ldm"
    frozen_prefixes = ("encoder.", "quant_conv.") if trainable == "decoder" else ("decoder.", "post_quant_conv.")
    frozen = [k for k in initial if k.startswith(frozen_prefixes)]
    assert f"{frozen_prefixes[1]}weight" in frozen and len(frozen) < len(initial)
    assert [k for k in frozen if not torch.equal(trained[k], initial[k])] == []
    assert [k for k in initial if k not in frozen and torch.equal(trained[k], initial[k])] == []

    trained_numel = sum(v.numel() for k, v in initial.items() if k not in frozen)
    with restricted_torch_load():
        optimizer_numel = sum(_exp_avg_numel(torch.load(ckpt / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
                                                        map_location="cpu")) for r in (0, 1))
    assert trained_numel <= optimizer_numel <= trained_numel + 2 * 16  # ZeRO pads each rank's flat partition

    frozen_numel = sum(initial[k].numel() for k in frozen)
    record = json.loads((ckpt / "trainer_state.rank00000.json").read_text())
    assert record["parts"]["trainer"]["trainable"] == trainable == config["train"]["trainable"]
    assert record["parts"]["trainer"]["frozen_numel"] == frozen_numel
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["frozen_numel"] == frozen_numel and info["parameters"] == trained_numel

    if trainable != "decoder":
        return
    # The fine-tuned checkpoint itself exports to diffusers, which then decodes exactly like vae-train.
    assert cli(["export", str(ckpt), "--out", str(tmp_path / "diffusers"), "--format", "diffusers"]) == 0
    assert "latent statistics ABSENT" in capsys.readouterr().out
    theirs = diffusers.AutoencoderKL.from_pretrained(tmp_path / "diffusers").eval()
    ours = load_model(ckpt)
    x = torch.rand(2, 1, 28, 28, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        mu, _ = ours.encode(x)
        torch.testing.assert_close(mu, theirs.encode(x).latent_dist.mean, rtol=0, atol=1e-5)
        torch.testing.assert_close(ours.decode(mu), theirs.decode(mu).sample, rtol=0, atol=1e-5)


def test_init_from_an_s3_export(s3_env, s3_bucket: str, tmp_path: Path):
    """``model.init_from=s3://...``: the export is fetched and its weights copied into the configured model."""
    from vae_train.config import ModelConfig, S3Config
    from vae_train.export import initialize_from
    from vae_train.interop import write_export
    from vae_train.model import build_model
    from vae_train.storage import open_store

    cfg = ModelConfig(arch="ldm", in_channels=1, image_size=28, block_out_channels=[8, 16], layers_per_block=1,
                      norm_num_groups=4, likelihood="gaussian_fixed")
    torch.manual_seed(1)
    source = build_model(cfg).state_dict()
    write_export(tmp_path / "export", source, cfg, step=None, extra={}, latent_stats=None)
    store = open_store(f"s3://{s3_bucket}/init", S3Config())
    for name in ("model.safetensors", "config.json"):
        store.put_file(tmp_path / "export" / name, name)
    torch.manual_seed(2)
    model = build_model(cfg)
    initialize_from(model, f"s3://{s3_bucket}/init", S3Config())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in source.items())
