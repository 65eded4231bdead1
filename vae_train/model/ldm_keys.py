"""The one mapping between LDM single-file parameter names and diffusers' (= vae-train's ``arch: ldm``) names.

LDM / Stable Diffusion single-file checkpoints and FLUX's ``ae.safetensors`` name the
autoencoder after CompVis' ``ldm/modules/diffusionmodules/model.py``: ``encoder.down.{i}.
block.{j}``, ``encoder.mid.attn_1.q`` (1x1 convolutions), ``decoder.up.{level}`` indexed by
resolution level, ``nin_shortcut``, ``norm_out``. diffusers (and
:class:`~vae_train.model.ldm.AutoencoderKL`) name the same tensors ``encoder.down_blocks.{i}.
resnets.{j}``, ``mid_block.attentions.0.to_q`` (linear layers), ``decoder.up_blocks.{k}`` in
decoding order (``k = levels - 1 - level``), ``conv_shortcut``, ``conv_norm_out``.

Names that do not fit a rule are collected and reported together (:class:`KeyMappingError`),
never dropped: a wrong file is a clear error, not a half-loaded model.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from vae_train.model.errors import ModelError


class KeyMappingError(ModelError):
    """Parameter names that the LDM <-> diffusers mapping does not know."""


# (LDM pattern, diffusers pattern) for the parts below ``encoder.``/``decoder.``; ``{level}`` is
# the LDM resolution level, ``{k}`` diffusers' block index, ``{j}`` a ResNet index.
_ATTENTION = {"norm": "group_norm", "q": "to_q", "k": "to_k", "v": "to_v", "proj_out": "to_out.0"}
_RESNET = {"norm1": "norm1", "conv1": "conv1", "norm2": "norm2", "conv2": "conv2", "nin_shortcut": "conv_shortcut"}
_PARAM = r"(weight|bias)"


def _ldm_to_diffusers_key(key: str, levels: int) -> str | None:
    """The diffusers name of LDM parameter ``key``, or None when no rule fits."""
    if key in ("quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight", "post_quant_conv.bias"):
        return key
    m = re.fullmatch(rf"(encoder|decoder)\.(.+)\.{_PARAM}", key)
    if m is None:
        return None
    side, body, param = m.groups()
    new = _ldm_body(side, body, levels)
    return None if new is None else f"{side}.{new}.{param}"


def _ldm_body(side: str, body: str, levels: int) -> str | None:
    if body in ("conv_in", "conv_out"):
        return body
    if body == "norm_out":
        return "conv_norm_out"
    if m := re.fullmatch(r"mid\.block_([12])\.(\w+)", body):
        layer = _RESNET.get(m.group(2))
        return None if layer is None else f"mid_block.resnets.{int(m.group(1)) - 1}.{layer}"
    if m := re.fullmatch(r"mid\.attn_1\.(\w+)", body):
        layer = _ATTENTION.get(m.group(1))
        return None if layer is None else f"mid_block.attentions.0.{layer}"
    level_rule = r"down\.(\d+)" if side == "encoder" else r"up\.(\d+)"
    blocks = "down_blocks" if side == "encoder" else "up_blocks"
    m = re.fullmatch(rf"{level_rule}\.(block\.(\d+)\.(\w+)|downsample\.conv|upsample\.conv)", body)
    if m is None:
        return None
    level = int(m.group(1))
    if level >= levels:
        return None
    index = level if side == "encoder" else levels - 1 - level
    if m.group(3) is not None:
        layer = _RESNET.get(m.group(4))
        return None if layer is None else f"{blocks}.{index}.resnets.{m.group(3)}.{layer}"
    sampler = m.group(2).split(".")[0]
    if (sampler == "downsample") != (side == "encoder"):
        return None
    return f"{blocks}.{index}.{'downsamplers' if side == 'encoder' else 'upsamplers'}.0.conv"


def _is_attention_projection(diffusers_key: str) -> bool:
    return bool(re.search(r"mid_block\.attentions\.0\.(to_q|to_k|to_v|to_out\.0)\.weight$", diffusers_key))


def ldm_to_diffusers(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """An LDM-named autoencoder state dict in diffusers' names (attention 1x1 convs become linear weights).

    ``levels`` = ``len(block_out_channels)``. Raises :class:`KeyMappingError` listing every name
    no rule fits.
    """
    out, unknown = {}, []
    for key, value in state.items():
        new = _ldm_to_diffusers_key(key, levels)
        if new is None:
            unknown.append(key)
            continue
        if _is_attention_projection(new) and value.dim() == 4:
            value = value[:, :, 0, 0]
        out[new] = value
    if unknown:
        raise KeyMappingError(_listing("are not parameters of an LDM autoencoder", unknown))
    return out


def diffusers_to_ldm(state: Mapping[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """The inverse of :func:`ldm_to_diffusers` (attention projections back to 1x1 convolutions)."""
    inverse = {}
    for key in state:
        inverse[key] = _diffusers_to_ldm_key(key, levels)
    unknown = [key for key, new in inverse.items() if new is None]
    if unknown:
        raise KeyMappingError(_listing("are not parameters of a diffusers AutoencoderKL", unknown))
    out = {}
    for key, value in state.items():
        if _is_attention_projection(key) and value.dim() == 2:
            value = value[:, :, None, None]
        out[inverse[key]] = value  # type: ignore[index]
    return out


def _diffusers_to_ldm_key(key: str, levels: int) -> str | None:
    """Invert the rules by construction: the LDM name whose diffusers name is ``key``."""
    candidates = _ldm_names_for(key, levels)
    for candidate in candidates:
        if _ldm_to_diffusers_key(candidate, levels) == key:
            return candidate
    return None


def _ldm_names_for(key: str, levels: int) -> list[str]:
    """Plausible LDM names for diffusers ``key`` (checked against the forward rules by the caller)."""
    m = re.fullmatch(rf"(encoder|decoder)\.(.+)\.{_PARAM}", key)
    if m is None:
        return [key]
    side, body, param = m.groups()
    resnet_inv = {v: k for k, v in _RESNET.items()}
    attention_inv = {v: k for k, v in _ATTENTION.items()}
    names = []
    if body in ("conv_in", "conv_out"):
        names.append(body)
    elif body == "conv_norm_out":
        names.append("norm_out")
    elif mm := re.fullmatch(r"mid_block\.resnets\.([01])\.(\w+)", body):
        names.append(f"mid.block_{int(mm.group(1)) + 1}.{resnet_inv.get(mm.group(2), '?')}")
    elif mm := re.fullmatch(r"mid_block\.attentions\.0\.(.+)", body):
        names.append(f"mid.attn_1.{attention_inv.get(mm.group(1), '?')}")
    elif mm := re.fullmatch(r"(down_blocks|up_blocks)\.(\d+)\.(resnets\.(\d+)\.(\w+)|downsamplers\.0\.conv|upsamplers\.0\.conv)",
                            body):
        index = int(mm.group(2))
        level = index if side == "encoder" else levels - 1 - index
        prefix = f"{'down' if side == 'encoder' else 'up'}.{level}"
        if mm.group(4) is not None:
            names.append(f"{prefix}.block.{mm.group(4)}.{resnet_inv.get(mm.group(5), '?')}")
        else:
            names.append(f"{prefix}.{'downsample' if side == 'encoder' else 'upsample'}.conv")
    return [f"{side}.{name}.{param}" for name in names]


def _listing(what: str, keys: list[str], limit: int = 20) -> str:
    shown = ", ".join(sorted(keys)[:limit])
    more = f" (and {len(keys) - limit} more)" if len(keys) > limit else ""
    return f"{len(keys)} parameter name(s) {what}: {shown}{more}"
