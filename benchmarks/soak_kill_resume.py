"""Soak: a real 2-rank run SIGKILLed at random moments, each time resumed from S3 on a "new machine".

Run::

    OMP_NUM_THREADS=1 python benchmarks/soak_kill_resume.py [--kills 20] [--steps 300] [--every 3] [--json OUT]

What it does: starts a SeaweedFS S3 server on 127.0.0.1 (the test fixture's
server class), writes real Fashion-MNIST shards, and trains ``configs/tiny.yaml``
with ``torchrun --nproc_per_node 2 train.py`` (ZeRO-2, fp32, the fused op
required, a checkpoint every ``--every`` steps to S3). Once uninterrupted (the
reference); then in segments: each segment starts in an empty run dir with
``resume=auto`` (so everything comes from S3), and after a random delay once it
trains, the whole job (launcher and ranks) is SIGKILLed -- a lost machine. The
delays spread the kills over the run, so they land during steps, local saves and
background uploads alike (each kill's moment is classified afterwards from what
it left behind: a local checkpoint without manifest = mid-save; remote files of
an uncommitted checkpoint = mid-upload; else mid-step). After the last kill the
run completes.

What it checks, per resume and overall:

* corrupt resumes: a segment that failed to resume or to train (any exit we did
  not cause, a refused checkpoint, a traceback) -- must be 0;
* lost committed steps: the newest checkpoint committed to S3 before a segment
  started, minus the step it resumed at -- must be 0;
* every step trained exactly once: the steps each segment contributes to the
  final model (from its resume step to the next segment's) are read from its
  ``metrics.jsonl``; every step 1..N must appear exactly once with a loss
  bitwise equal to the reference's at that step, and the final weights must be
  bitwise the reference's.

Exit status 0 only if all checks pass. ``--json`` writes the numbers for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.fixtures.s3 import S3Server  # noqa: E402
from tests.launching import clean_env, kill_group, kill_matching, start, torchrun  # noqa: E402

RESUMED = re.compile(r"resumed from \S+ at step (\d+)")
FRESH = "no committed checkpoint found; starting fresh"
START_TIMEOUT_S = 300


@dataclass
class Segment:
    """One launch: where it had to resume, where it did, and how it ended."""

    index: int
    expected_resume: int  # newest checkpoint committed to S3 before it started
    resumed_at: int | None = None
    killed_after_s: float | None = None
    moment: str = ""  # mid-step / mid-save / mid-upload (killed segments)
    last_logged_step: int = 0
    returncode: int | None = None
    problem: str = ""
    losses: dict[int, float] = field(default_factory=dict)


def _overrides(args: argparse.Namespace, shards: Path, run_dir: Path, remote: str) -> list[str]:
    return ["--config", "configs/tiny.yaml", f"data.train={shards}", f"data.val={shards}", f"run_dir={run_dir}",
            "distributed.precision=fp32", f"distributed.zero_stage={args.zero_stage}", f"train.max_steps={args.steps}",
            f"checkpoint.every_steps={args.every}", "checkpoint.keep_last=3", "logging.image_every=0",
            "logging.histogram_every=0", "resume=auto", f"checkpoint.remote={remote}"]


def _launch(args: argparse.Namespace, shards: Path, run_dir: Path, remote: str,
            env: dict[str, str]) -> subprocess.Popen:
    run_dir.mkdir(parents=True)
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")  # a file, not a pipe: a killed job cannot block it
    proc = start(torchrun("train.py", *_overrides(args, shards, run_dir, remote)),
                 env=clean_env(VAE_TRAIN_REQUIRE_FUSED="1", **env), stdout=log)
    log.close()
    return proc


def _train_rows(run_dir: Path) -> dict[int, float]:
    rows: dict[int, float] = {}
    path = run_dir / "metrics.jsonl"
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut by SIGKILL
                continue
            if row.get("split") == "train":
                rows[int(row["step"])] = row["loss"]
    return rows


def _remote_steps(client, bucket: str) -> tuple[set[int], set[int]]:
    """(steps with any object, steps committed) under the run's prefix."""
    seen, committed = set(), set()
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix="run/"):
        for obj in page.get("Contents", []):
            match = re.match(r"run/step-(\d+)/(.+)$", obj["Key"])
            if match:
                seen.add(int(match.group(1)))
                if match.group(2) == "manifest.json":
                    committed.add(int(match.group(1)))
    return seen, committed


def _moment(run_dir: Path, client, bucket: str) -> str:
    """What a SIGKILL interrupted, judged from what it left behind.

    mid-save: a local checkpoint directory without its manifest; mid-upload: remote
    files of a checkpoint newer than the newest remote commit, or a local commit
    newer than it (its upload was queued or running); else mid-step.
    """
    local = [p for p in (run_dir / "checkpoints").glob("step-*") if p.is_dir()]
    if any(not (p / "manifest.json").exists() for p in local):
        return "mid-save"
    seen, committed = _remote_steps(client, bucket)
    newest = max(committed, default=-1)
    local_committed = [int(p.name[5:]) for p in local if (p / "manifest.json").exists()]
    if any(step > newest for step in seen) or any(step > newest for step in local_committed):
        return "mid-upload"
    return "mid-step"


def _kill_job(proc: subprocess.Popen, run_dir: Path) -> None:
    """SIGKILL the launcher and every rank at once (ranks run in their own sessions: match the run dir)."""
    kill_matching(f"run_dir={run_dir}")
    kill_group(proc)
    proc.wait()


def _weights(checkpoint_dir: Path):
    from vae_train.export import consolidated_state_dict

    state, _ = consolidated_state_dict(checkpoint_dir)
    return state


def _prepare_shards(out: Path) -> None:
    cmd = [sys.executable, "-m", "vae_train", "prepare", "fashion-mnist", "--out", str(out), "--limit", "3000",
           "--samples-per-shard", "500", "--workers", "1", "--no-progress"]
    subprocess.run(cmd, check=True, cwd=REPO, env=clean_env(), capture_output=True)


def soak(args: argparse.Namespace, work: Path) -> dict:
    import torch

    rng = random.Random(args.seed)
    server = S3Server(work / "s3")
    server.start()
    try:
        bucket = server.new_bucket()
        client = server.client()
        env = server.env()
        shards = args.shards
        if shards is None:
            shards = work / "shards"
            _prepare_shards(shards)

        # The reference: uninterrupted, local checkpoints only.
        ref_dir = work / "reference"
        began = time.monotonic()
        proc = _launch(args, shards, ref_dir, "", {})
        if proc.wait(timeout=START_TIMEOUT_S + args.steps * 5) != 0:
            raise SystemExit(f"reference run failed: see {ref_dir}.log")
        reference = _train_rows(ref_dir)
        ref_weights = _weights(ref_dir / "checkpoints" / f"step-{args.steps:08d}")
        reference_s = time.monotonic() - began
        step_s = _step_seconds(ref_dir)

        segments: list[Segment] = []
        kills = 0
        while True:
            _, committed = _remote_steps(client, bucket)
            seg = Segment(len(segments), max(committed, default=0))
            segments.append(seg)
            run_dir = work / f"segment-{seg.index:02d}"
            proc = _launch(args, shards, run_dir, f"s3://{bucket}/run", env)
            training = _wait_first_row(proc, run_dir)
            if training and kills < args.kills:
                remaining = max(args.steps - seg.expected_resume, 1) * step_s
                delay = rng.uniform(0.0, 2.0 * remaining / (args.kills - kills + 1))
                started = time.monotonic()
                while proc.poll() is None and time.monotonic() - started < delay:
                    time.sleep(0.01)
                if proc.poll() is None:
                    _kill_job(proc, run_dir)
                    seg.killed_after_s = round(time.monotonic() - started, 2)
                    seg.moment = _moment(run_dir, client, bucket)
                    kills += 1
            try:
                proc.wait(timeout=START_TIMEOUT_S + args.steps * 5)
            except subprocess.TimeoutExpired:
                seg.problem = "hung"
            _kill_job(proc, run_dir)
            seg.returncode = proc.returncode
            log = (work / f"{run_dir.name}.log").read_text(errors="replace")
            match = RESUMED.search(log)
            seg.resumed_at = int(match.group(1)) if match else (0 if FRESH in log else None)
            seg.losses = _train_rows(run_dir)
            seg.last_logged_step = max(seg.losses, default=seg.resumed_at or 0)
            if seg.killed_after_s is None and seg.returncode != 0 and not seg.problem:
                seg.problem = f"exit {seg.returncode}: " + _tail(log)
            elif seg.resumed_at is None and not seg.problem and seg.losses:
                seg.problem = "no resume line"
            elif seg.resumed_at is not None and seg.resumed_at > seg.expected_resume:
                seg.problem = "resumed past the newest commit seen before it started (was the last job really dead?)"
            elif any(s in log for s in ("refusing", "Traceback", "CheckpointError", "corrupted")):
                seg.problem = "refused/failed: " + _tail(log)
            if seg.returncode == 0 or seg.problem or len(segments) > args.kills * 3 + 5:
                break

        result = _judge(args, segments, reference, ref_weights, work, torch)
        result.update(reference_s=round(reference_s, 1), step_s=round(step_s, 4), kills=kills)
        return result
    finally:
        server.stop()


def _wait_first_row(proc: subprocess.Popen, run_dir: Path) -> bool:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline and proc.poll() is None:
        if (run_dir / "metrics.jsonl").exists() and (run_dir / "metrics.jsonl").stat().st_size > 0:
            return True
        time.sleep(0.02)
    return False


def _step_seconds(run_dir: Path) -> float:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r["images_per_s"] for r in rows if r.get("split") == "train" and r.get("images_per_s")]
    rates.sort()
    return 16.0 / rates[len(rates) // 2]  # global batch 16 (configs/tiny.yaml)


def _tail(log: str) -> str:
    return " | ".join(log.strip().splitlines()[-3:])[-400:]


def _judge(args, segments: list[Segment], reference: dict[int, float], ref_weights, work: Path, torch) -> dict:
    corrupt = sum(1 for s in segments if s.problem)
    lost = sum(max(s.expected_resume - (s.resumed_at or 0), 0) for s in segments if s.resumed_at is not None)
    # Which segment's rows make up the final model: segment i owns (its resume step, the next one's].
    owners: dict[int, list[int]] = {}
    for i, seg in enumerate(segments):
        start_step = seg.resumed_at or 0
        end = segments[i + 1].resumed_at if i + 1 < len(segments) else args.steps
        end = args.steps if end is None else end
        for step in range(start_step + 1, end + 1):
            owners.setdefault(step, []).append(i)
    missing = [s for s in range(1, args.steps + 1) if len(owners.get(s, [])) != 1]
    not_logged = [s for s, o in owners.items() if len(o) == 1 and s not in segments[o[0]].losses]
    different = [s for s, o in owners.items() if len(o) == 1 and s in segments[o[0]].losses
                 and segments[o[0]].losses[s] != reference.get(s)]
    final = segments[-1]
    final_ok = False
    if final.returncode == 0:
        got = _weights(work / f"segment-{final.index:02d}" / "checkpoints" / f"step-{args.steps:08d}")
        final_ok = sorted(got) == sorted(ref_weights) and all(torch.equal(got[k], ref_weights[k]) for k in got)
    return {
        "segments": [{k: v for k, v in asdict(s).items() if k != "losses"} for s in segments],
        "corrupt_resumes": corrupt,
        "lost_committed_steps": lost,
        "steps_not_exactly_once": len(missing),
        "steps_not_logged": len(not_logged),
        "steps_with_different_loss": len(different),
        "final_weights_bitwise_equal": final_ok,
        "completed": final.returncode == 0,
        "moments": {m: sum(1 for s in segments if s.moment == m) for m in ("mid-step", "mid-save", "mid-upload")},
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=3, help="checkpoint.every_steps")
    parser.add_argument("--zero-stage", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the kill delays")
    parser.add_argument("--workdir", type=Path, default=None, help="kept after the run (default: a temp dir)")
    parser.add_argument("--shards", type=Path, default=None,
                        help="train on these shards (e.g. the test session's) instead of preparing 3,000 images here")
    parser.add_argument("--json", type=Path, default=None, help="write the result here")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    work = args.workdir or Path(tempfile.mkdtemp(prefix="soak-"))
    work.mkdir(parents=True, exist_ok=True)
    began = time.monotonic()
    result = soak(args, work)
    result["wall_s"] = round(time.monotonic() - began, 1)

    print(f"\nsoak: {args.kills} kills requested, {result['kills']} made; {args.steps} steps, checkpoint every "
          f"{args.every}, 2 ranks ZeRO-{args.zero_stage}, real S3; reference run {result['reference_s']}s, "
          f"{result['step_s'] * 1000:.0f} ms/step; total {result['wall_s']}s\n")
    print(f"{'seg':>3} {'resume: want':>12} {'got':>5} {'killed after':>12} {'moment':>10} {'last step':>9}  problem")
    for s in result["segments"]:
        killed = f"{s['killed_after_s']:.2f}s" if s["killed_after_s"] is not None else "completed"
        print(f"{s['index']:>3} {s['expected_resume']:>12} {str(s['resumed_at']):>5} {killed:>12} {s['moment'] or '-':>10} "
              f"{s['last_logged_step']:>9}  {s['problem']}")
    print()
    for key in ("corrupt_resumes", "lost_committed_steps", "steps_not_exactly_once", "steps_not_logged",
                "steps_with_different_loss", "final_weights_bitwise_equal", "completed", "moments"):
        print(f"{key:30s} {result[key]}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    good = (result["corrupt_resumes"] == 0 and result["lost_committed_steps"] == 0
            and result["steps_not_exactly_once"] == 0 and result["steps_not_logged"] == 0
            and result["steps_with_different_loss"] == 0 and result["final_weights_bitwise_equal"])
    return 0 if good else 1


if __name__ == "__main__":
    sys.exit(main())
