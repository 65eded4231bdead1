"""``vae-train build-ops [--cuda] [--verbose]``: compile the fused reparam/KL op ahead of time.

Training builds the op on first use anyway (cached per user); this command does
it up front, e.g. in a Docker image build, and shows the full compiler log when
the build fails instead of falling back to the reference.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "build-ops",
        help="compile the fused reparameterization/KL op (C++ and, with CUDA, the GPU kernel)",
        description=__doc__,
    )
    parser.add_argument(
        "--cuda",
        action="store_true",
        help="compile the CUDA kernel even without a visible GPU (Docker builds); needs nvcc",
    )
    parser.add_argument("--verbose", action="store_true", help="print the compiler commands and output")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from vae_train.ops import backend
    from vae_train.ops.build import build

    build_plan = build(with_cuda=True if args.cuda else None, verbose=args.verbose)
    print(f"built: {build_plan.build_dir}")
    print(f"cuda kernel: {'yes' if build_plan.with_cuda else 'no'}")
    print(f"backend: {backend()}")
    return 0
