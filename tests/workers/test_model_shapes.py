"""The Train tab's parameter budget from config.json alone (no torch, no worker) equals the worker's, which builds
the model on the meta device and attaches real adapters."""
import subprocess
import sys
from pathlib import Path

import pytest

from workers import model_shapes
from workers.utility import parameter_budget

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("r,variant", [(1, "rope"), (8, "rope"), (8, "sharing"), (64, "sharing"), (3, "truncation"),
                                       (5, "type2")])
def test_the_budget_from_config_json_equals_the_workers(tiny_model_dir, r, variant):
    shapes = model_shapes.read_shapes(Path(tiny_model_dir))
    here = model_shapes.parameter_budget(shapes, r, variant)
    worker = parameter_budget({"model": str(tiny_model_dir), "r": r, "variant": variant})
    assert here["layers"] == worker["layers"]
    for key in ("r", "variant", "base_parameters", "mora_parameters", "lora_parameters"):
        assert here[key] == worker[key], key


def test_the_budget_needs_no_torch(tiny_model_dir):
    code = ("import sys; from pathlib import Path; from workers import model_shapes as m; "
            f"b = m.parameter_budget(m.read_shapes(Path({str(tiny_model_dir)!r})), 8, 'rope'); "
            "print(b['mora_parameters'] > 0, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["True", "False"]


def test_an_unknown_architecture_is_left_to_the_worker(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "n_embd": 48}')
    assert model_shapes.read_shapes(tmp_path) is None
