"""Starting and stopping the studio's processes: Celery workers (one per GPU for training, one for chat), and the
small supervisor that `mora-studio up` and `mora-studio worker` share.

Children get their own session (a terminal's Ctrl-C reaches only the supervisor, which then stops them in order)
and a parent-death signal, so even a supervisor killed outright leaves no worker behind.
"""
from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from workers.celery_app import CHAT_QUEUE, TRAIN_QUEUE, UTILITY_QUEUE

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass  # not Linux: the supervisor's own shutdown still stops the children


@dataclass
class WorkerSpec:
    name: str
    queue: str
    gpu: Optional[str] = None


def worker_specs(queues: Sequence[str], gpus: Sequence[str], cpu_workers: int = 1) -> list[WorkerSpec]:
    """One training worker per GPU (or `cpu_workers` on the CPU), one chat worker (on the first GPU, if any), and
    with the chat worker a utility worker on the CPU for the small calls (preview, budget), which thus never wait
    behind a generation."""
    specs = []
    if TRAIN_QUEUE in queues:
        specs += [WorkerSpec(f"train-gpu{g}", TRAIN_QUEUE, g) for g in gpus] or [
            WorkerSpec(f"train-cpu{i}", TRAIN_QUEUE) for i in range(max(1, cpu_workers))]
    if CHAT_QUEUE in queues:
        specs.append(WorkerSpec(f"chat-gpu{gpus[0]}" if gpus else "chat-cpu", CHAT_QUEUE, gpus[0] if gpus else None))
    if CHAT_QUEUE in queues or UTILITY_QUEUE in queues:
        specs.append(WorkerSpec("utility-cpu", UTILITY_QUEUE))
    unknown = set(queues) - {TRAIN_QUEUE, CHAT_QUEUE, UTILITY_QUEUE}
    if unknown:
        raise ValueError(f"unknown queue {sorted(unknown)[0]!r}: the queues are {TRAIN_QUEUE}, {CHAT_QUEUE} and "
                         f"{UTILITY_QUEUE} (chat brings a utility worker along)")
    return specs


def celery_command(spec: WorkerSpec) -> list[str]:
    # The solo pool runs the job in the worker process itself: no fork after CUDA initialises, and killing the worker
    # kills its job (a prefork child would live on, orphaned).
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", "--pool", "solo",
            "--queues", spec.queue, "--hostname", f"{spec.name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"]


def worker_env(spec: WorkerSpec, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(base if base is not None else os.environ)
    if spec.gpu is not None:  # one GPU per training worker: it sees only its own device
        env["CUDA_VISIBLE_DEVICES"] = spec.gpu
        env["MORA_GPUS"] = spec.gpu
    return env


class ProcessGroup:
    """Child processes with their logs in one folder; `stop()` ends them all, newest first."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.children: dict[str, subprocess.Popen] = {}

    def spawn(self, name: str, args: list[str], env: Optional[dict[str, str]] = None) -> subprocess.Popen:
        log = open(self.log_dir / f"{name}.log", "ab")
        process = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                   start_new_session=True, preexec_fn=_die_with_parent)
        log.close()
        self.children[name] = process
        return process

    def first_exit(self, poll_s: float = 0.5, should_stop=lambda: False) -> Optional[tuple[str, int]]:
        """Block until a child exits (returns its name and code) or `should_stop()` turns true (returns None)."""
        while not should_stop():
            for name, process in self.children.items():
                code = process.poll()
                if code is not None:
                    return name, code
            time.sleep(poll_s)
        return None

    def stop(self, timeout: float = 15.0) -> None:
        for process in reversed(list(self.children.values())):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in self.children.values():
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_until_signalled(group: ProcessGroup, on_start_message: str) -> int:
    """Wait for SIGINT/SIGTERM (stop everything, exit 0) or a child's death (stop everything, exit 1)."""
    stopping = {"flag": False}

    def handle(signum, frame):
        stopping["flag"] = True

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(on_start_message, flush=True)
    try:
        exited = group.first_exit(should_stop=lambda: stopping["flag"])
    finally:
        print("stopping...", flush=True)
        group.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if exited is not None:
        name, code = exited
        print(f"{name} exited with code {code}; see {group.log_dir / (name + '.log')}", file=sys.stderr)
        return 1
    return 0
