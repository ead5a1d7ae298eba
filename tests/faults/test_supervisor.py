"""`mora-studio up` keeps the studio up: a worker killed with SIGKILL (what the OOM killer does) is restarted by the
supervisor while the web page keeps answering; only Ctrl-C stops everything."""
import os
import re
import signal
import threading
import time
from pathlib import Path

from tests.app.test_up import _alive, _children, _http_ok, studio_env, studio_process
from tests.workers.queue_harness import wait_for
from workers.embedded_redis import free_port
from workers.processes import ProcessGroup


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def _worker_pid(up_pid: int, queue: str):
    found = [pid for pid in _children(up_pid) if f"--queues {queue} " in _cmdline(pid) and _alive(pid)]
    return found[0] if found else None


def _ready_count(log: Path) -> int:
    return len(re.findall(r"celery@\S+ ready\.|\S+@\S+ ready\.", log.read_text(errors="replace"))) if log.exists() else 0


def _kill_and_wait_back(up_pid: int, queue: str, log: Path) -> tuple[float, float]:
    """SIGKILL the queue's worker; return seconds until the supervisor restarted it and until the new one is ready."""
    old = _worker_pid(up_pid, queue)
    assert old, f"no {queue} worker under up"
    ready_before = _ready_count(log)
    killed = time.monotonic()
    os.kill(old, signal.SIGKILL)
    new = wait_for(lambda: (pid := _worker_pid(up_pid, queue)) and pid != old and pid, 60, f"a new {queue} worker")
    restarted = time.monotonic() - killed
    wait_for(lambda: _ready_count(log) > ready_before, 90, f"the restarted {queue} worker to be ready", every=0.2)
    ready = time.monotonic() - killed
    text = log.read_text(errors="replace")
    assert "was killed by signal 9 (SIGKILL); restarting it in 1 s" in text
    assert f"restarted (pid {new})" in text
    return restarted, ready


def test_killed_workers_are_restarted_and_the_web_page_stays_up(tmp_path, tiny_model_dir):
    port = free_port()
    env = studio_env(tmp_path, port, MORA_MODELS_DIR=str(Path(tiny_model_dir).parent), OMP_NUM_THREADS="1")
    url = f"http://127.0.0.1:{port}/"
    logs = tmp_path / "data" / "logs"
    with studio_process(["up", "--no-prepare"], env, tmp_path) as up:
        wait_for(lambda: _http_ok(url), 120, "the web app to answer", every=0.5)
        wait_for(lambda: _ready_count(logs / "worker-chat-cpu.log") and _ready_count(logs / "worker-train-cpu0.log"),
                 120, "both workers to be ready", every=0.5)
        web_pid = [pid for pid in _children(up.pid) if "app.cli web" in _cmdline(pid)]
        failures, probes, done = [], [0], threading.Event()

        def probe():
            while not done.is_set():
                if not _http_ok(url):
                    failures.append(time.monotonic())
                probes[0] += 1
                done.wait(0.5)

        prober = threading.Thread(target=probe, daemon=True)
        prober.start()
        try:
            chat = _kill_and_wait_back(up.pid, "chat", logs / "worker-chat-cpu.log")
            train = _kill_and_wait_back(up.pid, "train", logs / "worker-train-cpu0.log")
        finally:
            done.set()
            prober.join(5)
        print(f"\nchat worker: restarted {chat[0]:.1f} s after SIGKILL, ready {chat[1]:.1f} s after; "
              f"train worker: restarted {train[0]:.1f} s, ready {train[1]:.1f} s; {probes[0]} HTTP probes")
        assert not failures, f"{len(failures)} of {probes[0]} HTTP probes failed while workers restarted"
        assert probes[0] >= 4
        assert up.poll() is None
        assert [pid for pid in _children(up.pid) if "app.cli web" in _cmdline(pid)] == web_pid  # never restarted
        children = _children(up.pid)
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
        assert up.returncode == 0, output
        wait_for(lambda: not any(_alive(pid) for pid in children), 20, "every child process to exit")


def test_any_child_is_restarted_with_doubling_backoff_that_resets_once_stable(tmp_path, capsys):
    """The web process and the embedded Redis are children like the workers: the same loop restarts them."""
    group = ProcessGroup(tmp_path / "logs", first_delay_s=0.2, max_delay_s=0.8, stable_after_s=3.0)
    stop = threading.Event()
    supervisor = threading.Thread(target=group.supervise, args=(stop.is_set,), kwargs={"poll_s": 0.05})
    group.spawn("web", ["sleep", "600"])
    supervisor.start()
    try:
        delays = []
        for _ in range(4):
            old = group.children["web"]
            killed = time.monotonic()
            os.kill(old.pid, signal.SIGKILL)
            wait_for(lambda: group.children["web"] is not old and group.children["web"].poll() is None, 10,
                     "the restart", every=0.02)
            delays.append(time.monotonic() - killed)
        assert [round(d, 1) >= expected for d, expected in zip(delays, (0.2, 0.4, 0.8, 0.8))] == [True] * 4, delays
        assert delays[3] < 2.0, delays  # capped at max_delay_s
        time.sleep(3.2)  # stay up past stable_after_s (this is the behaviour under test, not a synchronisation)
        old = group.children["web"]
        killed = time.monotonic()
        os.kill(old.pid, signal.SIGKILL)
        wait_for(lambda: group.children["web"] is not old, 10, "the restart", every=0.02)
        assert time.monotonic() - killed < 0.6  # back to the first delay
    finally:
        stop.set()
        supervisor.join(5)
        group.stop()
    log = (tmp_path / "logs" / "web.log").read_text()
    assert log.count("was killed by signal 9 (SIGKILL); restarting it in") == 5
    assert "restarting it in 0.8 s" in log and log.count("restarted (pid") == 5
    assert "supervisor: web was killed by signal 9" in capsys.readouterr().out
