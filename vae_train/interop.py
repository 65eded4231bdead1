"""Weights in and out of the diffusion ecosystem: diffusers folders, LDM/SD single files, FLUX's ``ae``.

``vae-train import SRC --out DIR`` turns a published autoencoder into a vae-train export
(``model.safetensors`` + ``config.json``, :mod:`vae_train.export`) that training starts
from (``model.init_from=DIR``) and that ``eval``/``sample``/``reconstruct`` load directly.
``vae-train export CKPT --format diffusers|ldm`` goes the other way, for a model with
``model.arch: ldm``.

Sources ``import`` reads (none is unpickled: safetensors, or ``torch.load(weights_only=True)``):

* a diffusers folder: ``config.json`` + ``diffusion_pytorch_model.safetensors`` (diffusers'
  names are vae-train's, so the weights load as they are);
* an LDM / Stable Diffusion single file (``.safetensors``, or a pickled ``.ckpt``/``.pt``
  read weights-only): the autoencoder's own keys, or a whole SD checkpoint whose
  ``first_stage_model.`` part is taken; LDM training files' ``loss.`` (discriminator,
  LPIPS) and ``model_ema.`` entries are reported and left out;
* FLUX's ``ae.safetensors``: LDM names without ``quant_conv``/``post_quant_conv``.

An LDM file does not say its GroupNorm group count (32 in every published LDM, SD and
FLUX autoencoder, assumed unless ``norm_num_groups`` is given) nor an image size; a file
that :func:`export_ldm` wrote carries its config in the safetensors metadata.

Latent statistics (``scaling_factor``, ``shift_factor``, ``latents_mean``, ``latents_std``):
a diffusers folder's config carries them and the import keeps them in the export's
``latent_stats.json`` (the JSON ``vae-train latent-stats`` writes, same keys); the diffusers
export fills its config from ``--latent-stats FILE``, else from that file, and says so
plainly when neither exists (then ``scaling_factor`` is 1.0, no scaling, not a guessed 0.18215).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vae_train.errors import VaeTrainError
from vae_train.export import CONFIG_FILE, EXPORT_FORMAT, WEIGHTS_FILE, load_model

if TYPE_CHECKING:
    import torch

    from vae_train.config import ModelConfig, S3Config

DIFFUSERS_CONFIG = "config.json"
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_PICKLED_WEIGHTS = "diffusion_pytorch_model.bin"
LATENT_STATS_FILE = "latent_stats.json"
LATENT_STAT_KEYS = ("scaling_factor", "shift_factor", "latents_mean", "latents_std")
LDM_FORMAT = "vae-train-ldm/1"
DIFFUSERS_VERSION = "0.42.1"  # the version the export is tested against (tests/unit/test_interop.py)
LDM_NORM_GROUPS = 32
DEFAULT_IMAGE_SIZE = 256
_DROPPED_PREFIXES = ("loss.", "model_ema.")  # training-only entries of LDM autoencoder checkpoints
_SD_PREFIX = "first_stage_model."


class InteropError(VaeTrainError):
    """A source that cannot be imported, or a model that cannot be exported in the asked format."""


@dataclass
class ImportResult:
    """What :func:`import_autoencoder` wrote and decided."""

    out_dir: Path
    source_format: str  # diffusers | ldm | flux
    model: dict[str, Any]  # the ModelConfig fields of the export
    latent_stats: dict[str, Any] | None
    notes: list[str] = field(default_factory=list)

    def overrides(self) -> list[str]:
        """The ``model.*`` overrides a training config needs to start from this export."""
        keys = ("arch", "in_channels", "image_size", "block_out_channels", "layers_per_block", "latent_channels",
                "norm_num_groups", "mid_block_add_attention", "use_quant_conv", "use_post_quant_conv", "likelihood")
        def text(value: Any) -> str:
            return value if isinstance(value, str) else json.dumps(value).replace(" ", "")

        return [f"model.{k}={text(self.model[k])}" for k in keys] + [
            f"model.init_from={self.out_dir}"]


# ------------------------------------------------------------------ reading sources


def _load_file(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and safetensors metadata of one weights file; pickles only through weights-only loading."""
    import torch
    from safetensors import safe_open

    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as fh:
                return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
        except Exception as exc:  # safetensors raises its own error types for damaged files
            raise InteropError(f"{path} is not a readable safetensors file: {exc}") from None
    if path.suffix in (".ckpt", ".pt", ".pth", ".bin"):
        try:
            loaded = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # the restricted unpickler refuses anything but tensors and containers
            raise InteropError(f"{path} cannot be read with torch.load(weights_only=True) (only tensors and plain "
                               f"containers are accepted; convert it to safetensors): {exc}") from None
        if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
            loaded = loaded["state_dict"]
        if not isinstance(loaded, dict) or not all(isinstance(v, torch.Tensor) for v in loaded.values()):
            raise InteropError(f"{path} holds no state dict of tensors (nor one under 'state_dict')")
        return dict(loaded), {}
    raise InteropError(f"{path}: unknown weights file type {path.suffix!r}; expected .safetensors, .ckpt, .pt, "
                       ".pth or .bin")


def _diffusers_model_config(config: dict[str, Any], image_size: int | None) -> dict[str, Any]:
    """ModelConfig fields for a diffusers ``AutoencoderKL`` config, refusing what ``arch: ldm`` is not."""
    if config.get("_class_name", "AutoencoderKL") != "AutoencoderKL":
        raise InteropError(f"the diffusers config describes a {config['_class_name']}, not an AutoencoderKL")
    widths = list(config.get("block_out_channels", (64,)))
    problems = []
    for key, allowed in (("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")):
        kinds = set(config.get(key, (allowed,)))
        if kinds != {allowed}:
            problems.append(f"{key}={sorted(kinds)} (only {allowed})")
    if config.get("act_fn", "silu") != "silu":
        problems.append(f"act_fn={config['act_fn']!r} (only silu)")
    in_ch, out_ch = config.get("in_channels", 3), config.get("out_channels", 3)
    if in_ch != out_ch:
        problems.append(f"in_channels={in_ch} != out_channels={out_ch} (the decoder must output the image)")
    if problems:
        raise InteropError("the diffusers config is not an AutoencoderKL that model.arch=ldm holds: " + "; ".join(problems))
    size = config.get("sample_size", DEFAULT_IMAGE_SIZE)
    size = size[0] if isinstance(size, (list, tuple)) else size
    return {
        "arch": "ldm", "in_channels": in_ch, "image_size": int(image_size or size), "block_out_channels": widths,
        "layers_per_block": config.get("layers_per_block", 1), "latent_channels": config.get("latent_channels", 4),
        "norm_num_groups": config.get("norm_num_groups", 32),
        "mid_block_add_attention": config.get("mid_block_add_attention", True),
        "use_quant_conv": config.get("use_quant_conv", True),
        "use_post_quant_conv": config.get("use_post_quant_conv", True), "likelihood": "gaussian_fixed",
    }


def _stats_from_diffusers(config: dict[str, Any], source: str) -> dict[str, Any] | None:
    stats = {k: config[k] for k in LATENT_STAT_KEYS if config.get(k) is not None}
    if not stats:
        return None
    return {**stats, "source": f"the diffusers config of {source} (published values, not measured here)"}


def _infer_ldm_config(state: dict[str, torch.Tensor], image_size: int | None, norm_num_groups: int | None
                      ) -> tuple[dict[str, Any], list[str]]:
    """ModelConfig fields from the shapes of an LDM-named state dict (norm groups and image size are not in it)."""
    levels = sorted({int(m.group(1)) for k in state if (m := re.match(r"encoder\.down\.(\d+)\.", k))})
    required = ("encoder.conv_in.weight", "decoder.conv_in.weight", "decoder.conv_out.weight")
    missing = [k for k in required if k not in state]
    if not levels or missing:
        raise InteropError("not an LDM autoencoder state dict: "
                           + (f"missing {', '.join(missing)}" if missing else "no encoder.down.N blocks"))
    if levels != list(range(len(levels))):
        raise InteropError(f"encoder.down levels {levels} are not 0..{len(levels) - 1}")
    widths = []
    for level in levels:
        key = f"encoder.down.{level}.block.0.conv1.weight"
        if key not in state:
            raise InteropError(f"missing {key}")
        widths.append(int(state[key].shape[0]))
    layers = len({m.group(1) for k in state if (m := re.match(r"encoder\.down\.0\.block\.(\d+)\.", k))})
    in_ch, out_ch = int(state["encoder.conv_in.weight"].shape[1]), int(state["decoder.conv_out.weight"].shape[0])
    if in_ch != out_ch:
        raise InteropError(f"the decoder outputs {out_ch} channels for {in_ch}-channel images; model.arch=ldm needs "
                           "the decoder to output the image")
    notes = []
    if norm_num_groups is None:
        norm_num_groups = LDM_NORM_GROUPS
        notes.append(f"norm_num_groups={LDM_NORM_GROUPS} assumed (LDM files do not record it; every published "
                     "LDM/SD/FLUX autoencoder uses 32)")
    if image_size is None:
        image_size = DEFAULT_IMAGE_SIZE
        notes.append(f"image_size={DEFAULT_IMAGE_SIZE} assumed (sets what `sample` draws; any size divisible by "
                     f"{2 ** (len(widths) - 1)} is encoded)")
    return {
        "arch": "ldm", "in_channels": in_ch, "image_size": image_size, "block_out_channels": widths,
        "layers_per_block": layers, "latent_channels": int(state["decoder.conv_in.weight"].shape[1]),
        "norm_num_groups": norm_num_groups, "mid_block_add_attention": "encoder.mid.attn_1.q.weight" in state,
        "use_quant_conv": "quant_conv.weight" in state, "use_post_quant_conv": "post_quant_conv.weight" in state,
        "likelihood": "gaussian_fixed",
    }, notes


def _select_autoencoder(state: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The autoencoder's entries: a whole SD checkpoint's ``first_stage_model.`` part; training extras dropped."""
    notes = []
    if any(k.startswith(_SD_PREFIX) for k in state):
        others = sum(not k.startswith(_SD_PREFIX) for k in state)
        state = {k[len(_SD_PREFIX):]: v for k, v in state.items() if k.startswith(_SD_PREFIX)}
        notes.append(f"took the {len(state)} '{_SD_PREFIX}' tensors of a whole Stable Diffusion checkpoint "
                     f"(left out {others} tensors of its other models)")
    dropped = [k for k in state if k.startswith(_DROPPED_PREFIXES)]
    if dropped:
        notes.append(f"left out {len(dropped)} training-only tensors ({', '.join(sorted({k.split('.')[0] for k in dropped}))}.*)")
        state = {k: v for k, v in state.items() if not k.startswith(_DROPPED_PREFIXES)}
    return state, notes


def _read_source(src: Path, image_size: int | None, norm_num_groups: int | None
                 ) -> tuple[str, dict[str, Any], dict[str, torch.Tensor], dict[str, Any] | None, list[str]]:
    """(format, ModelConfig fields, diffusers-named weights, latent stats, notes) of an import source."""
    from vae_train.model.ldm_keys import ldm_to_diffusers

    notes: list[str] = []
    if src.is_dir():
        if not (src / DIFFUSERS_CONFIG).is_file() and (src / "vae" / DIFFUSERS_CONFIG).is_file():
            src = src / "vae"  # a whole diffusers pipeline keeps its autoencoder there
            notes.append(f"took the pipeline's autoencoder in {src}")
        if not (src / DIFFUSERS_CONFIG).is_file():
            raise InteropError(f"{src} is a directory without {DIFFUSERS_CONFIG} (nor vae/{DIFFUSERS_CONFIG}): not a "
                               "diffusers AutoencoderKL folder")
        weights = src / DIFFUSERS_WEIGHTS
        if not weights.is_file():
            weights = src / DIFFUSERS_PICKLED_WEIGHTS
            if not weights.is_file():
                raise InteropError(f"{src} has {DIFFUSERS_CONFIG} but no {DIFFUSERS_WEIGHTS}")
        try:
            config = json.loads((src / DIFFUSERS_CONFIG).read_text())
        except ValueError as exc:
            raise InteropError(f"{src / DIFFUSERS_CONFIG} is not valid JSON: {exc}") from None
        fields = _diffusers_model_config(config, image_size)
        if norm_num_groups is not None and norm_num_groups != fields["norm_num_groups"]:
            raise InteropError(f"norm_num_groups={norm_num_groups} contradicts the diffusers config's "
                               f"{fields['norm_num_groups']}")
        state, _ = _load_file(weights)
        return "diffusers", fields, state, _stats_from_diffusers(config, str(src)), notes
    if not src.is_file():
        raise InteropError(f"{src} does not exist")
    state, metadata = _load_file(src)
    state, notes = _select_autoencoder(state)
    if metadata.get("format") == LDM_FORMAT:  # written by export_ldm: the config travels with it
        fields = json.loads(metadata["model"])
        if image_size:
            fields["image_size"] = image_size
        stats = json.loads(metadata["latent_stats"]) if metadata.get("latent_stats") else None
        if stats is not None:
            stats["source"] = f"the metadata of {src} (written by vae-train export --format ldm)"
        return "ldm", fields, ldm_to_diffusers(state, len(fields["block_out_channels"])), stats, notes
    fields, inferred = _infer_ldm_config(state, image_size, norm_num_groups)
    kind = "ldm" if fields["use_quant_conv"] else "flux"
    return kind, fields, ldm_to_diffusers(state, len(fields["block_out_channels"])), None, notes + inferred


def import_autoencoder(src: str | Path, out_dir: str | Path, *, image_size: int | None = None,
                       norm_num_groups: int | None = None) -> ImportResult:
    """Convert ``src`` (see the module docstring) into a vae-train export directory ``out_dir``.

    Every tensor must find its parameter and every parameter its tensor, with the same shape;
    otherwise :class:`InteropError` lists the unknown, missing and mis-shaped names and nothing
    is written.
    """
    from vae_train.config import ModelConfig
    from vae_train.model import build_model

    fmt, fields, state, stats, notes = _read_source(Path(src), image_size, norm_num_groups)
    try:
        cfg = ModelConfig.model_validate(fields)
    except ValueError as exc:
        raise InteropError(f"{src}: the architecture read from it is not valid: {exc}") from None
    model = build_model(cfg)
    _check_keys(model.state_dict(), state, str(src))
    weights = {k: v.float().contiguous() for k, v in state.items()}
    meta = {"source": str(src), "source_format": fmt}
    write_export(Path(out_dir), weights, cfg, step=None, extra=meta, latent_stats=stats)
    return ImportResult(Path(out_dir), fmt, cfg.model_dump(mode="json"), stats, notes)


def _check_keys(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor], source: str) -> None:
    unknown = sorted(set(given) - set(expected))
    missing = sorted(set(expected) - set(given))
    shapes = sorted(f"{k} {tuple(given[k].shape)} (model: {tuple(expected[k].shape)})"
                    for k in set(given) & set(expected) if given[k].shape != expected[k].shape)
    if unknown or missing or shapes:
        parts = [f"{label} ({len(names)}): {', '.join(names[:20])}{' ...' if len(names) > 20 else ''}"
                 for label, names in (("unknown", unknown), ("missing", missing), ("wrong shape", shapes)) if names]
        raise InteropError(f"{source} does not match the architecture read from it; " + "; ".join(parts))


def write_export(out: Path, weights: dict[str, torch.Tensor], cfg: ModelConfig, *, step: int | None,
                 extra: dict[str, Any], latent_stats: dict[str, Any] | None) -> None:
    """A vae-train export directory: weights and latent stats first, ``config.json`` (what makes it one) last."""
    from safetensors.torch import save

    from vae_train import __version__
    from vae_train.storage import write_atomic

    out.mkdir(parents=True, exist_ok=True)
    write_atomic(out / WEIGHTS_FILE, save(weights, metadata={"format": EXPORT_FORMAT}))
    if latent_stats is not None:
        write_atomic(out / LATENT_STATS_FILE, (json.dumps(latent_stats, indent=1) + "\n").encode())
    meta = {"format": EXPORT_FORMAT, "model": cfg.model_dump(mode="json"), "dtype": "fp32", "step": step,
            "library_version": __version__, **extra}
    write_atomic(out / CONFIG_FILE, (json.dumps(meta, indent=1, sort_keys=True) + "\n").encode())


# ------------------------------------------------------------------ exporting


def read_latent_stats(path: str | Path) -> dict[str, Any]:
    """A latent-statistics JSON (``vae-train latent-stats``): the diffusers fields it has, checked."""
    path = Path(path)
    try:
        raw = json.loads(path.read_text())
    except FileNotFoundError:
        raise InteropError(f"latent statistics file {path} does not exist") from None
    except ValueError as exc:
        raise InteropError(f"latent statistics file {path} is not valid JSON: {exc}") from None
    stats = {k: raw[k] for k in LATENT_STAT_KEYS if raw.get(k) is not None}
    if not stats:
        raise InteropError(f"{path} holds none of {', '.join(LATENT_STAT_KEYS)}")
    scale = stats.get("scaling_factor")
    if scale is not None and not (isinstance(scale, (int, float)) and math.isfinite(scale) and scale > 0):
        raise InteropError(f"{path}: scaling_factor={scale!r} must be a finite number > 0")
    return stats


def _resolve_stats(src: str, stats_file: str | None, channels: int) -> tuple[dict[str, Any], str, bool]:
    """(the diffusers latent fields to write, a sentence saying where they came from, whether they are known)."""
    if stats_file:
        stats, origin = read_latent_stats(stats_file), f"from {stats_file}"
    elif not src.startswith("s3://") and (Path(src) / LATENT_STATS_FILE).is_file():
        stats, origin = read_latent_stats(Path(src) / LATENT_STATS_FILE), f"from {Path(src) / LATENT_STATS_FILE}"
    else:
        return ({"scaling_factor": 1.0, "shift_factor": None, "latents_mean": None, "latents_std": None},
                "latent statistics ABSENT: scaling_factor=1.0 (no scaling), shift_factor/latents_mean/latents_std "
                "unset; measure them with `vae-train latent-stats` and export again with --latent-stats FILE", False)
    for key in ("latents_mean", "latents_std"):
        if stats.get(key) is not None and len(stats[key]) != channels:
            raise InteropError(f"latent statistics {key} has {len(stats[key])} entries for {channels} latent channels")
    filled = {k: stats.get(k) for k in LATENT_STAT_KEYS}
    if filled["scaling_factor"] is None:
        filled["scaling_factor"] = 1.0
        origin += " (no scaling_factor in it: 1.0 written)"
    return filled, origin, True


def check_exportable(cfg: ModelConfig) -> None:
    """Refuse models diffusers' AutoencoderKL cannot represent (its decoder outputs the image)."""
    if cfg.arch != "ldm":
        raise InteropError(f"model.arch={cfg.arch}: only model.arch=ldm is a diffusers/LDM AutoencoderKL "
                           "(export ConvVAE with --format vae-train)")
    if cfg.likelihood != "gaussian_fixed":
        raise InteropError(f"model.likelihood={cfg.likelihood}: the decoder outputs likelihood parameters, not the "
                           "image diffusers' AutoencoderKL decodes to; only gaussian_fixed models export to "
                           "diffusers/LDM")


def diffusers_config(cfg: ModelConfig, stats: dict[str, Any]) -> dict[str, Any]:
    """The ``config.json`` of a diffusers ``AutoencoderKL`` for ``cfg`` with the latent fields ``stats``."""
    levels = len(cfg.block_out_channels)
    return {
        "_class_name": "AutoencoderKL", "_diffusers_version": DIFFUSERS_VERSION,
        "in_channels": cfg.in_channels, "out_channels": cfg.in_channels,
        "down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels,
        "block_out_channels": list(cfg.block_out_channels), "layers_per_block": cfg.layers_per_block,
        "act_fn": "silu", "latent_channels": cfg.latent_channels, "norm_num_groups": cfg.norm_num_groups,
        "sample_size": cfg.image_size, "force_upcast": True, "use_quant_conv": cfg.use_quant_conv,
        "use_post_quant_conv": cfg.use_post_quant_conv, "mid_block_add_attention": cfg.mid_block_add_attention,
        **stats,
    }


def export_autoencoder(src: str, out: str | Path, fmt: str, *, latent_stats: str | None = None,
                       s3_cfg: S3Config | None = None) -> tuple[Path, str]:
    """Write ``src`` (checkpoint or export, local or s3://) as a diffusers folder or an LDM single file.

    ``fmt``: ``diffusers`` (``out`` = a folder ``AutoencoderKL.from_pretrained`` loads) or ``ldm``
    (``out`` = one ``.safetensors`` file in LDM names). Returns (what was written, where the latent
    statistics came from).
    """
    from safetensors.torch import save

    from vae_train.model.ldm_keys import diffusers_to_ldm
    from vae_train.storage import write_atomic

    model = load_model(src, s3_cfg=s3_cfg)
    cfg = model.config
    check_exportable(cfg)
    stats, origin, measured = _resolve_stats(src, latent_stats, cfg.latent_channels)
    weights = {k: v.detach().float().contiguous() for k, v in model.state_dict().items()}
    out = Path(out)
    if fmt == "diffusers":
        out.mkdir(parents=True, exist_ok=True)
        write_atomic(out / DIFFUSERS_WEIGHTS, save(weights, metadata={"format": "pt"}))
        write_atomic(out / DIFFUSERS_CONFIG, (json.dumps(diffusers_config(cfg, stats), indent=1) + "\n").encode())
        return out, origin
    if fmt == "ldm":
        if out.suffix != ".safetensors":
            raise InteropError(f"--format ldm writes one file: --out must end in .safetensors, got {out}")
        ldm = diffusers_to_ldm(weights, len(cfg.block_out_channels))
        known = {k: v for k, v in stats.items() if v is not None}
        model_fields = {**cfg.model_dump(mode="json"), "init_from": ""}  # the file is the weights now
        metadata = {"format": LDM_FORMAT, "model": json.dumps(model_fields),
                    "latent_stats": json.dumps(known) if measured else ""}
        write_atomic(out, save(ldm, metadata=metadata))
        return out, origin
    raise InteropError(f"unknown export format {fmt!r}; choose diffusers or ldm")
