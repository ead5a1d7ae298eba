"""The Host/Origin guard, the login throttle, the embedded Redis's password and the store's file modes, each on its
own; tests/faults/test_host.py runs them together in a real `mora-studio up`."""
import os
import stat

import pytest
import redis
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from app.security import AllowedHosts, HostGuard, LoginThrottle, create_private_folder
from storage.db import create_store_engine
from workers.embedded_redis import EmbeddedRedis, stored_password


def _mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def _client(allow_list=(), bind_host="127.0.0.1", throttle=None) -> TestClient:
    async def ok(request):
        return PlainTextResponse("ok")

    async def login(request):
        form = await request.form()
        return PlainTextResponse("in" if form.get("password") == "right" else "wrong",
                                 status_code=200 if form.get("password") == "right" else 400)

    app = Starlette(routes=[Route("/", ok, methods=["GET", "POST"]), Route("/login", login, methods=["POST"])],
                    middleware=[Middleware(HostGuard, hosts=AllowedHosts.build(7860, bind_host, list(allow_list)),
                                           throttle=throttle)])
    return TestClient(app, base_url="http://127.0.0.1:7860")


@pytest.mark.parametrize("host", ["127.0.0.1:7860", "localhost:7860", "LOCALHOST:7860", "[::1]:7860"])
def test_loopback_names_at_the_studio_port_are_answered(host):
    assert _client().get("/", headers={"Host": host}).status_code == 200


@pytest.mark.parametrize("host", ["evil.example:7860", "127.0.0.1:7861", "localhost", "localhost.evil.example:7860",
                                  "127.0.0.1:x", ""])
def test_other_hosts_are_refused_with_the_setting_named(host):
    response = _client().get("/", headers={"Host": host})
    assert response.status_code == 403
    assert f"'{host}'" in response.text and "MORA_ALLOWED_HOSTS" in response.text


def test_allow_list_and_bind_host_add_names():
    client = _client(allow_list=["studio.example.com", "proxy.lan:8443"], bind_host="10.0.0.5")
    assert client.get("/", headers={"Host": "studio.example.com"}).status_code == 200  # any port
    assert client.get("/", headers={"Host": "studio.example.com:9000"}).status_code == 200
    assert client.get("/", headers={"Host": "proxy.lan:8443"}).status_code == 200
    assert client.get("/", headers={"Host": "proxy.lan:8444"}).status_code == 403
    assert client.get("/", headers={"Host": "10.0.0.5:7860"}).status_code == 200
    assert _client(allow_list=["*"]).get("/", headers={"Host": "anything:1"}).status_code == 200


def test_state_changing_calls_need_the_studio_origin():
    client = _client()
    assert client.post("/", headers={"Origin": "http://127.0.0.1:7860"}).status_code == 200
    assert client.post("/").status_code == 200  # not a browser: no Origin, the Host check is enough
    evil = client.post("/", headers={"Origin": "http://evil.example"})
    assert evil.status_code == 403 and "http://evil.example" in evil.text
    assert client.post("/", headers={"Origin": "null"}).status_code == 403
    assert client.post("/", headers={"Referer": "http://evil.example/page"}).status_code == 403
    assert client.post("/", headers={"Referer": "http://localhost:7860/?view=runs"}).status_code == 200
    assert client.get("/", headers={"Origin": "http://evil.example"}).status_code == 200  # reads: CORS guards them


def test_throttle_delays_grow_after_free_failures_and_are_capped():
    now = [0.0]
    throttle = LoginThrottle(free_failures=5, max_delay_s=60, clock=lambda: now[0])
    delays = []
    for _ in range(12):
        throttle.failed("1.2.3.4")
        delays.append(throttle.wait_s("1.2.3.4"))
    assert delays == [0, 0, 0, 0, 1, 2, 4, 8, 16, 32, 60, 60]
    assert throttle.wait_s("5.6.7.8") == 0  # per address
    now[0] += 60
    assert throttle.wait_s("1.2.3.4") == 0
    throttle.succeeded("1.2.3.4")
    throttle.failed("1.2.3.4")
    assert throttle.wait_s("1.2.3.4") == 0  # a right password cleared the count


def test_throttle_forgets_the_oldest_address_beyond_its_bound():
    throttle = LoginThrottle(max_clients=3)
    for address in ("a", "b", "c", "d"):
        for _ in range(6):
            throttle.failed(address)
    assert throttle.wait_s("a") == 0 and throttle.wait_s("d") > 0


def test_throttled_login_answers_429_then_lets_the_right_password_in():
    now = [0.0]
    client = _client(throttle=LoginThrottle(clock=lambda: now[0]))
    codes = [client.post("/login", data={"password": "nope"}).status_code for _ in range(8)]
    assert codes == [400] * 5 + [429] * 3
    refused = client.post("/login", data={"password": "right"})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1" and "try again in 1 s" in refused.text
    now[0] += 1.0
    assert client.post("/login", data={"password": "right"}).status_code == 200


def test_embedded_redis_password_is_kept_0600_and_required(tmp_path):
    password_file = tmp_path / "redis.password"
    password = stored_password(password_file)
    assert _mode(password_file) == 0o600 and stored_password(password_file) == password  # reused
    with EmbeddedRedis(password=password, config_file=tmp_path / "redis.conf") as server:
        assert _mode(tmp_path / "redis.conf") == 0o600
        cmdline = (open(f"/proc/{server.process.pid}/cmdline", "rb").read()).decode()
        assert password not in cmdline  # every local user can read a command line
        assert redis.Redis.from_url(server.url).ping()
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(host="127.0.0.1", port=server.port).ping()
        server.publish(tmp_path / "redis.url")
        assert _mode(tmp_path / "redis.url") == 0o600
        assert (tmp_path / "redis.url").read_text().strip() == server.url


def test_data_folder_is_0700_and_the_store_0600(tmp_path):
    data = create_private_folder(tmp_path / "new" / "data")
    assert _mode(data) == 0o700
    engine = create_store_engine(f"sqlite:///{data / 'studio.db'}")
    with engine.connect() as connection:
        connection.exec_driver_sql("CREATE TABLE t (x)")
        assert {_mode(data / name) for name in ("studio.db", "studio.db-wal", "studio.db-shm")} == {0o600}
    engine.dispose()


def test_allow_list_setting_names_a_wrong_entry(monkeypatch):
    from app import settings

    monkeypatch.setenv("MORA_ALLOWED_HOSTS", " studio.example.com , 10.0.0.5:7860,")
    assert settings.allowed_hosts() == ["studio.example.com", "10.0.0.5:7860"]
    monkeypatch.setenv("MORA_ALLOWED_HOSTS", "https://studio.example.com")
    with pytest.raises(ValueError, match="MORA_ALLOWED_HOSTS: 'https://studio.example.com' is not a host name"):
        settings.allowed_hosts()
