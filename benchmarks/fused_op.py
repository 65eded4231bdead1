"""Fused reparameterization + KL op vs the textbook PyTorch code and torch.compile of it.

Prints one table per (dtype, threads): forward and forward+backward time of
eager PyTorch, ``torch.compile`` of the same code (``compile``: inductor's
defaults, which draw the noise with inductor's own, slow CPU generator;
``compile-r``: ``fallback_random=True``, aten's randn), and the fused op, each
one's ratio to the fused op, the bytes each keeps alive for backward, and the
fused op against a floor measured in the same run (``torch.randn_like`` of the
same size plus one copy of the inputs). Times are the best of ``--repeats``
rounds, the implementations interleaved inside each round so that a noisy
neighbour slows all of them alike; single-threaded rows measure the thread's CPU
time (``time.thread_time``), multi-threaded rows wall time. Then it checks the
goals of issue 4:

- fused forward+backward >= 3x faster than eager (fp32, one thread)
- fused forward+backward faster than torch.compile (fp32, one thread)
- fused forward+backward within 2x of the floor
- fused op saves at most half the bytes for backward that eager saves

Usage::

    python benchmarks/fused_op.py                 # 256x16x32x32 = 2^22, fp32+bf16, 1 and all threads
    python benchmarks/fused_op.py --no-compile --repeats 5
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch

from vae_train.ops import backend, reparam_kl

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def textbook(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The reparameterization and KL as most VAE code writes them."""
    std = torch.exp(0.5 * logvar)
    eps = torch.randn_like(std)
    z = mu + eps * std
    kl = -0.5 * torch.sum(1 + logvar - mu.pow(2) - logvar.exp(), dim=tuple(range(1, mu.dim())))
    return z, kl


def fused(mu: torch.Tensor, logvar: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return reparam_kl(mu, logvar)


def saved_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the distinct storages autograd keeps for backward while ``fn`` runs."""
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(storages.values())


def best_times(cases: dict[str, Callable[[], object]], repeats: int, clock: Callable[[], float]) -> dict[str, float]:
    """Best time in ms of each case over ``repeats`` interleaved rounds (after one warm-up)."""
    for fn in cases.values():
        fn()
    best = {name: float("inf") for name in cases}
    for _ in range(repeats):
        for name, fn in cases.items():
            start = clock()
            fn()
            best[name] = min(best[name], (clock() - start) * 1e3)
    return best


def run_config(shape, dtype, threads: int, repeats: int, with_compile: bool) -> dict[str, dict[str, float]]:
    torch.set_num_threads(threads)
    torch._dynamo.reset()  # compiled CPU kernels bake in the thread count
    gen = torch.Generator().manual_seed(0)
    mu = torch.randn(shape, generator=gen).to(dtype).requires_grad_()
    logvar = (torch.randn(shape, generator=gen) - 1).to(dtype).requires_grad_()
    grad_z = torch.randn(shape, generator=gen).to(dtype)
    impls: dict[str, Callable] = {"eager": textbook}
    if with_compile:
        impls["compile"] = torch.compile(textbook, dynamic=False)
        # Inductor's own CPU random numbers are slow; aten's randn is the stronger baseline.
        impls["compile-r"] = torch.compile(textbook, dynamic=False, options={"fallback_random": True})
    impls["fused"] = fused

    def forward(fn):
        return lambda: fn(mu, logvar)

    def forward_backward(fn):
        def step():
            z, kl = fn(mu, logvar)
            torch.autograd.grad((z, kl), (mu, logvar), (grad_z, torch.ones_like(kl)))

        return step

    cases = {f"{name}/fwd": forward(fn) for name, fn in impls.items()}
    cases |= {f"{name}/fwdbwd": forward_backward(fn) for name, fn in impls.items()}
    with torch.no_grad():
        cases["floor"] = lambda: (torch.randn_like(mu), mu.clone(), logvar.clone())
    # One thread: that thread's CPU time, which a busy machine cannot inflate by
    # descheduling us; several threads: wall time.
    times = best_times(cases, repeats, time.thread_time if threads == 1 else time.perf_counter)
    rows = {}
    for name, fn in impls.items():
        rows[name] = {
            "fwd": times[f"{name}/fwd"],
            "fwdbwd": times[f"{name}/fwdbwd"],
            "saved": saved_bytes(lambda fn=fn: fn(mu, logvar)),
        }
    rows["floor"] = {"fwd": times["floor"], "fwdbwd": times["floor"], "saved": 0}
    return rows


def print_table(label: str, rows: dict[str, dict[str, float]]) -> None:
    f = rows["fused"]
    print(f"\n{label}")
    print(f"{'impl':9s} {'fwd ms':>9s} {'fwd+bwd ms':>11s} {'fwd x':>7s} {'fwd+bwd x':>10s} {'saved MiB':>10s}")
    for name, r in rows.items():
        saved = "-" if name == "floor" else f"{r['saved'] / 2**20:.1f}"
        print(
            f"{name:9s} {r['fwd']:9.2f} {r['fwdbwd']:11.2f} {r['fwd'] / f['fwd']:7.2f} "
            f"{r['fwdbwd'] / f['fwdbwd']:10.2f} {saved:>10s}"
        )
    print(f"fused fwd+bwd / floor = {f['fwdbwd'] / rows['floor']['fwd']:.2f}")


def check_goals(results: dict[tuple[str, int], dict[str, dict[str, float]]], with_compile: bool) -> bool:
    ok = True

    def goal(text: str, passed: bool) -> None:
        nonlocal ok
        ok &= passed
        print(f"[{'PASS' if passed else 'FAIL'}] {text}")

    print("\nGoals (issue 4)")
    fp32_1 = results[("fp32", 1)]
    eager_x = fp32_1["eager"]["fwdbwd"] / fp32_1["fused"]["fwdbwd"]
    goal(f"fp32 1 thread: fused fwd+bwd {eager_x:.2f}x faster than eager (>= 3)", eager_x >= 3)
    if with_compile:
        best_compile = min(fp32_1["compile"]["fwdbwd"], fp32_1["compile-r"]["fwdbwd"])
        compile_x = best_compile / fp32_1["fused"]["fwdbwd"]
        goal(f"fp32 1 thread: fused fwd+bwd {compile_x:.2f}x faster than the best torch.compile (> 1)", compile_x > 1)
    for (dtype, threads), rows in results.items():
        floor_x = rows["fused"]["fwdbwd"] / rows["floor"]["fwd"]
        goal(f"{dtype} {threads} thread(s): fused fwd+bwd {floor_x:.2f}x the floor (<= 2)", floor_x <= 2)
        saved_x = rows["fused"]["saved"] / rows["eager"]["saved"]
        goal(f"{dtype} {threads} thread(s): fused saves {saved_x:.2f} of eager's bytes (<= 0.5)", saved_x <= 0.5)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="256,16,32,32", help="latent shape B,C,H,W (default 2^22 elements)")
    parser.add_argument("--dtypes", default="fp32,bf16", help="comma list of fp32, bf16")
    parser.add_argument("--repeats", type=int, default=10, help="timed rounds per case (best is reported)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile (saves its compile time)")
    args = parser.parse_args()
    shape = tuple(int(s) for s in args.shape.split(","))
    all_threads = torch.get_num_threads()
    print(f"backend: {backend()}  shape: {shape}  threads: 1 and {all_threads}  torch {torch.__version__}")
    results = {}
    for dtype_name in args.dtypes.split(","):
        for threads in sorted({1, all_threads}):
            rows = run_config(shape, DTYPES[dtype_name], threads, args.repeats, not args.no_compile)
            results[(dtype_name, threads)] = rows
            print_table(f"{dtype_name}, {threads} thread(s)", rows)
    return 0 if check_goals(results, not args.no_compile) else 1


if __name__ == "__main__":
    raise SystemExit(main())
