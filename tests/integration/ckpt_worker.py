"""A tiny real DeepSpeed training job used by the checkpoint tests (run as a subprocess).

``python -m tests.integration.ckpt_worker SPEC.json`` spawns ``spec["world"]`` ranks (gloo,
CPU), each training a tiny :class:`~vae_train.model.ConvVAE` under
``deepspeed.initialize`` with a torch.optim AdamW, and drives
:class:`~vae_train.checkpoint.CheckpointManager` exactly like a training loop:
resolve -> load -> steps with ``maybe_save`` -> final save -> wait for uploads.

The batch of (step, rank) is a pure function of the seed, so the "data stream"
state is just the next step; the forward pass draws its noise from the global
torch RNG, so an exact resume also needs the RNG states restored.

Fault injection lives here (test code), never in the library: ``kill_in_save``
SIGKILLs the job after DeepSpeed wrote its files but before the manifest;
``kill_after_save`` SIGKILLs right after a committed (and, with a remote,
uploaded) save; ``kill_mid_upload`` SIGKILLs after the first uploaded file of a
step; ``outage`` pauses at a step so the test can stop and restart the S3 server.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.launching import REPO, clean_env, finish, free_port, start

MODEL = {"image_size": 8, "in_channels": 1, "base_channels": 8, "channel_mult": [1, 2], "latent_channels": 2,
         "norm_groups": 4, "reparam": "reference"}
MICRO_BATCH = 4


class _NextStep:
    """The job's "data stream": its state is the next step (the batch is a function of it)."""

    def __init__(self) -> None:
        self.next_step = 0

    def state_dict(self) -> dict[str, int]:
        return {"next_step": self.next_step}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.next_step = state["next_step"]


def _batch(seed: int, step: int, rank: int):
    import torch

    g = torch.Generator().manual_seed(seed * 1_000_003 + step * 101 + rank)
    return (torch.rand(MICRO_BATCH, 1, 8, 8, generator=g) > 0.5).float()


def _full_state(engine) -> dict[str, Any]:
    """Full fp32 weights and Adam moments, gathered over ranks (collective: all ranks call)."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out = {}
    for name, p in engine.module.named_parameters():
        full = safe_get_full_fp32_param(p)  # None without ZeRO: the parameter itself is full
        out[f"w/{name}"] = (p if full is None else full).detach().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            state = safe_get_full_optimizer_state(p, key)
            if state is not None:
                out[f"{key}/{name}"] = state.detach().clone()
    return out


def _worker(rank: int, world: int, port: int, spec: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1")
    import logging

    import deepspeed
    import torch
    from safetensors.torch import save_file

    from vae_train import checkpoint as ck
    from vae_train.config import config_from_dict
    from vae_train.model import ConvVAE, vae_loss

    logging.basicConfig(level=logging.INFO, format=f"[rank{rank}] %(levelname)s %(name)s: %(message)s")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    deepspeed.init_distributed(dist_backend="gloo", verbose=False)

    cfg = config_from_dict({
        "run_dir": spec["run_dir"], "seed": spec.get("seed", 0), "resume": spec.get("resume", "auto"),
        "model": {**MODEL, **spec.get("model", {})},
        "checkpoint": {"every_steps": spec.get("every", 2), "keep_last": spec.get("keep_last", 2),
                       "keep_every": spec.get("keep_every", 0), "remote": spec.get("remote", ""),
                       "max_pending_uploads": spec.get("max_pending", 2), "upload_deadline_s": 120},
        "distributed": {"zero_stage": spec.get("zero", 2)},
    })
    out_dir = Path(spec["out"])
    manager = ck.CheckpointManager(cfg, rank=rank, world_size=world, local_rank=rank)
    path = manager.resolve_resume()
    data = _NextStep()

    torch.manual_seed(cfg.seed)
    model = ConvVAE(cfg.model.model_copy(update={"reparam": "reference"}))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ds_cfg = {"train_batch_size": MICRO_BATCH * world, "train_micro_batch_size_per_gpu": MICRO_BATCH,
              "zero_optimization": {"stage": cfg.distributed.zero_stage}, "steps_per_print": 10**9,
              "gradient_clipping": 1.0}
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_cfg)
    manager.register("model", ck.DeepSpeedState(engine))
    manager.register("data", data, resize=ck.Resize.RESTART)

    step = 0
    resumed = None
    if path:
        resumed = manager.load(path)
        step = resumed.step
        if not resumed.elastic:
            assert data.state_dict() == {"next_step": step}, data.state_dict()
    if spec.get("dump_after_load"):
        state = _full_state(engine)
        if rank == 0:
            save_file(state, str(out_dir / "after_load.safetensors"))

    _install_faults(ck, manager, spec, rank)
    trained_during_outage = 0
    while step < spec["steps"]:
        x = _batch(cfg.seed, step, rank)
        loss = vae_loss(engine(x), beta=1.0, free_bits=0.0).loss
        engine.backward(loss)
        engine.step()
        step += 1
        if spec.get("dump_at") == step:
            state = _full_state(engine)
            if rank == 0:
                save_file(state, str(out_dir / f"state_{step}.safetensors"))
        outage = spec.get("outage")
        if outage and step == outage["pause_at"] and rank == 0:
            (out_dir / "paused").touch()
            _wait_for(out_dir / "server_down")
        data.next_step = step
        manager.maybe_save(step)
        if outage and step > outage["pause_at"] and not (out_dir / "server_up").exists():
            trained_during_outage += 1
            time.sleep(0.1)
            if rank == 0 and trained_during_outage == outage.get("steps_down", 3):
                (out_dir / "trained_while_down").touch()
        if spec.get("kill_after_save") == step:
            manager.wait_for_uploads(60)
            torch.distributed.barrier()
            os.killpg(os.getpgid(0), signal.SIGKILL)
        if outage and rank == 0 and step == spec["steps"] - 1:
            _wait_for(out_dir / "server_up")
    manager.save(step, final=True)
    uploads_done = manager.wait_for_uploads(120)
    torch.distributed.barrier()
    weights = {k: v.detach().clone() for k, v in engine.module.state_dict().items()}
    full = _full_state(engine)
    if rank == 0:
        save_file(weights, str(out_dir / "final_weights.safetensors"))
        save_file(full, str(out_dir / "final_full.safetensors"))
        (out_dir / "result.json").write_text(json.dumps({
            "step": step, "resumed_from": resumed.step if resumed else None,
            "elastic": resumed.elastic if resumed else None, "resume_path": path,
            "uploads_done": uploads_done,
            "trained_during_outage": trained_during_outage,
        }))
    manager.close()
    torch.distributed.barrier()


def _wait_for(path: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.05)


def _install_faults(ck, manager, spec: dict[str, Any], rank: int) -> None:
    kill_in_save = spec.get("kill_in_save")
    if kill_in_save is not None:
        original_commit = manager._commit_local

        def commit_then_maybe_die(ckpt_dir, manifest):
            if manifest.step == kill_in_save:  # DeepSpeed files are written; the manifest is not
                os.killpg(os.getpgid(0), signal.SIGKILL)
            return original_commit(ckpt_dir, manifest)

        manager._commit_local = commit_then_maybe_die
    kill_mid_upload = spec.get("kill_mid_upload")
    if kill_mid_upload is not None and manager._uploader is not None and rank == 0:
        uploader = manager._uploader
        original_upload = uploader._upload_one

        def upload_then_maybe_die(path, key, entry):
            original_upload(path, key, entry)
            if key.startswith(ck.step_name(kill_mid_upload) + "/"):
                os.killpg(os.getpgid(0), signal.SIGKILL)

        uploader._upload_one = upload_then_maybe_die


def start_job(spec: dict[str, Any], workdir: Path, env: dict[str, str] | None = None) -> subprocess.Popen:
    """Start one job in its own session (so its SIGKILL of its process group spares pytest)."""
    spec_path = workdir / f"spec-{time.monotonic_ns()}.json"
    spec_path.write_text(json.dumps(spec))
    return start([sys.executable, "-m", "tests.integration.ckpt_worker", str(spec_path)], env=clean_env(**(env or {})),
                 cwd=REPO)


def run_job(spec: dict[str, Any], workdir: Path, env: dict[str, str] | None = None,
            timeout_s: float = 240) -> subprocess.CompletedProcess:
    return finish(start_job(spec, workdir, env), timeout_s)


def result(spec: dict[str, Any]) -> dict[str, Any]:
    return json.loads((Path(spec["out"]) / "result.json").read_text())


def main() -> None:
    spec = json.loads(Path(sys.argv[1]).read_text())
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    import torch.multiprocessing as mp

    world = spec["world"]
    mp.spawn(_worker, args=(world, free_port(), spec), nprocs=world, join=True)


if __name__ == "__main__":
    main()
