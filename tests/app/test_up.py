"""`mora-studio up` as a user runs it: it starts an embedded Redis, the workers and the web app, serves HTTP, and on
Ctrl-C (SIGINT) stops every process it started."""
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from tests.workers.queue_harness import wait_for
from workers.embedded_redis import free_port

ROOT = Path(__file__).resolve().parents[2]


def studio_env(tmp_path: Path, port: int, **extra: str) -> dict[str, str]:
    """A studio of its own: its data folder, its port, no user's Redis, no hub."""
    env = {**os.environ, "MORA_DATA_DIR": str(tmp_path / "data"), "MORA_PORT": str(port), "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": str(ROOT), **extra}
    env.pop("REDIS_URL", None)
    return env


@contextmanager
def studio_process(args: list[str], env: dict[str, str], cwd: Path, stop_timeout: float = 60) -> Iterator:
    """`mora-studio ARGS` as a child; stopped with Ctrl-C (SIGINT) at the end, killed if it does not stop."""
    process = subprocess.Popen([sys.executable, "-m", "app.cli", *args], env=env, cwd=cwd,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        yield process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.communicate(timeout=stop_timeout)
            except subprocess.TimeoutExpired:
                process.kill()


def _children(pid: int) -> list[int]:
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            found.append(int(stat.parent.name))
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return response.status == 200
    except OSError:
        return False


def test_up_serves_http_and_stops_everything_on_sigint(tmp_path, tiny_model_dir):
    port = free_port()
    env = studio_env(tmp_path, port, MORA_MODELS_DIR=str(Path(tiny_model_dir).parent))
    with studio_process(["up", "--no-prepare"], env, tmp_path) as up:
        wait_for(lambda: _http_ok(f"http://127.0.0.1:{port}/"), 120, "the web app to answer", every=0.5)
        children = _children(up.pid)
        assert len(children) == 5, children  # redis, the training worker, the chat and utility workers, web
        commands = [Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() for pid in children]
        assert any("redis-server" in c and "127.0.0.1" in c for c in commands)
        assert sum("celery" in c for c in commands) == 3
        assert (tmp_path / "data" / "logs" / "web.log").exists()
        published = tmp_path / "data" / "redis.url"
        # other terminals' commands find the Redis, and its password
        assert published.read_text().startswith("redis://:") and "@127.0.0.1:" in published.read_text()
        runs = subprocess.run([sys.executable, "-m", "app.cli", "runs"], env=env, cwd=tmp_path, capture_output=True,
                              text=True, timeout=60)
        assert runs.returncode == 0 and runs.stdout.startswith("id"), runs.stderr
        up.send_signal(signal.SIGINT)
        output, _ = up.communicate(timeout=60)
        assert up.returncode == 0, output
        wait_for(lambda: not any(_alive(pid) for pid in children), 20, "every child process to exit")
        assert not published.exists()
        assert "Ctrl-C stops everything" in output


def test_web_binds_loopback_and_requires_login_when_auth_is_set(tmp_path):
    port = free_port()
    env = studio_env(tmp_path, port, MORA_AUTH="ada:secret-pass")
    env.pop("MORA_HOST", None)
    with studio_process(["web"], env, tmp_path, stop_timeout=30):
        wait_for(lambda: _http_status(f"http://127.0.0.1:{port}/config") in (200, 401), 120, "the web app", every=0.5)
        assert _http_status(f"http://127.0.0.1:{port}/config") == 401  # nothing without logging in
        listening = Path("/proc/net/tcp").read_text().splitlines()
        local = [line.split()[1] for line in listening if line.split()[1].endswith(f":{port:04X}")]
        assert local and all(address.startswith("0100007F") for address in local)  # 127.0.0.1 only
        login = urllib.request.Request(f"http://127.0.0.1:{port}/login", method="POST",
                                       data=b"username=ada&password=secret-pass",
                                       headers={"Content-Type": "application/x-www-form-urlencoded"})
        with urllib.request.urlopen(login, timeout=5) as response:
            assert response.status == 200
        wrong = urllib.request.Request(f"http://127.0.0.1:{port}/login", method="POST",
                                       data=b"username=ada&password=nope",
                                       headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert _http_status(wrong) == 400


def _http_status(request) -> int:
    try:
        with urllib.request.urlopen(request, timeout=2) as response:
            return response.status
    except urllib.error.HTTPError as error:
        return error.code
    except OSError:
        return 0
