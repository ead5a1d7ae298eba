"""The views reach the store only through the service layer (app/service.py), and the web entry and the UI
import no torch."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
VIEWS = ("ui.py", "chat_view.py", "train_view.py", "runs_view.py", "runs_dashboard.py", "system_view.py",
         "export_view.py", "eval_view.py")


def test_no_view_touches_the_store_directly():
    for name in VIEWS:
        text = (ROOT / "app" / name).read_text()
        assert not re.search(r"service\.store\b", text), f"app/{name} reads service.store; add a service method"


def test_the_web_entry_and_the_ui_import_no_torch():
    code = "import sys, app.web, app.ui; print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120,
                            env={"HF_HUB_OFFLINE": "1", "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
