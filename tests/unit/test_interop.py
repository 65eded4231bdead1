"""vae-train import / export --format diffusers|ldm: numerical parity with diffusers' AutoencoderKL, no network.

The reference is diffusers itself (the test extra): a small random ``AutoencoderKL`` built from a
config and saved locally. Tolerance: fp32, absolute 1e-5 on the posterior and 1e-5 relative to the
decoded images' scale (the two implementations sum the attention in different orders).
The LDM names are written here from the published LDM module layout (CompVis'
``ldm/modules/diffusionmodules/model.py``: ``Encoder.down[i].block[j]``, ``.downsample``,
``mid.block_1/attn_1/block_2``, ``norm_out``; ``Decoder.up[level]`` with ``num_res_blocks + 1`` blocks),
independently of the package's mapping.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from vae_train.cli import main as cli
from vae_train.config import ModelConfig
from vae_train.export import load_model
from vae_train.interop import InteropError, export_autoencoder, import_autoencoder
from vae_train.model import build_model
from vae_train.model.ldm_keys import KeyMappingError, diffusers_to_ldm, ldm_to_diffusers

diffusers = pytest.importorskip("diffusers")
WIDTHS = (8, 16, 16)
ATOL = 1e-5


def make_diffusers(tmp_path: Path, name: str = "d", seed: int = 0, **overrides: object) -> tuple[object, Path]:
    """A random diffusers AutoencoderKL (non-trivial weights everywhere) saved under tmp_path/name."""
    torch.manual_seed(seed)
    config = dict(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
                  up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=WIDTHS, layers_per_block=1,
                  latent_channels=4, norm_num_groups=4, sample_size=16)
    config.update(overrides)
    model = diffusers.AutoencoderKL(**config).eval()
    with torch.no_grad():  # GroupNorm affine and biases start at 1/0: randomize them so every tensor matters
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def batch(h: int = 16, w: int = 16, channels: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.rand(2, channels, h, w, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_parity(reference: object, ours: torch.nn.Module, x: torch.Tensor) -> None:
    """Posterior mean, log-variance and decoded images of ``ours`` equal diffusers' ``reference``."""
    with torch.no_grad():
        posterior = reference.encode(x).latent_dist
        mu, logvar = ours.encode(x)
        torch.testing.assert_close(mu, posterior.mean, rtol=0, atol=ATOL)
        torch.testing.assert_close(logvar, posterior.logvar, rtol=0, atol=ATOL)
        expected = reference.decode(posterior.mean).sample
        decoded = ours.decode(mu)
        scale = expected.abs().max().item()
        torch.testing.assert_close(decoded, expected, rtol=0, atol=ATOL * max(1.0, scale))


def ldm_layout(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of the LDM autoencoder, from the published LDM module layout."""
    ch, z, levels = cfg.block_out_channels, cfg.latent_channels, len(cfg.block_out_channels)
    names: dict[str, tuple[int, ...]] = {}

    def conv(name: str, cout: int, cin: int, k: int) -> None:
        names[f"{name}.weight"], names[f"{name}.bias"] = (cout, cin, k, k), (cout,)

    def norm(name: str, c: int) -> None:
        names[f"{name}.weight"], names[f"{name}.bias"] = (c,), (c,)

    def resblock(name: str, cin: int, cout: int) -> None:
        norm(f"{name}.norm1", cin), conv(f"{name}.conv1", cout, cin, 3)
        norm(f"{name}.norm2", cout), conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cout, cin, 1)

    def mid(side: str, c: int) -> None:
        resblock(f"{side}.mid.block_1", c, c)
        norm(f"{side}.mid.attn_1.norm", c)
        for proj in ("q", "k", "v", "proj_out"):
            conv(f"{side}.mid.attn_1.{proj}", c, c, 1)
        resblock(f"{side}.mid.block_2", c, c)

    conv("encoder.conv_in", ch[0], cfg.in_channels, 3)
    block_in = ch[0]
    for i in range(levels):
        for j in range(cfg.layers_per_block):
            resblock(f"encoder.down.{i}.block.{j}", block_in, ch[i])
            block_in = ch[i]
        if i != levels - 1:
            conv(f"encoder.down.{i}.downsample.conv", block_in, block_in, 3)
    mid("encoder", block_in)
    norm("encoder.norm_out", block_in), conv("encoder.conv_out", 2 * z, block_in, 3)
    conv("quant_conv", 2 * z, 2 * z, 1), conv("post_quant_conv", z, z, 1)
    conv("decoder.conv_in", ch[-1], z, 3)
    mid("decoder", ch[-1])
    block_in = ch[-1]
    for level in reversed(range(levels)):
        for j in range(cfg.layers_per_block + 1):
            resblock(f"decoder.up.{level}.block.{j}", block_in, ch[level])
            block_in = ch[level]
        if level != 0:
            conv(f"decoder.up.{level}.upsample.conv", block_in, block_in, 3)
    norm("decoder.norm_out", block_in), conv("decoder.conv_out", cfg.in_channels, block_in, 3)
    return names


# -- the key mapping -----------------------------------------------------------------------


@pytest.mark.parametrize("widths,layers", [((8, 16, 16), 1), ((8, 8, 16, 32), 2)])
def test_key_mapping_gives_the_published_ldm_layout_and_inverts(widths, layers):
    cfg = ModelConfig(arch="ldm", in_channels=3, image_size=32, block_out_channels=list(widths),
                      layers_per_block=layers, norm_num_groups=4, likelihood="gaussian_fixed")
    ours = build_model(cfg).state_dict()
    ldm = diffusers_to_ldm(ours, len(widths))
    assert {k: tuple(v.shape) for k, v in ldm.items()} == ldm_layout(cfg)
    back = ldm_to_diffusers(ldm, len(widths))
    assert back.keys() == ours.keys() and all(torch.equal(back[k], ours[k]) for k in ours)


def test_key_mapping_lists_unknown_names():
    with pytest.raises(KeyMappingError, match="2 parameter name.*encoder.down.0.block.0.foo.weight.*lpips"):
        ldm_to_diffusers({"encoder.down.0.block.0.foo.weight": torch.zeros(1), "lpips.net.weight": torch.zeros(1),
                          "encoder.conv_in.weight": torch.zeros(1)}, 3)


# -- diffusers folder: import, export, round trip -------------------------------------------


def test_diffusers_import_export_parity_and_lossless_round_trip(tmp_path):
    reference, folder = make_diffusers(tmp_path)
    folder.rename(tmp_path / "vae")  # as in a whole pipeline's folder: PIPELINE/vae/
    folder = tmp_path / "vae"
    result = import_autoencoder(tmp_path, tmp_path / "imported")
    assert result.source_format == "diffusers" and result.model["block_out_channels"] == list(WIDTHS)
    assert result.notes == [f"took the pipeline's autoencoder in {folder}"]
    model = load_model(tmp_path / "imported")
    assert model.config.arch == "ldm"
    assert_parity(reference, model, batch())
    assert_parity(reference, model, batch(h=12, w=20))  # non-square, divisible by 4

    stats = {"scaling_factor": 0.5, "shift_factor": 0.25, "latents_mean": [0.1, 0.2, 0.3, 0.4],
             "latents_std": [1.0, 2.0, 3.0, 4.0], "latents": "mean"}
    (tmp_path / "stats.json").write_text(json.dumps(stats))
    out, origin = export_autoencoder(str(tmp_path / "imported"), tmp_path / "exported", "diffusers",
                                     latent_stats=str(tmp_path / "stats.json"))
    assert "stats.json" in origin
    again = diffusers.AutoencoderKL.from_pretrained(out).eval()
    assert_parity(again, model, batch())
    for key in ("scaling_factor", "shift_factor", "latents_mean", "latents_std"):
        assert list(again.config[key]) == stats[key] if isinstance(stats[key], list) else again.config[key] == stats[key]
    original, exported = reference.state_dict(), load_file(str(out / "diffusion_pytorch_model.safetensors"))
    assert exported.keys() == original.keys() and all(torch.equal(exported[k], original[k]) for k in original)


def test_latent_stats_travel_from_a_diffusers_config_and_their_absence_is_stated(tmp_path):
    _, folder = make_diffusers(tmp_path, scaling_factor=0.3611, shift_factor=0.1159)
    result = import_autoencoder(folder, tmp_path / "imported")
    assert result.latent_stats["scaling_factor"] == 0.3611 and result.latent_stats["shift_factor"] == 0.1159
    _, origin = export_autoencoder(str(tmp_path / "imported"), tmp_path / "out", "diffusers")
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert "latent_stats.json" in origin and config["scaling_factor"] == 0.3611 and config["shift_factor"] == 0.1159

    (tmp_path / "imported" / "latent_stats.json").unlink()
    _, origin = export_autoencoder(str(tmp_path / "imported"), tmp_path / "out2", "diffusers")
    config = json.loads((tmp_path / "out2" / "config.json").read_text())
    assert origin.startswith("latent statistics ABSENT") and config["scaling_factor"] == 1.0
    assert config["shift_factor"] is None and config["latents_mean"] is None


# -- LDM / SD single files and FLUX's ae ------------------------------------------------------


def test_ldm_single_file_imports_with_parity_and_exports_back(tmp_path):
    reference, _ = make_diffusers(tmp_path)
    ldm = diffusers_to_ldm(reference.state_dict(), len(WIDTHS))
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "vae.safetensors"))
    result = import_autoencoder(tmp_path / "vae.safetensors", tmp_path / "imported", norm_num_groups=4, image_size=16)
    assert result.source_format == "ldm" and result.model["layers_per_block"] == 1
    assert_parity(reference, load_model(tmp_path / "imported"), batch())

    out, _ = export_autoencoder(str(tmp_path / "imported"), tmp_path / "again.safetensors", "ldm")
    written = load_file(str(out))
    assert written.keys() == ldm.keys() and all(torch.equal(written[k], ldm[k]) for k in ldm)
    # diffusers' own LDM single-file converter (an independent mapping) reads the file to the same model
    single = diffusers.AutoencoderKL.from_single_file(str(out), config=str(tmp_path / "d"), local_files_only=True)
    assert_parity(single.eval(), load_model(tmp_path / "imported"), batch())
    # the file carries its config (no norm_num_groups needed to read it back) and the latent statistics
    (tmp_path / "stats.json").write_text(json.dumps({"scaling_factor": 0.25, "shift_factor": -0.5}))
    out, _ = export_autoencoder(str(tmp_path / "imported"), tmp_path / "stats.safetensors", "ldm",
                                latent_stats=str(tmp_path / "stats.json"))
    back = import_autoencoder(out, tmp_path / "reimported")
    assert back.model["norm_num_groups"] == 4 and back.model["init_from"] == ""
    assert {k: v for k, v in back.latent_stats.items() if k != "source"} == {"scaling_factor": 0.25, "shift_factor": -0.5}
    assert cli(["import", str(out), "--out", str(tmp_path / "cli")]) == 0  # prints where the statistics came from
    assert json.loads((tmp_path / "reimported" / "latent_stats.json").read_text())["shift_factor"] == -0.5


def test_whole_sd_ckpt_is_read_weights_only_and_training_extras_are_reported(tmp_path):
    reference, _ = make_diffusers(tmp_path)
    ldm = diffusers_to_ldm(reference.state_dict(), len(WIDTHS))
    state = {f"first_stage_model.{k}": v for k, v in ldm.items()}
    state["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(2)
    state["first_stage_model.loss.discriminator.main.0.weight"] = torch.zeros(2)
    torch.save({"state_dict": state, "global_step": 10}, tmp_path / "sd.ckpt")
    result = import_autoencoder(tmp_path / "sd.ckpt", tmp_path / "imported", norm_num_groups=4, image_size=16)
    assert any("first_stage_model" in n for n in result.notes) and any("loss.*" in n for n in result.notes)
    assert_parity(reference, load_model(tmp_path / "imported"), batch())


class NotWeights:
    """An object a weights-only unpickler must refuse."""


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"state_dict": {"x": NotWeights()}}, tmp_path / "evil.ckpt")
    with pytest.raises(InteropError, match="weights_only=True"):
        import_autoencoder(tmp_path / "evil.ckpt", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_flux_style_ae_without_quant_convs(tmp_path):
    reference, _ = make_diffusers(tmp_path, latent_channels=16, use_quant_conv=False, use_post_quant_conv=False)
    ldm = diffusers_to_ldm(reference.state_dict(), len(WIDTHS))
    assert not any(k.startswith(("quant_conv", "post_quant_conv")) for k in ldm)
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "ae.safetensors"))
    result = import_autoencoder(tmp_path / "ae.safetensors", tmp_path / "imported", norm_num_groups=4)
    assert result.source_format == "flux" and result.model["latent_channels"] == 16
    assert any("image_size=256 assumed" in n for n in result.notes)
    assert_parity(reference, load_model(tmp_path / "imported"), batch())
    out, _ = export_autoencoder(str(tmp_path / "imported"), tmp_path / "flux_diffusers", "diffusers")
    assert_parity(diffusers.AutoencoderKL.from_pretrained(out).eval(), load_model(tmp_path / "imported"), batch())


# -- bad input: clear errors listing names, nothing written --------------------------------


def test_unknown_missing_and_misshaped_keys_are_listed(tmp_path):
    reference, folder = make_diffusers(tmp_path)
    state = dict(reference.state_dict())
    state["encoder.extra.weight"] = torch.zeros(3)
    del state["decoder.conv_out.bias"]
    state["quant_conv.bias"] = torch.zeros(5)
    save_file({k: v.contiguous() for k, v in state.items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    with pytest.raises(InteropError) as err:
        import_autoencoder(folder, tmp_path / "out")
    text = str(err.value)
    assert "unknown (1): encoder.extra.weight" in text and "missing (1): decoder.conv_out.bias" in text
    assert "wrong shape (1): quant_conv.bias (5,)" in text
    assert not (tmp_path / "out").exists()

    ldm = diffusers_to_ldm(reference.state_dict(), len(WIDTHS))
    ldm["encoder.mid.attn_2.q.weight"] = torch.zeros(1)
    save_file({k: v.contiguous() for k, v in ldm.items()}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(KeyMappingError, match="encoder.mid.attn_2.q.weight"):
        import_autoencoder(tmp_path / "bad.safetensors", tmp_path / "out", norm_num_groups=4)


def test_a_convvae_or_non_image_decoder_is_not_exported_to_diffusers(tmp_path):
    from vae_train.interop import write_export

    for cfg, match in ((ModelConfig(base_channels=8, channel_mult=[1, 2], norm_groups=4), "model.arch=convvae"),
                       (ModelConfig(arch="ldm", in_channels=3, image_size=16, block_out_channels=[8, 16],
                                    layers_per_block=1, norm_num_groups=4, likelihood="logistic"), "gaussian_fixed")):
        write_export(tmp_path / cfg.arch, build_model(cfg).state_dict(), cfg, step=None, extra={}, latent_stats=None)
        with pytest.raises(InteropError, match=match):
            export_autoencoder(str(tmp_path / cfg.arch), tmp_path / "out", "diffusers")


# -- the commands ----------------------------------------------------------------------------


def test_import_then_sample_and_reconstruct_commands_use_the_export(tmp_path, capsys):
    _, folder = make_diffusers(tmp_path)
    assert cli(["import", str(folder), "--out", str(tmp_path / "imp")]) == 0
    printed = capsys.readouterr().out
    assert "model.arch=ldm" in printed and "model.block_out_channels=[8,16,16]" in printed
    assert "scaling_factor" in printed
    assert cli(["sample", "--checkpoint", str(tmp_path / "imp"), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert (tmp_path / "s.png").stat().st_size > 0
    assert cli(["export", str(tmp_path / "imp"), "--out", str(tmp_path / "x"), "--format", "diffusers",
                "--latent-stats", str(tmp_path / "missing.json")]) == 2
    assert "latent statistics file" in capsys.readouterr().err


def test_init_from_refuses_another_architecture_naming_the_settings(tmp_path):
    from vae_train.export import ExportError, initialize_from

    _, folder = make_diffusers(tmp_path)
    import_autoencoder(folder, tmp_path / "imported")
    other = build_model(ModelConfig(arch="ldm", in_channels=3, image_size=16, block_out_channels=[8, 16, 32],
                                    layers_per_block=1, norm_num_groups=4, likelihood="gaussian_fixed"))
    with pytest.raises(ExportError, match=r"model.block_out_channels: export \[8, 16, 16\], config \[8, 16, 32\]"):
        initialize_from(other, str(tmp_path / "imported"))
    same = build_model(load_model(tmp_path / "imported").config)
    initialize_from(same, str(tmp_path / "imported"))
    assert_parity(diffusers.AutoencoderKL.from_pretrained(folder).eval(), same.eval(), batch())


def test_pickled_diffusers_weights_are_read_weights_only(tmp_path):
    reference, _ = make_diffusers(tmp_path)
    reference.save_pretrained(tmp_path / "bin", safe_serialization=False)
    assert (tmp_path / "bin" / "diffusion_pytorch_model.bin").is_file()
    import_autoencoder(tmp_path / "bin", tmp_path / "imported")
    assert_parity(reference, load_model(tmp_path / "imported"), batch())
