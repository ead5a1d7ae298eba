"""A bad environment setting is one line naming the variable, on every command, never a traceback."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("variable,value,command,expected", [
    ("MORA_PORT", "abc", ["web"], "MORA_PORT must be a positive whole number, found 'abc'"),
    ("MORA_PORT", "70000", ["web"], "MORA_PORT must be at most 65535, found 70000"),
    ("MORA_AUTH", "nocolon", ["web"], "MORA_AUTH must be user:password"),
    ("MORA_MAX_UPLOAD_MB", "0", ["web"], "MORA_MAX_UPLOAD_MB must be a positive whole number, found '0'"),
    ("MORA_API_KEYS", "short", ["web"], "MORA_API_KEYS: each key must be at least 8 printable ASCII characters"),
    ("MORA_API_MAX_PENDING", "-1", ["web"], "MORA_API_MAX_PENDING must be a positive whole number, found '-1'"),
    ("MORA_WORKER_LOST_AFTER_S", "0", ["web"], "MORA_WORKER_LOST_AFTER_S must be between 1 and 3600 seconds"),
    ("MORA_HEARTBEAT_TTL_S", "fast", ["up"], "MORA_HEARTBEAT_TTL_S must be a number of seconds, found 'fast'"),
])
def test_a_bad_setting_is_one_line(tmp_path, variable, value, command, expected):
    env = {**os.environ, "MORA_DATA_DIR": str(tmp_path / "data"), "HF_HUB_OFFLINE": "1", variable: value,
           "PYTHONPATH": str(ROOT)}
    env.pop("REDIS_URL", None)
    result = subprocess.run([sys.executable, "-m", "app.cli", *command], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr and expected in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith(f"mora-studio {command[0]}: ")
