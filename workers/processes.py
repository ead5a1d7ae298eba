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
from typing import Callable, Optional, Sequence

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
    """The GPU indices the worker owns, comma-separated (`0,1,2,3`), or None on the CPU."""
    slots: int = 1
    """Jobs it runs at once: a training worker owning N GPUs runs up to N, lending them per job (DevicePool); a chat
    worker runs CHAT_SLOTS, which share its models and take turns on them (workers.chat.ModelTurns: one thread, first come first served)."""


CHAT_SLOTS = 2
"""A chat worker's jobs at once: a chat or an API request is answered between two batches of a running evaluation
instead of after all of it."""


def worker_specs(queues: Sequence[str], gpus: Sequence[str], cpu_workers: int = 1) -> list[WorkerSpec]:
    """One training worker owning every GPU given (or `cpu_workers` on the CPU), one chat worker (on the first GPU,
    if any), and with the chat worker a utility worker on the CPU for the small calls (preview, budget), which thus
    never wait behind a generation. The training worker runs as many jobs at once as it has GPUs and lends each job
    the devices its run asks for (`devices`), first come, first served (workers.queued.DevicePool): `--gpus 0,1,2,3`
    runs four 1-GPU jobs side by side, or one 4-GPU job, or a 2-GPU job beside two 1-GPU jobs."""
    specs = []
    if TRAIN_QUEUE in queues:
        owned = [WorkerSpec(f"train-gpu{'-'.join(gpus)}", TRAIN_QUEUE, ",".join(gpus), len(gpus))] if gpus else []
        specs += owned or [WorkerSpec(f"train-cpu{i}", TRAIN_QUEUE) for i in range(max(1, cpu_workers))]
    if CHAT_QUEUE in queues:
        specs.append(WorkerSpec(f"chat-gpu{gpus[0]}" if gpus else "chat-cpu", CHAT_QUEUE, gpus[0] if gpus else None,
                                CHAT_SLOTS))
    if CHAT_QUEUE in queues or UTILITY_QUEUE in queues:
        specs.append(WorkerSpec("utility-cpu", UTILITY_QUEUE))
    unknown = set(queues) - {TRAIN_QUEUE, CHAT_QUEUE, UTILITY_QUEUE}
    if unknown:
        raise ValueError(f"unknown queue {sorted(unknown)[0]!r}: the queues are {TRAIN_QUEUE}, {CHAT_QUEUE} and "
                         f"{UTILITY_QUEUE} (chat brings a utility worker along)")
    return specs


def celery_command(spec: WorkerSpec) -> list[str]:
    # The solo pool runs the job in the worker process itself: no fork after CUDA initialises, and killing the worker
    # kills its job (a prefork child would live on, orphaned). A worker of several GPUs takes threads, as many as it
    # has GPUs, for the same reasons: each thread only waits on its job's own process (or torchrun).
    pool = ["--pool", "threads", "--concurrency", str(spec.slots)] if spec.slots > 1 else ["--pool", "solo"]
    return [sys.executable, "-m", "celery", "-A", "workers.celery_app", "worker", *pool,
            "--queues", spec.queue, "--hostname", f"{spec.name}@%h", "--loglevel", "INFO",
            "--without-gossip", "--without-mingle"]


def worker_env(spec: WorkerSpec, base: Optional[dict[str, str]] = None) -> dict[str, str]:
    env = dict(base if base is not None else os.environ)
    if spec.gpu is not None:  # a worker sees only its own devices, and lends them to its jobs
        env["CUDA_VISIBLE_DEVICES"] = spec.gpu
        env["MORA_GPUS"] = spec.gpu
    return env


RESTART_FIRST_DELAY_S = 1.0
RESTART_MAX_DELAY_S = 30.0
STABLE_AFTER_S = 60.0  # a child that stayed up this long starts again from the first delay when it dies


@dataclass
class Child:
    """A supervised child: how to start it again, and when it may be restarted next."""
    args: list[str]
    env: Optional[dict[str, str]]
    process: subprocess.Popen
    started: float
    ready: Optional[Callable[[subprocess.Popen], object]] = None
    delay_s: float = RESTART_FIRST_DELAY_S
    restart_at: Optional[float] = None


def describe_exit(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by signal {-code} ({signal.Signals(-code).name})"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with code {code}"


class ProcessGroup:
    """Child processes with their logs in one folder; `supervise()` restarts the ones that die, `stop()` ends them
    all, newest first."""

    def __init__(self, log_dir: Path, first_delay_s: float = RESTART_FIRST_DELAY_S,
                 max_delay_s: float = RESTART_MAX_DELAY_S, stable_after_s: float = STABLE_AFTER_S) -> None:
        self.log_dir = Path(log_dir)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.first_delay_s, self.max_delay_s, self.stable_after_s = first_delay_s, max_delay_s, stable_after_s
        self.supervised: dict[str, Child] = {}

    @property
    def children(self) -> dict[str, subprocess.Popen]:
        return {name: child.process for name, child in self.supervised.items()}

    def spawn(self, name: str, args: list[str], env: Optional[dict[str, str]] = None,
              ready: Optional[Callable[[subprocess.Popen], object]] = None) -> subprocess.Popen:
        """Start a child; `ready(process)` (if given) blocks until it serves, at every start and restart."""
        process = self._start(name, args, env)
        self.supervised[name] = Child(args, env, process, time.monotonic(), ready, self.first_delay_s)
        if ready is not None:
            ready(process)
        return process

    def _start(self, name: str, args: list[str], env: Optional[dict[str, str]]) -> subprocess.Popen:
        with open(self.log_dir / f"{name}.log", "ab") as log:
            return subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    start_new_session=True, preexec_fn=_die_with_parent)

    def log(self, name: str, line: str) -> None:
        """One line on the console and in the child's own log, so either place tells the story."""
        stamped = f"{time.strftime('%Y-%m-%d %H:%M:%S')} supervisor: {name} {line}"
        print(stamped, flush=True)
        with open(self.log_dir / f"{name}.log", "a", encoding="utf-8") as log:
            log.write(stamped + "\n")

    def check_once(self) -> None:
        """Notice dead children and schedule their restart; restart those whose backoff has passed."""
        now = time.monotonic()
        for name, child in self.supervised.items():
            if child.restart_at is None:
                code = child.process.poll()
                if code is None:
                    continue
                if now - child.started >= self.stable_after_s:
                    child.delay_s = self.first_delay_s
                child.restart_at = now + child.delay_s
                self.log(name, f"{describe_exit(code)}; restarting it in {child.delay_s:g} s "
                               f"(log: {self.log_dir / (name + '.log')})")
                child.delay_s = min(child.delay_s * 2, self.max_delay_s)
            elif now >= child.restart_at:
                child.process = self._start(name, child.args, child.env)
                child.started, child.restart_at = time.monotonic(), None
                if child.ready is not None:
                    try:
                        child.ready(child.process)
                    except RuntimeError as error:
                        self.log(name, f"did not come back: {error}")
                        continue
                self.log(name, f"restarted (pid {child.process.pid})")

    def supervise(self, should_stop: Callable[[], bool], poll_s: float = 0.2) -> None:
        """Keep every child running until `should_stop()` turns true."""
        while not should_stop():
            self.check_once()
            time.sleep(poll_s)

    def stop(self, timeout: float = 15.0) -> None:
        processes = [child.process for child in self.supervised.values()]
        for process in reversed(processes):
            if process.poll() is None:
                process.terminate()
        deadline = time.monotonic() + timeout
        for process in processes:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def run_until_signalled(group: ProcessGroup, on_start_message: str) -> int:
    """Supervise the group until SIGINT/SIGTERM, then stop everything and exit 0. A child that dies is restarted
    with backoff (1 s doubling to 30 s, back to 1 s once it stayed up a minute); the others never notice."""
    stopping = {"flag": False}

    def handle(signum, frame):
        stopping["flag"] = True

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    print(on_start_message, flush=True)
    try:
        group.supervise(should_stop=lambda: stopping["flag"])
    finally:
        print("stopping...", flush=True)
        group.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
