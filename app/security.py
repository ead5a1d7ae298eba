"""The web process answers only its own host, and a login page that cannot be brute-forced at full speed.

A studio on loopback with no login is reachable by any page the user's browser opens: that page's own domain, made to
resolve to 127.0.0.1 (DNS rebinding), sends requests whose Host is the attacker's name. So every request must name one
of the studio's hosts, and a call that changes state must come from a page of the studio (its Origin, or its Referer
when a browser sends no Origin). Clients that are not browsers (the CLI, `gradio_client`, OpenAI clients) send neither
header and are let through on the Host check alone.

Both checks are one ASGI middleware, given to Gradio's FastAPI app before it starts (`launch(app_kwargs=...)`), so it
runs in front of every route, the Gradio queue's and uploads' included.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")
STATE_CHANGING = frozenset({"POST", "PUT", "PATCH", "DELETE"})
LOGIN_PATHS = frozenset({"/login", "/login/"})
ANY_HOST = "*"


def create_private_folder(folder: Path) -> Path:
    """Create the data folder readable by its owner only (0700): it holds datasets, adapters and the Redis password.
    A folder that exists already keeps the mode its owner gave it."""
    folder = Path(folder)
    if not folder.exists():
        folder.parent.mkdir(parents=True, exist_ok=True)
        folder.mkdir(mode=0o700, exist_ok=True)
        folder.chmod(0o700)  # mkdir's mode is filtered by the umask
    return folder


def _split_host(value: str, default_port: Optional[int]) -> tuple[str, Optional[int]]:
    """'Name:port' → ('name', port); a bracketed IPv6 address keeps its brackets; a bad port gives (name, -1)."""
    value = value.strip().lower()
    if value.startswith("["):
        name, _, rest = value.partition("]")
        name, port_text = name + "]", rest[1:] if rest.startswith(":") else ""
    else:
        name, _, port_text = value.partition(":")
    if not port_text:
        return name, default_port
    return name, int(port_text) if port_text.isdigit() else -1


@dataclass(frozen=True)
class AllowedHosts:
    """The names the studio answers to: loopback and MORA_HOST at the studio's port, and the allow-list (an entry
    without a port allows any port, for a studio behind a proxy; '*' turns the check off)."""

    port: int
    own_names: tuple[str, ...]
    listed: tuple[tuple[str, Optional[int]], ...]
    any_host: bool = False

    @classmethod
    def build(cls, port: int, bind_host: str, allow_list: list[str]) -> "AllowedHosts":
        own = list(LOOPBACK_NAMES)
        if bind_host not in ("0.0.0.0", "::", ""):
            own.append(f"[{bind_host}]" if ":" in bind_host and not bind_host.startswith("[") else bind_host)
        entries = [entry for entry in allow_list if entry != ANY_HOST]
        return cls(port, tuple(name.lower() for name in own), tuple(_split_host(e, None) for e in entries),
                   any_host=ANY_HOST in allow_list)

    def allows(self, host_and_port: str, default_port: int) -> bool:
        if self.any_host:
            return True
        name, port = _split_host(host_and_port, default_port)
        if name in self.own_names and port == self.port:
            return True
        return any(name == listed and (listed_port is None or listed_port == port) for listed, listed_port in
                   self.listed)


class LoginThrottle:
    """Failed logins per client address: after `free_failures` of them, each further try waits 1 s, 2 s, 4 s, ...
    (at most `max_delay_s`) before it is answered again; a right password clears the count.

    Refused tries are answered at once with 429 rather than held open, so a burst costs the server nothing."""

    def __init__(self, free_failures: int = 5, max_delay_s: float = 60.0, max_clients: int = 4096,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.free_failures = free_failures
        self.max_delay_s = max_delay_s
        self.max_clients = max_clients
        self.clock = clock
        self._failures: dict[str, tuple[int, float]] = {}  # address → (failures, refused until)

    def wait_s(self, client: str) -> float:
        """Seconds until `client` may try again (0: now)."""
        _, until = self._failures.get(client, (0, 0.0))
        return max(0.0, until - self.clock())

    def failed(self, client: str) -> None:
        failures = self._failures.pop(client, (0, 0.0))[0] + 1
        over = failures - self.free_failures
        delay = min(self.max_delay_s, 2.0 ** over) if over >= 0 else 0.0
        self._failures[client] = (failures, self.clock() + delay)
        if len(self._failures) > self.max_clients:  # many addresses: forget the one that failed longest ago
            self._failures.pop(next(iter(self._failures)))

    def succeeded(self, client: str) -> None:
        self._failures.pop(client, None)


def refused_host_message(host: str) -> str:
    return (f"This studio does not answer to the host '{host}'. If you reach it by that name, add it to "
            "MORA_ALLOWED_HOSTS (comma-separated, e.g. MORA_ALLOWED_HOSTS=studio.example.com).")


def refused_origin_message(origin: str) -> str:
    return (f"Refused a change requested by a page of '{origin}', which is not this studio. If that is the studio's "
            "own address, add its host to MORA_ALLOWED_HOSTS.")


class HostGuard:
    """ASGI middleware: 403 for a Host (or, on a state-changing call, an Origin/Referer) that is not the studio's,
    and 429 for a login tried again too soon after failures (when `throttle` is given, i.e. MORA_AUTH is set)."""

    def __init__(self, app: ASGIApp, hosts: AllowedHosts, throttle: Optional[LoginThrottle] = None) -> None:
        self.app = app
        self.hosts = hosts
        self.throttle = throttle

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope)
        if refusal is not None:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1008})
            else:
                await PlainTextResponse(refusal, status_code=403)(scope, receive, send)
            return
        if self.throttle is not None and scope["type"] == "http" and scope["method"] == "POST" \
                and scope["path"] in LOGIN_PATHS:
            await self.throttled_login(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def refusal(self, scope: Scope) -> Optional[str]:
        """Why this request is refused, in words; None when it may go on."""
        headers = Headers(scope=scope)
        default_port = 443 if scope.get("scheme") in ("https", "wss") else 80
        host = headers.get("host", "")
        if not self.hosts.allows(host, default_port):
            return refused_host_message(host)
        if scope["type"] == "http" and scope["method"] not in STATE_CHANGING:
            return None
        source = headers.get("origin") or headers.get("referer")
        if source is None:
            return None
        parts = urlsplit(source)
        if parts.scheme not in ("http", "https") or not parts.netloc:  # "null": a sandboxed or file:// page
            return refused_origin_message(source)
        if not self.hosts.allows(parts.netloc, 443 if parts.scheme == "https" else 80):
            return refused_origin_message(f"{parts.scheme}://{parts.netloc}")
        return None

    async def throttled_login(self, scope: Scope, receive: Receive, send: Send) -> None:
        client = (scope.get("client") or ("unknown", 0))[0]
        wait = self.throttle.wait_s(client)
        if wait > 0:
            seconds = max(1, round(wait))
            await PlainTextResponse(f"Too many failed logins from {client}: try again in {seconds} s.",
                                    status_code=429, headers={"Retry-After": str(seconds)})(scope, receive, send)
            return
        answered: dict[str, int] = {}

        async def watch(message: Message) -> None:
            if message["type"] == "http.response.start":
                answered["status"] = message["status"]
            await send(message)

        await self.app(scope, receive, watch)
        if answered.get("status") == 200:
            self.throttle.succeeded(client)
        elif answered.get("status") in (400, 401):
            self.throttle.failed(client)
