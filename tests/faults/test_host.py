"""A real `mora-studio up` answers only its own host: another site's Host (DNS rebinding) or Origin is refused, a burst
of wrong passwords is throttled, and what it leaves in the data folder is its owner's only (the embedded Redis's
password included, which a client must give)."""
import os
import stat
import time
import urllib.error
import urllib.request
from pathlib import Path

import httpx
import pytest
import redis

from tests.app.test_up import studio_env, studio_process
from tests.workers.queue_harness import wait_for
from workers.embedded_redis import free_port

FORM = {"Content-Type": "application/x-www-form-urlencoded"}


def _request(url: str, method: str = "GET", data: bytes | None = None, **headers: str) -> tuple[int, str, object]:
    request = urllib.request.Request(url, method=method, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            return response.status, response.read().decode(errors="replace"), response.headers
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode(errors="replace"), error.headers
    except OSError:
        return 0, "", {}


def _mode(path: Path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture(scope="module")
def studio(tmp_path_factory, tiny_model_dir):
    tmp_path = tmp_path_factory.mktemp("host")
    port = free_port()
    env = studio_env(tmp_path, port, MORA_MODELS_DIR=str(Path(tiny_model_dir).parent), MORA_AUTH="ada:secret-pass",
                     MORA_ALLOWED_HOSTS="studio.test", MORA_UPLOAD_CACHE_S="2",
                     GRADIO_TEMP_DIR=str(tmp_path / "gradio-cache"))
    env.pop("MORA_HOST", None)
    with studio_process(["up", "--no-prepare"], env, tmp_path):
        url = f"http://127.0.0.1:{port}"
        wait_for(lambda: _request(url + "/")[0] == 200, 120, "the web app to answer", every=0.5)
        yield url, port, tmp_path / "data"


def test_only_the_studios_own_hosts_are_answered(studio):
    url, port, _ = studio
    assert _request(url + "/", Host=f"localhost:{port}")[0] == 200
    assert _request(url + "/", Host="studio.test")[0] == 200  # MORA_ALLOWED_HOSTS
    status, text, _ = _request(url + "/", Host=f"rebound.evil.example:{port}")
    assert status == 403 and "rebound.evil.example" in text and "MORA_ALLOWED_HOSTS" in text
    assert _request(url + "/config", Host=f"rebound.evil.example:{port}")[0] == 403
    assert _request(url + "/gradio_api/info", Host=f"127.0.0.1:{port + 1}")[0] == 403


def test_state_changing_calls_from_another_origin_are_refused(studio):
    url, port, _ = studio
    login = b"username=ada&password=secret-pass"
    status, text, _ = _request(url + "/login", "POST", login, Origin="http://evil.example", **FORM)
    assert status == 403 and "evil.example" in text
    upload = _request(url + "/gradio_api/upload", "POST", b"x", Origin="http://evil.example",
                      **{"Content-Type": "multipart/form-data; boundary=b"})
    assert upload[0] == 403
    join = _request(url + "/gradio_api/queue/join", "POST", b"{}", Origin="null",
                    **{"Content-Type": "application/json"})
    assert join[0] == 403
    same_origin = _request(url + "/login", "POST", login, Origin=f"http://127.0.0.1:{port}", **FORM)
    assert same_origin[0] == 200


def test_a_burst_of_wrong_passwords_is_throttled_and_the_right_one_still_works(studio):
    url, port, _ = studio
    wrong = b"username=ada&password=guess"
    started = time.monotonic()
    codes = [_request(url + "/login", "POST", wrong, **FORM)[0] for _ in range(30)]
    burst_s = time.monotonic() - started
    print(f"30 wrong passwords in {burst_s:.2f} s: {codes.count(400)} answered, {codes.count(429)} refused (429)")
    assert set(codes) <= {400, 429} and codes[:5] == [400] * 5
    assert codes.count(429) >= 20, codes
    right = b"username=ada&password=secret-pass"
    status, text, headers = _request(url + "/login", "POST", right, **FORM)
    assert status == 429 and "try again in" in text and 1 <= int(headers["Retry-After"]) <= 60
    # a refused right password does not count as a failure: after the delay it gets in
    wait_for(lambda: _request(url + "/login", "POST", right, **FORM)[0] == 200, 65, "the right password to get in",
             every=0.5)


def test_the_data_folder_is_private_and_redis_needs_its_password(studio):
    _, _, data = studio
    assert _mode(data) == 0o700
    wait_for(lambda: (data / "redis.url").exists() and (data / "studio.db-wal").exists(), 30, "the store and redis.url")
    for name in ("studio.db", "studio.db-wal", "studio.db-shm", "redis.password", "redis.url", "redis.conf"):
        assert _mode(data / name) == 0o600, name
    password = (data / "redis.password").read_text().strip()
    published = (data / "redis.url").read_text().strip()
    assert len(password) >= 32 and f":{password}@127.0.0.1:" in published
    assert redis.Redis.from_url(published).ping()
    port = int(published.rsplit(":", 1)[1].split("/")[0])
    with pytest.raises(redis.AuthenticationError):
        redis.Redis(host="127.0.0.1", port=port).ping()
    command_lines = [p.read_bytes() for p in Path("/proc").glob("[0-9]*/cmdline") if p.exists()]
    assert not any(password.encode() in line for line in command_lines)


def test_gradios_copies_of_uploads_are_deleted_after_their_age(studio):
    url, _, data = studio
    with httpx.Client(base_url=url, timeout=10) as client:
        assert client.post("/login", data={"username": "ada", "password": "secret-pass"}).status_code == 200
        response = client.post("/gradio_api/upload", files={"files": ("rows.jsonl", b'{"text": "hi"}\n')})
    assert response.status_code == 200, response.text
    [uploaded] = [Path(p) for p in response.json()]
    assert uploaded.exists() and (data.parent / "gradio-cache") in uploaded.parents
    wait_for(lambda: not uploaded.exists(), 30, "the upload cache to drop a 2 s old upload (MORA_UPLOAD_CACHE_S=2)")
