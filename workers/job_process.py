"""Each training job runs in a child process of its worker, so nothing the job does can take the worker with it.

The kernel's out-of-memory killer sends SIGKILL to the biggest process; with the job in the worker itself that was
the worker, and the run was only noticed as `worker lost` after the heartbeat ran out. In a child, the worker sees
the child's exit at once, fails *that run* with the reason and what to lower, and takes the next job.

Children come from a forkserver that imported the training stack once, when the worker started, so a job starts in
milliseconds rather than importing torch again; the server itself never touches CUDA, so each child initialises its
own device (a fork of a process that has initialised CUDA cannot use it).

A child whose worker dies (kill -9, a restart by the supervisor) exits at once: it watches a pipe whose other end only
the worker holds, and the kernel closes that end when the worker goes. Otherwise an orphaned job would go on
training, and writing events for, a run the collector has already marked `worker lost`.
"""
from __future__ import annotations

import multiprocessing
import multiprocessing.forkserver
import os
import threading
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

from workers.processes import describe_exit

_CONTEXT = multiprocessing.get_context("forkserver")
PRELOAD = ["workers.training"]


def start_server() -> None:
    """Start the forkserver now, with the training stack imported, so the first job does not wait for torch."""
    _CONTEXT.set_forkserver_preload(PRELOAD)
    multiprocessing.forkserver.ensure_running()


def _exit_when_closed(lifeline) -> None:
    def watch() -> None:
        try:
            lifeline.recv()  # the worker never sends: this returns only by EOFError, when the worker is gone
        except (EOFError, OSError):
            pass
        os._exit(70)

    threading.Thread(target=watch, daemon=True, name="lifeline").start()


def _child(target: Callable[..., int], args: Sequence[Any], lifeline) -> None:
    _exit_when_closed(lifeline)
    raise SystemExit(target(*args))


@dataclass(frozen=True)
class JobExit:
    """How a job's process ended: its exit code (what the job returned, or minus the signal that killed it), and
    whether the worker killed it for going over its memory limit (then `rss_bytes` is what it held)."""
    code: int
    over_limit: bool = False
    rss_bytes: int = 0


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return 0


def run_in_child(target: Callable[..., int], args: Sequence[Any], on_start: Callable[[int], None] = lambda pid: None,
                 memory_limit_bytes: Optional[int] = None, check_every_s: float = 0.2) -> JobExit:
    """Run `target(*args)` in a child process and say how it ended. `target` must be a module-level function (the
    forkserver imports it by name). With a memory limit, the child's resident memory is checked every
    `check_every_s` and the child is killed when it holds more: an address-space rlimit would count what torch
    reserves but never touches (about a GiB at import), so it cannot say "memory" honestly."""
    start_server()
    lifeline_read, lifeline_write = _CONTEXT.Pipe(duplex=False)
    process = _CONTEXT.Process(target=_child, args=(target, tuple(args), lifeline_read), daemon=False,
                               name="training-job")
    process.start()
    lifeline_read.close()  # only the child holds the read end; the write end closes when this process dies
    over_limit, rss = False, 0
    try:
        on_start(process.pid)
        while process.exitcode is None:
            process.join(check_every_s if memory_limit_bytes else None)
            if memory_limit_bytes and process.exitcode is None:
                rss = _rss_bytes(process.pid)
                if rss > memory_limit_bytes:
                    over_limit = True
                    process.kill()
                    process.join()
    finally:
        if process.exitcode is None:  # this thread was interrupted (the worker is shutting down): end the job too
            process.kill()
            process.join()
        lifeline_write.close()
    return JobExit(process.exitcode, over_limit, rss if over_limit else 0)


def killed_message(exit_code: int, advice: str) -> str:
    """What a run's page says when its training process ended without reporting: a SIGKILL is almost always the
    kernel's out-of-memory killer, which is the case a user can act on."""
    if exit_code == -9:
        return (f"the training process {describe_exit(exit_code)}, most likely by the kernel's out-of-memory killer: "
                f"{advice}; the run can be resumed from its last checkpoint")
    return f"the training process {describe_exit(exit_code)}; the run can be resumed from its last checkpoint"
