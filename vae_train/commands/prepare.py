"""``vae-train prepare {fashion-mnist,images,arrays,skimage-photos,index}``: write WebDataset shards + index.json.

Examples::

    vae-train prepare fashion-mnist --out data/fashion-mnist
    vae-train prepare images ~/photos --labels-from-folders --out s3://bucket/photos --workers 8
    vae-train prepare arrays faces.npz --out data/faces --samples-per-shard 2000
    vae-train prepare skimage-photos --crop-size 64 --crops-per-photo 256 --out data/photo-crops
    # SLURM job array (slurm/prepare.sbatch): every task writes its slice, then one step merges
    vae-train prepare images SRC --out DIR --num-slices 16 --slice $SLURM_ARRAY_TASK_ID
    vae-train prepare index DIR
"""

from __future__ import annotations

import argparse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, help="output directory or s3://bucket/prefix")
    parser.add_argument("--samples-per-shard", type=int, default=5000, help="samples per shard (default 5000)")
    parser.add_argument("--max-shard-bytes", type=int, default=512 * 1024**2,
                        help="byte limit per shard; lowers --samples-per-shard by an estimate (default 512 MiB)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of the train pool held out as split 'val' (default 0.1)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the train/val split and shard order (default 0)")
    parser.add_argument("--workers", type=int, default=None, help="encoding processes (default: CPUs, at most 8)")
    parser.add_argument("--overwrite", action="store_true", help="replace shards made with other options")
    parser.add_argument("--num-slices", type=int, default=1, help="job-array mode: number of slices")
    parser.add_argument("--slice", type=int, default=0, help="job-array mode: this task's slice (0-based)")
    parser.add_argument("--limit", type=int, default=0, help="use only the first N samples of each pool (tests)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("prepare", help="write a dataset as WebDataset shards with index.json")
    kinds = parser.add_subparsers(dest="kind", required=True, metavar="KIND")
    fmnist = kinds.add_parser("fashion-mnist", help="the Fashion-MNIST IDX files (splits train, val, test)")
    fmnist.add_argument("--source", default="/usr/share/datasets/fashion-mnist", help="directory of the IDX files")
    images = kinds.add_parser("images", help="a folder tree of images (any format Pillow reads)")
    images.add_argument("src", help="root folder")
    images.add_argument("--labels-from-folders", action="store_true",
                        help="label = index of the first-level folder name (sorted)")
    arrays = kinds.add_parser("arrays", help="uint8 images in a .npy (N,H,W[,C]) or .npz (images[, labels])")
    arrays.add_argument("file", help=".npy or .npz file")
    arrays.add_argument("--labels", default=None, help=".npy of integer labels (for a .npy image file)")
    photos = kinds.add_parser("skimage-photos", help="random square crops of scikit-image's real RGB photographs")
    photos.add_argument("--crop-size", type=int, default=64, help="crop side in pixels (default 64)")
    photos.add_argument("--crops-per-photo", type=int, default=256, help="crops of each of the 8 photos (default 256)")
    for sub in (fmnist, images, arrays, photos):
        _common(sub)
    index = kinds.add_parser("index", help="write index.json: merge job-array slices, or scan existing shards")
    index.add_argument("out", help="directory or s3://bucket/prefix")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging

    from vae_train.config import S3Config
    from vae_train.data import datasets
    from vae_train.data.prepare import PrepareOptions, default_workers, prepare, write_index

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(message)s")
    logging.getLogger("vae_train.data").setLevel(logging.INFO)  # resume notes; not botocore's chatter
    s3_cfg = S3Config()
    if args.kind == "index":
        index = write_index(args.out, s3_cfg)
        _summary(args.out, index)
        return 0
    if args.kind == "fashion-mnist":
        source = datasets.FashionMnist(args.source)
    elif args.kind == "skimage-photos":
        source = datasets.PhotoCrops(args.crop_size, args.crops_per_photo, args.seed)
    elif args.kind == "images":
        source = datasets.ImageFolder(args.src, labels_from_folders=args.labels_from_folders)
    else:
        source = datasets.ArrayFile(args.file, args.labels)
    if args.limit:
        source.limit(args.limit)
    options = PrepareOptions(samples_per_shard=args.samples_per_shard, max_shard_bytes=args.max_shard_bytes,
                             val_fraction=args.val_fraction, seed=args.seed)
    index = prepare(source, args.out, options, workers=args.workers or default_workers(), overwrite=args.overwrite,
                    num_slices=args.num_slices, slice_index=args.slice, progress=not args.no_progress, s3_cfg=s3_cfg)
    if index is None:
        print(f"slice {args.slice} of {args.num_slices} written to {args.out}; "
              f"run `vae-train prepare index {args.out}` after all slices finished")
    else:
        _summary(args.out, index)
    return 0


def _summary(out: str, index) -> None:
    for split, shards in sorted(index.splits.items()):
        print(f"{out}: {split}: {index.num_samples(split)} samples in {len(shards)} shard(s)")
