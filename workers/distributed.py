"""One training job on several devices: transformers' Trainer under torchrun (DDP), the engine otherwise unchanged.

torchrun (`python -m torch.distributed.run`) starts one process per device; each runs `run_training` as one device
would, and the Trainer (through accelerate) finds the ranks in the environment, wraps the model in
DistributedDataParallel (NCCL on GPUs, gloo on CPUs), gives each rank its share of every global batch and averages
the gradients. What a one-device run does once still happens once:

- rank 0 publishes the events (metrics.jsonl, the run's stream) and writes config.json, the checkpoints and the
  result; another rank writes its events to `rank-N.jsonl` only, read for its last word when the job dies;
- cancelling: rank 0 reads the flag and broadcasts what it decided after every step, so every rank stops at the
  same step (a rank that stopped alone would leave the others waiting in their next all-reduce);
- resuming: every rank loads the same checkpoint (adapter, optimizer, scheduler, RNG, data position).

A job ends as the worker sees it: torchrun exits 0 when every rank did, else 1 once it has stopped the rest. The run's
status is what rank 0 recorded in result.json; a job that ended without one fails the run with the failing rank's
own message, or with how the job ended. The worker starts torchrun in a session of its own with a
parent-death signal, and every rank arms one too, so a worker killed takes the whole job with it: worker → torchrun
(SIGTERM when the worker dies) → ranks (SIGTERM when torchrun dies).

Several hosts: torchrun's rendezvous settings (README, "several devices"), with `mora-studio train` as the rank.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from workers.events import read_events
from workers.settings import distributed_rank

RANK_EVENTS = "rank-{rank}.jsonl"
RESULT = "result.json"


def rank_and_world() -> tuple[int, int]:
    """(this process's rank, the job's number of processes); (0, 1) outside torchrun."""
    return distributed_rank()


def is_main_process() -> bool:
    return distributed_rank()[0] == 0


def rank0_decides(decide: Callable[[], bool]) -> bool:
    """`decide()` on rank 0, and the same answer on every rank (one broadcast of one number); alone, just `decide()`.
    Every rank must call this at the same point, as at every collective."""
    import torch
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decide()
    on_gpu = dist.get_backend() == "nccl"
    device = torch.device("cuda", torch.cuda.current_device()) if on_gpu else torch.device("cpu")
    flag = torch.tensor([int(decide()) if dist.get_rank() == 0 else 0], device=device)
    dist.broadcast(flag, src=0)
    return bool(flag.item())


def launch_command(devices: int, entry: Sequence[str]) -> list[str]:
    """torchrun on this host, `devices` processes, each running `python -m <entry...>`; --standalone picks a free
    rendezvous port on loopback, so jobs side by side never collide."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={devices}",
            "--max-restarts=0", "-m", *entry]


def start_job(command: list[str], env: Optional[dict[str, str]] = None, log_file: Optional[Path] = None
              ) -> subprocess.Popen:
    """torchrun in a session of its own (a terminal's Ctrl-C reaches only its caller, which decides), with the
    parent-death signal armed. Its output goes to
    `log_file`, or where the caller's goes."""
    from workers.processes import _die_with_parent  # not at import: it brings Celery, which a rank never needs

    log = open(log_file, "ab") if log_file else None
    try:
        return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT if log else None, start_new_session=True,
                                preexec_fn=_die_with_parent)
    finally:
        if log:
            log.close()


def job_processes(root: int) -> list[int]:
    """`root` and every process below it: torchrun and its ranks (which torchrun starts in sessions of their own,
    so the job is a tree, not one process group)."""
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        for task in Path(f"/proc/{pid}/task").glob("*"):
            try:
                todo += [int(child) for child in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    return found


def kill_job(process: subprocess.Popen) -> None:
    """SIGKILL to torchrun and each of its ranks (a rank would die of its parent-death signal anyway)."""
    for pid in reversed(job_processes(process.pid)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def job_rss_bytes(root: int) -> int:
    """Resident memory of the job: torchrun and its ranks together."""
    total = 0
    for pid in job_processes(root):
        try:
            for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1]) * 1024
        except (OSError, ValueError):
            continue
    return total


def wait_for_job(process: subprocess.Popen, memory_limit_bytes: Optional[int] = None,
                 check_every_s: float = 0.2) -> tuple[int, int]:
    """Wait for the job; with a limit, end it when its processes together hold more. Returns (exit code, the bytes
    it held when it was stopped for the limit, else 0). An interrupted wait ends the job too."""
    try:
        while True:
            try:
                return process.wait(check_every_s if memory_limit_bytes else None), 0
            except subprocess.TimeoutExpired:
                held = job_rss_bytes(process.pid)
                if held > memory_limit_bytes:
                    kill_job(process)
                    return process.returncode, held
    finally:
        if process.poll() is None:
            kill_job(process)


def job_outcome(exit_code: int, run_dir: Path, devices: int) -> tuple[Optional[str], str]:
    """(the status rank 0 recorded, "") for a job whose rank 0 ended its run; (None, why) for one that did not."""
    from workers.processes import describe_exit

    result = Path(run_dir) / RESULT
    recorded = None
    try:
        recorded = json.loads(result.read_text(encoding="utf-8"))["status"]
    except (OSError, ValueError, KeyError):
        pass
    if recorded is not None:  # rank 0 got to the end of its run (result.json is removed before each launch)
        return recorded, ""
    for rank in range(devices):
        events = read_events(Path(run_dir) / RANK_EVENTS.format(rank=rank)) if rank else []
        failed = [e for e in events if e.get("kind") == "status" and e.get("status") == "failed"]
        if failed:
            return None, f"rank {rank} of the {devices}-device job failed: {failed[-1].get('message', '')}"
    ended = "was stopped" if exit_code == 0 else describe_exit(exit_code)
    return None, (f"the {devices}-device training job (torchrun) {ended} before rank 0 recorded a result; "
                  f"its log is in {Path(run_dir) / 'launcher.log'}")


def _arm_rank() -> None:
    """A rank dies with torchrun: the parent-death signal, and a check that torchrun did not die before it was set."""
    from workers.processes import _die_with_parent

    parent = os.getppid()
    _die_with_parent()
    if os.getppid() != parent or parent == 1:
        os._exit(70)


def main(argv: Optional[list[str]] = None) -> int:
    """A rank's entry point: `python -m workers.distributed queued|cli ARGS.json` (what `launch_command` runs)."""
    kind, args_file = (argv if argv is not None else sys.argv[1:])
    _arm_rank()
    args: dict[str, Any] = json.loads(Path(args_file).read_text(encoding="utf-8"))
    if kind == "queued":
        from workers.queued import train_in_child

        return train_in_child(**args)
    from workers.cli import train_as_rank

    return train_as_rank(**args)


if __name__ == "__main__":
    sys.exit(main())
