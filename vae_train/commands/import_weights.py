"""``vae-train import SRC --out DIR [--image-size N] [--norm-num-groups G]``: a published autoencoder -> an export.

SRC: a diffusers ``AutoencoderKL`` folder (``config.json`` + ``diffusion_pytorch_model.safetensors``; a whole
pipeline folder: its ``vae/``), an LDM / Stable Diffusion single file (``.safetensors``; a pickled ``.ckpt``
only through ``torch.load(weights_only=True)``), or FLUX's ``ae.safetensors``. DIR is a vae-train export
(``model.arch: ldm``): ``vae_train.load_model(DIR)``, ``vae-train eval/sample/reconstruct --checkpoint DIR``,
and ``model.init_from=DIR`` for training. Unknown, missing or mis-shaped weights are an error listing them.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("import", help="import a diffusers / LDM / FLUX autoencoder as a vae-train export")
    parser.add_argument("src", help="diffusers AutoencoderKL folder, LDM/SD single file (.safetensors/.ckpt) or "
                        "FLUX ae.safetensors")
    parser.add_argument("--out", required=True, help="export directory to write (model.safetensors + config.json)")
    parser.add_argument("--image-size", type=int, default=None, help="model.image_size of the export (default: the "
                        "diffusers sample_size, else 256); any size divisible by the downsampling factor is encoded")
    parser.add_argument("--norm-num-groups", type=int, default=None, help="GroupNorm groups of an LDM file (not "
                        "recorded in it; default 32, as in every published LDM/SD/FLUX autoencoder)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vae_train.interop import import_autoencoder

    result = import_autoencoder(args.src, args.out, image_size=args.image_size, norm_num_groups=args.norm_num_groups)
    print(f"imported {args.src} ({result.source_format}) -> {result.out_dir}")
    for note in result.notes:
        print(f"  note: {note}")
    if result.latent_stats is None:
        print("  latent statistics: ABSENT in the source (measure them with `vae-train latent-stats`)")
    else:
        shown = {k: v for k, v in result.latent_stats.items() if k != "source"}
        print(f"  latent statistics: {shown} (from {result.latent_stats.get('source', 'the source')})")
    print("  train from it with: " + " ".join(result.overrides()))
    return 0
