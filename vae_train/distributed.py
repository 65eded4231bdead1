"""Where this process sits in the job, the one process-group start, and every collective we use.

Launchers (``torchrun``, ``accelerate launch``, ``deepspeed``, ``srun`` with one task
per GPU, plain ``python``) only decide *how many* processes run and describe each
one in the environment; :func:`detect_launch_env` reads that description into a
:class:`LaunchEnv` (a half-set environment is an error, not a hang), and
:func:`init_process_group` starts ``torch.distributed`` from it -- for training
(:mod:`vae_train.engine`, before DeepSpeed wraps the group) and for the
distributed ``vae-train eval`` alike.

The collectives below are all no-ops in a single process (no group, or a group
of one), so callers never branch on the world size. They move JSON, not pickle,
between ranks: a peer's bytes are never unpickled. Every rank must make the
same calls in the same order, as with any collective.
"""

from __future__ import annotations

import json
import os
import re
import socket
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any, Sequence

from vae_train.errors import VaeTrainError

if TYPE_CHECKING:
    import torch

LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class LaunchError(VaeTrainError):
    """The launcher's environment cannot describe a working job (raised before any rank waits for a peer)."""


# --------------------------------------------------------------------------- launcher


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as the launcher described it."""

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    master_addr: str
    master_port: int
    launcher: str  # accelerate | deepspeed | torchrun | slurm | env | python

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_ports(count: int) -> list[int]:
    """``count`` distinct TCP ports on 127.0.0.1 that were free a moment ago.

    The sockets are held open together until all are bound, so the ports differ
    (a server that needs several ports, or a one-machine rendezvous).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            socks.append(sock)
            sock.bind(("127.0.0.1", 0))
        return [int(sock.getsockname()[1]) for sock in socks]
    finally:
        for sock in socks:
            sock.close()


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago (for a one-machine rendezvous)."""
    return free_ports(1)[0]


def _int_env(environ: dict[str, str], name: str) -> int:
    raw = environ[name]
    try:
        return int(raw)
    except ValueError:
        raise LaunchError(f"environment variable {name}={raw!r} is not an integer; fix or unset it") from None


def first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM node list such as ``gpu[01-04,07],cpu1`` (no ``scontrol`` needed)."""
    match = re.match(r"([^,\[]+)(?:\[([^\]]+)\])?", nodelist.strip())
    if match is None:
        raise LaunchError(f"cannot read the SLURM node list {nodelist!r}; export MASTER_ADDR")
    prefix, ranges = match.group(1), match.group(2)
    return prefix + ranges.split(",")[0].split("-")[0] if ranges else prefix


def detect_launch_env(environ: dict[str, str] | None = None) -> LaunchEnv:
    """Read the launcher's environment; a half-set one is an error, not a hang.

    torchrun, ``accelerate launch`` and ``deepspeed`` all export ``RANK``,
    ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. ``srun``
    with one task per GPU exports only ``SLURM_*`` (mapped here). Nothing set
    means one process on its own.
    """
    environ = dict(os.environ if environ is None else environ)
    present = [name for name in LAUNCH_VARS if name in environ]
    if present:
        missing = [name for name in ("RANK", "WORLD_SIZE") if name not in environ]
        if missing:
            raise LaunchError(
                f"the launcher environment is half set: {', '.join(present)} present but "
                f"{', '.join(missing)} missing. Start the job with torchrun / accelerate launch / "
                "deepspeed (which set all of them), or unset RANK/WORLD_SIZE/LOCAL_RANK to run one process"
            )
        rank, world = _int_env(environ, "RANK"), _int_env(environ, "WORLD_SIZE")
        if world < 1 or not 0 <= rank < world:
            raise LaunchError(f"RANK={rank} is not inside WORLD_SIZE={world}; check the launcher's environment")
        if world > 1:
            missing = [name for name in ("MASTER_ADDR", "MASTER_PORT") if name not in environ]
            if missing:
                raise LaunchError(
                    f"WORLD_SIZE={world} but {', '.join(missing)} is not set, so the ranks cannot find "
                    "each other; use a launcher (torchrun, accelerate launch) or export both"
                )
            if environ["MASTER_PORT"].strip() == "0":
                raise LaunchError(
                    "MASTER_PORT=0: the ranks cannot meet on port 0 (torchrun --master_port 0 passes it through "
                    "unchanged); use `torchrun --standalone` on one machine or give a real port"
                )
        local_rank = _int_env(environ, "LOCAL_RANK") if "LOCAL_RANK" in environ else rank
        local_world = _int_env(environ, "LOCAL_WORLD_SIZE") if "LOCAL_WORLD_SIZE" in environ else world
        if environ.get("ACCELERATE_USE_DEEPSPEED") or environ.get("ACCELERATE_MIXED_PRECISION"):
            launcher = "accelerate"
        elif "TORCHELASTIC_RUN_ID" in environ:
            launcher = "torchrun"
        elif "CROSS_RANK" in environ or "DS_ACCELERATOR_LAUNCH" in environ or "PDSH_RCMD_TYPE" in environ:
            launcher = "deepspeed"
        else:
            launcher = "env"
        return LaunchEnv(
            rank=rank,
            world_size=world,
            local_rank=local_rank,
            local_world_size=local_world,
            master_addr=environ.get("MASTER_ADDR", "127.0.0.1"),
            master_port=_int_env(environ, "MASTER_PORT") if "MASTER_PORT" in environ else free_port(),
            launcher=launcher,
        )
    if "SLURM_STEP_NUM_TASKS" in environ and int(environ.get("SLURM_STEP_NUM_TASKS", "1")) > 1:
        # srun started one task per GPU: the SLURM step is the launcher.
        world = _int_env(environ, "SLURM_STEP_NUM_TASKS")
        nodelist = environ.get("SLURM_STEP_NODELIST") or environ.get("SLURM_JOB_NODELIST", "127.0.0.1")
        job_id = int(environ.get("SLURM_JOB_ID", "0") or 0)
        tasks_per_node = environ.get("SLURM_STEP_TASKS_PER_NODE", str(world)).split("(")[0].split(",")[0]
        return LaunchEnv(
            rank=_int_env(environ, "SLURM_PROCID"),
            world_size=world,
            local_rank=_int_env(environ, "SLURM_LOCALID"),
            local_world_size=int(tasks_per_node) if tasks_per_node.isdigit() else 1,
            master_addr=first_slurm_host(nodelist),
            master_port=int(environ.get("MASTER_PORT", 20000 + job_id % 20000)),
            launcher="slurm",
        )
    return LaunchEnv(0, 1, 0, 1, "127.0.0.1", free_port(), "python")


# ---------------------------------------------------------------------- process group


def init_process_group(env: LaunchEnv, backend: str, device: torch.device, timeout_s: int) -> bool:
    """Start ``torch.distributed`` for ``env`` (also for one process: DeepSpeed needs a group).

    Idempotent: returns False when a group is already up, True when this call
    started it (the caller that started it may destroy it). The standard
    variables are exported first, so DeepSpeed and any library reading
    ``RANK``/``MASTER_ADDR`` see the same job as we do (srun sets only
    ``SLURM_*``). On CUDA the group is bound to this rank's device, as DeepSpeed's
    own start does.
    """
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    os.environ.update(
        RANK=str(env.rank),
        WORLD_SIZE=str(env.world_size),
        LOCAL_RANK=str(env.local_rank),
        MASTER_ADDR=env.master_addr,
        MASTER_PORT=str(env.master_port),
    )
    kwargs: dict[str, Any] = {}
    if device.type == "cuda":
        torch.cuda.set_device(device)
        if env.world_size > 1:
            kwargs["device_id"] = device
    dist.init_process_group(backend, rank=env.rank, world_size=env.world_size,
                            timeout=timedelta(seconds=timeout_s), **kwargs)
    return True


# ------------------------------------------------------------------------ collectives


def peer_group() -> Any:
    """``torch.distributed`` when a group of more than one rank is up, else None (nothing to exchange)."""
    import torch.distributed as dist

    return dist if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1 else None


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    dist = peer_group()
    return dist.get_rank() if dist is not None else 0


def world_size() -> int:
    """The number of ranks (1 without a process group)."""
    dist = peer_group()
    return dist.get_world_size() if dist is not None else 1


def comm_device() -> torch.device:
    """Where collective tensors must live: this rank's GPU under NCCL, else the CPU."""
    import torch

    dist = peer_group()
    if dist is not None and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def barrier() -> None:
    dist = peer_group()
    if dist is not None:
        dist.barrier()


def all_gather_json(obj: Any) -> list[Any]:
    """Every rank's JSON-serialisable ``obj``, in rank order (JSON on the wire, not pickle)."""
    import torch

    dist = peer_group()
    if dist is None:
        return [obj]
    device = comm_device()
    payload = torch.tensor(list(json.dumps(obj).encode()), dtype=torch.uint8, device=device)
    size = torch.tensor([payload.numel()], dtype=torch.long, device=device)
    sizes = [torch.zeros_like(size) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, size)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8, device=device)
    padded[: payload.numel()] = payload
    chunks = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(chunks, padded)
    return [json.loads(bytes(c[: int(s.item())].cpu().tolist()).decode()) for c, s in zip(chunks, sizes)]


def broadcast_json(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    return all_gather_json(obj if rank() == src else None)[src] if peer_group() else obj


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (one tiny all-reduce)."""
    return any_ranks((flag,))[0]


def any_ranks(flags: Sequence[bool]) -> tuple[bool, ...]:
    """For each flag, whether it is true on at least one rank: one all-reduce for all of them (none
    for an empty sequence; the flags themselves without a process group)."""
    import torch

    dist = peer_group()
    if dist is None or not flags:
        return tuple(bool(flag) for flag in flags)
    values = torch.tensor([1 if flag else 0 for flag in flags], dtype=torch.int32, device=comm_device())
    dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return tuple(bool(v) for v in values.tolist())


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """The sum over ranks of a float64 tensor, on the CPU (one all-reduce; the input itself without a group)."""
    dist = peer_group()
    if dist is None:
        return values
    reduced = values.to(comm_device(), copy=True)
    dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
    return reduced.cpu()
