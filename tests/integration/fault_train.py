"""``train.py`` with faults injected from the test side, chosen by ``$VAE_TEST_FAULTS`` (a JSON object).

Run it exactly like ``train.py``: ``torchrun ... tests/integration/fault_train.py --config ...``.
The library knows nothing of this: every fault wraps a public seam --
``CheckpointManager.register/save/load``, ``DeepSpeedState.save``,
``S3Store.put_file`` and the trainer's ``train_step`` -- and then the real
``train.py`` runs. Keys (all optional; ``out`` is required by the ones that write files):

``out``            directory for marker files and state dumps
``kill_in_save``   N: after DeepSpeed wrote checkpoint N's files on every rank, before any
                   manifest: SIGKILL the launcher, then the rank itself
``kill_mid_upload`` N: after rank 0 uploaded its first file of checkpoint N: SIGKILL the launcher
                   and rank 0 (rank 1, orphaned, stops on its own or is reaped by the test)
``hold_upload``    {"rank": R, "step": N, "fail": K}: rank R's uploads of checkpoint N wait until
                   ``out/upload_release`` exists (``out/upload_held`` marks the wait), then its next
                   K uploads raise (the library's retry must carry them)
``dump_at_save``   [N, ...]: when checkpoint N is saved, first dump the whole training state to
                   ``out/saved-N.safetensors`` (see :func:`full_state` and :func:`_dump`: every
                   DeepSpeed part, e.g. the discriminator, and the EMA)
``dump_after_load`` true: right after a resume's load, dump to ``out/loaded.safetensors`` and exit 0;
                   ``"continue"``: dump, then train on as usual
``pauses``         [{"step": K, "touch": NAME, "wait": NAME?}, ...]: before optimizer step K
                   (0-based) every rank writes its pid to ``out/NAME.rankR`` and, with ``wait``,
                   blocks until ``out/WAIT`` exists
``nan``            "RANK:STEP": a NaN loss on RANK in step STEP (:mod:`tests.integration.nan_train`)
``disc_nan``       "RANK:STEP": a NaN discriminator loss on RANK in step STEP (through the trainer's
                   ``autoencoder_step`` seam and the objective it is given)
"""

from __future__ import annotations

import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

from vae_train import checkpoint, distributed, storage, trainer  # noqa: E402

FAULTS: dict[str, Any] = json.loads(os.environ.get("VAE_TEST_FAULTS", "{}"))
OUT = Path(FAULTS["out"]) if "out" in FAULTS else None
WAIT_S = 300.0


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _die() -> None:
    """A machine lost without warning: the launcher first (no clean-up of its ranks), then this rank."""
    os.kill(os.getppid(), signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)


def _wait_for(path: Path) -> None:
    deadline = time.monotonic() + WAIT_S
    while not path.exists():
        if time.monotonic() > deadline:
            raise TimeoutError(f"test marker {path} never appeared")
        time.sleep(0.05)


def full_state(engine: Any) -> dict[str, torch.Tensor]:
    """The training state as one rank-independent dict (a collective: every rank calls it).

    ``w/NAME``: the fp32 master weights, whole (gathered over ZeRO partitions);
    ``exp_avg/NAME``, ``exp_avg_sq/NAME``: both Adam moments, whole; ``adam_step``:
    the sorted distinct Adam step counters of every rank's optimizer state.
    """
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    out: dict[str, torch.Tensor] = {}
    for name, param in engine.module.named_parameters():
        full = safe_get_full_fp32_param(param)  # None without ZeRO: the parameter is whole
        out[f"w/{name}"] = (param if full is None else full).detach().float().cpu().clone()
        for key in ("exp_avg", "exp_avg_sq"):
            moment = safe_get_full_optimizer_state(param, key)
            if moment is None:  # no ZeRO: the torch optimizer holds the state by parameter
                moment = _base_optimizer(engine).state.get(param, {}).get(key)
            if moment is not None:
                out[f"{key}/{name}"] = moment.detach().float().cpu().clone()
    steps = sorted({float(s["step"]) for s in _base_optimizer(engine).state.values() if "step" in s})
    everyone = sorted({s for rank_steps in distributed.all_gather_json(steps) for s in rank_steps})
    out["adam_step"] = torch.tensor(everyone, dtype=torch.float64)
    return out


def _base_optimizer(engine: Any) -> torch.optim.Optimizer:
    optimizer = engine.optimizer
    while not isinstance(optimizer, torch.optim.Optimizer) and hasattr(optimizer, "optimizer"):
        optimizer = optimizer.optimizer
    return optimizer


def _dump(engines: dict[str, Any], states: dict[str, Any], name: str) -> None:
    """``full_state`` of the model engine; other engines' under ``NAME:``; the EMA's tensors as ``ema/...``
    (rank 0's: whole weights, replicated, under ZeRO 0-2)."""
    from safetensors.torch import save_file

    state = full_state(engines["model"])
    for part, engine in engines.items():
        if part != "model":
            state.update({f"{part}:{k}": v for k, v in full_state(engine).items()})
    if "ema" in states:
        state.update({f"ema/{k}": v.clone() for k, v in states["ema"].state_dict()["tensors"].items()})
    if _rank() == 0:
        assert OUT is not None
        tmp = OUT / f".{name}.tmp"
        save_file(state, str(tmp))
        os.replace(tmp, OUT / name)
    distributed.barrier()


def _install() -> None:
    engines: dict[str, Any] = {}
    states: dict[str, Any] = {}
    manager_cls = checkpoint.CheckpointManager

    real_register = manager_cls.register

    def register(self: Any, name: str, part: Any, **kwargs: Any) -> None:
        if isinstance(part, checkpoint.DeepSpeedState):
            engines[name] = part.engine
        else:
            states[name] = part
        real_register(self, name, part, **kwargs)

    manager_cls.register = register

    dump_at = set(FAULTS.get("dump_at_save", []))
    if dump_at:
        real_save = manager_cls.save

        def save(self: Any, step: int, **kwargs: Any) -> Any:
            if step in dump_at:
                dump_at.discard(step)
                _dump(engines, states, f"saved-{step}.safetensors")
            return real_save(self, step, **kwargs)

        manager_cls.save = save

    if FAULTS.get("dump_after_load"):
        real_load = manager_cls.load

        def load(self: Any, path: Any) -> Any:
            resumed = real_load(self, path)
            _dump(engines, states, "loaded.safetensors")
            if _rank() == 0:
                print(f"fault_train: loaded step {resumed.step} elastic={resumed.elastic}; state dumped", flush=True)
            if FAULTS["dump_after_load"] != "continue":
                raise SystemExit(0)
            return resumed

        manager_cls.load = load

    if "kill_in_save" in FAULTS:
        victim = checkpoint.step_name(int(FAULTS["kill_in_save"]))
        real_ds_save = checkpoint.DeepSpeedState.save

        def ds_save(self: Any, path: Any, *args: Any, **kwargs: Any) -> Any:
            result = real_ds_save(self, path, *args, **kwargs)
            if victim in Path(path).parts:
                distributed.barrier()  # every rank's DeepSpeed files are on disk; no manifest yet
                _die()
            return result

        checkpoint.DeepSpeedState.save = ds_save

    real_put_file = storage.S3Store.put_file
    if "kill_mid_upload" in FAULTS and _rank() == 0:
        prefix = checkpoint.step_name(int(FAULTS["kill_mid_upload"])) + "/"

        def put_then_die(self: Any, path: Any, key: str, *args: Any, **kwargs: Any) -> None:
            real_put_file(self, path, key, *args, **kwargs)
            if key.startswith(prefix):
                _die()

        storage.S3Store.put_file = put_then_die

    hold = FAULTS.get("hold_upload")
    if hold and _rank() == int(hold["rank"]):
        assert OUT is not None
        prefix = checkpoint.step_name(int(hold["step"])) + "/"
        failures = {"left": int(hold.get("fail", 0))}

        def held_put(self: Any, path: Any, key: str, *args: Any, **kwargs: Any) -> None:
            if key.startswith(prefix):
                (OUT / "upload_held").touch()
                _wait_for(OUT / "upload_release")
                if failures["left"] > 0:
                    failures["left"] -= 1
                    raise OSError(f"injected upload failure of {key}")
            real_put_file(self, path, key, *args, **kwargs)

        storage.S3Store.put_file = held_put

    pauses = {int(p["step"]): p for p in FAULTS.get("pauses", [])}
    if pauses:
        real_train_step = trainer.train_step

        def train_step(engine: Any, batches: Any, step: int, loss_fn: Any, **kwargs: Any) -> Any:
            pause = pauses.pop(step, None)
            if pause is not None:
                assert OUT is not None
                marker = OUT / f"{pause['touch']}.rank{_rank()}"
                tmp = OUT / f".{marker.name}.tmp"
                tmp.write_text(str(os.getpid()))
                os.replace(tmp, marker)
                if pause.get("wait"):
                    _wait_for(OUT / pause["wait"])
            return real_train_step(engine, batches, step, loss_fn, **kwargs)

        trainer.train_step = train_step

    if "nan" in FAULTS:
        from tests.integration.nan_train import _parse, inject_nan

        inject_nan(*_parse(FAULTS["nan"]))

    if "disc_nan" in FAULTS:
        from tests.integration.nan_train import _parse

        nan_rank, nan_step = _parse(FAULTS["disc_nan"])
        real_autoencoder_step = trainer.autoencoder_step

        def autoencoder_step(engine: Any, disc: Any, objective: Any, *args: Any, **kwargs: Any) -> Any:
            step = args[2]
            if (engine.env.rank, step) != (nan_rank, nan_step):
                return real_autoencoder_step(engine, disc, objective, *args, **kwargs)
            clean = objective.discriminator_terms

            def poisoned(*a: Any, **k: Any) -> Any:
                d_loss, real, fake = clean(*a, **k)
                return d_loss * float("nan"), real, fake

            objective.discriminator_terms = poisoned
            try:
                return real_autoencoder_step(engine, disc, objective, *args, **kwargs)
            finally:
                del objective.discriminator_terms

        trainer.autoencoder_step = autoencoder_step


if __name__ == "__main__":
    _install()
    os.chdir(REPO)
    runpy.run_path("train.py", run_name="__main__")
