"""``vae-train schedules plot CONFIG [key=value ...] --out file.png``: plot beta(step) and LR(step).

A quick look before a long run: the KL weight and the learning rate the trainer
will use at every step of ``train.max_steps``, from the same pure functions.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("schedules", help="inspect the KL-weight and learning-rate schedules")
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION")
    plot = actions.add_parser("plot", help="plot beta and the learning rate against the step (PNG)")
    plot.add_argument("config", nargs="?", default=None, help="YAML config file (defaults when omitted)")
    plot.add_argument("overrides", nargs="*", help="dotted overrides, e.g. kl.schedule=cyclical kl.cycles=4")
    plot.add_argument("--out", required=True, help="output image path (.png)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from vae_train.config import load_config
    from vae_train.errors import VaeTrainError
    from vae_train.schedules import build_beta_schedule, build_lr_schedule

    config_path, overrides = args.config, list(args.overrides)
    if config_path is not None and "=" in config_path:  # no file given, only overrides
        config_path, overrides = None, [config_path, *overrides]
    cfg = load_config(config_path, overrides)
    out = Path(args.out)
    if not out.parent.is_dir():
        raise VaeTrainError(f"cannot write {str(out)!r}: directory {str(out.parent)!r} does not exist; create it first")

    steps = list(range(cfg.train.max_steps))  # the steps a run takes: 0 .. max_steps - 1
    beta = build_beta_schedule(cfg.kl, cfg.train.max_steps)
    lr_mult = build_lr_schedule(cfg.optimizer, cfg.train.max_steps)
    fig, (ax_beta, ax_lr) = plt.subplots(2, 1, figsize=(7, 5), sharex=True)
    ax_beta.plot(steps, [beta(s) for s in steps])
    ax_beta.set_ylabel("KL weight beta")
    ax_beta.set_title(f"kl.schedule={cfg.kl.schedule}, free_bits={cfg.kl.free_bits}")
    ax_lr.plot(steps, [cfg.optimizer.lr * lr_mult(s) for s in steps])
    ax_lr.set_ylabel("learning rate")
    ax_lr.set_xlabel("step")
    ax_lr.set_title(f"optimizer.schedule={cfg.optimizer.schedule}, warmup_steps={cfg.optimizer.warmup_steps}")
    fig.tight_layout()
    try:
        fig.savefig(out, dpi=100)
    except OSError as exc:
        raise VaeTrainError(f"cannot write {str(out)!r}: {exc.strerror or exc}; choose a writable --out path") from None
    finally:
        plt.close(fig)
    print(f"wrote {out}")
    return 0
