"""The memorisation benchmark: presets and plans, submission as one group, the results table on synthetic metric
points (means, spreads, the best learning rate), the four result files, and `mora-studio bench memorize --local` end
to end on the tiny Llama."""
import dataclasses
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from app import bench
from app.cli import main
from storage.repo import Store
from workers.memorize import read_pairs
from workers.train_config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]
SHARED = ("data", "seed", "batch_size", "max_steps", "max_length", "memorize_pairs_file", "memorize_eval_steps",
          "pack_text", "model", "lr_scheduler", "warmup_ratio", "grad_accum")


def test_importing_the_bench_loads_no_torch():
    code = "import sys, app.bench; bad = {'torch', 'transformers'} & set(sys.modules); assert not bad, bad"
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True)


def test_presets_scale_budgets_and_rates_to_the_model_width():
    cpu = bench.PRESETS["cpu"]
    assert set(bench.PRESETS) == {"cpu", "gpu"}  # the tests' tiny preset is hidden
    assert cpu.budgets == (1, 32) and cpu.checkpoints == (15, 25, 35, 45)
    assert bench.PRESETS["gpu"].checkpoints == (60, 100, 140, 180)
    methods = {m.key: m for m in cpu.methods()}
    assert list(methods) == ["full", "lora r=1", "mora r=1 rope", "lora r=32", "mora r=32 sharing"]
    assert methods["lora r=1"].lora_alpha == 2 and methods["lora r=32"].lora_alpha == 16  # the paper's alpha/r
    # the paper's rates times the width ratio 4096/576, then the sweep; sharing's stays 7.5x below rope's
    assert cpu.learning_rates(methods["mora r=1 rope"].base_learning_rate) == (1.6e-3, 6.4e-3)
    assert cpu.learning_rates(methods["mora r=32 sharing"].base_learning_rate) == (2.1e-4, 8.5e-4)
    assert [m.variant for m in cpu.methods(ablation=True)] == list(bench.ABLATION)
    assert {m.r for m in cpu.methods(ablation=True)} == {1}
    with pytest.raises(ValueError, match="cpu, gpu"):
        bench.get_preset("huge")


@pytest.mark.parametrize("ablation", [False, True])
def test_the_plan_covers_every_method_budget_rate_and_seed_on_equal_terms(tmp_path, ablation):
    preset = bench.PRESETS["cpu"]
    plans = {seed: bench.plan_runs(preset, seed, ablation=ablation, data_dir=tmp_path) for seed in (0, 1, 2)}
    expected = {(m.key, rate) for m in preset.methods(ablation) for rate in preset.learning_rates(m.base_learning_rate)}
    assert len(expected) == (8 if ablation else 10)
    for seed, seed_plans in plans.items():
        configs = [TrainConfig.from_dict(plan) for plan in seed_plans]
        for config in configs:
            config.validate()
        assert {(bench.method_key(c.adapter, c.r, c.variant), c.learning_rate) for c in configs} == expected
        assert len(configs) == len(expected) and len({c.name for c in configs}) == len(configs)
        for name in SHARED:
            assert len({json.dumps(getattr(c, name)) for c in configs}) == 1, name
        assert configs[0].seed == seed and configs[0].pack_text is False
        assert configs[0].memorize_eval_steps == [15, 25, 35, 45] and configs[0].max_steps == 45
        assert configs[0].data == str(bench.pairs_file(preset, seed, tmp_path)) == configs[0].memorize_pairs_file
    assert plans[0][0]["data"] != plans[1][0]["data"]
    path = bench.write_pairs(preset, 0, tmp_path)
    assert len(read_pairs(path)) == preset.pairs


class RecordingService:
    def __init__(self):
        self.calls = []

    def launch(self, config, name="", tags=(), group_name=None):
        self.calls.append((config.to_dict(), name, tuple(tags), group_name))


def test_submit_queues_every_run_of_every_seed_as_one_group(tmp_path):
    service = RecordingService()
    group = bench.submit_benchmark(service, "cpu", seeds=2, data_dir=tmp_path)
    assert group.startswith("memorize-cpu-")
    assert len(service.calls) == 20 and {call[3] for call in service.calls} == {group}
    assert [call[0]["seed"] for call in service.calls] == [0] * 10 + [1] * 10  # seed by seed
    assert all(call[1] == call[0]["name"] and call[2] == bench.TAGS for call in service.calls)
    for seed in (0, 1):
        assert bench.pairs_file("cpu", seed, tmp_path).exists()
    ablation = bench.submit_benchmark(RecordingService(), "cpu", seeds=[5], ablation=True, data_dir=tmp_path)
    assert ablation.startswith("memorize-ablation-cpu-")


# Final character accuracy by (method, learning-rate index) and seed; "early" is the value at the other checkpoints.
SYNTHETIC = {
    ("full", 0): {"final": (0.9, 1.0), "early": 0.5},
    ("full", 1): {"final": (0.5, 0.7), "early": 0.5},
    ("lora r=1", 0): {"final": (0.1, 0.1), "early": 0.1},
    ("lora r=1", 1): {"final": (0.3, 0.5), "early": 0.1},
    ("mora r=1 rope", 0): {"final": (0.6, 0.6), "early": 0.1},  # ties the other rate at the end, slower before
    ("mora r=1 rope", 1): {"final": (0.6, 0.6), "early": 0.5},
    ("lora r=4", 0): {"final": (0.2, None), "early": 0.1},  # seed 1 failed before its first checkpoint
    ("lora r=4", 1): {"final": (0.1, 0.1), "early": 0.1},
    ("mora r=4 sharing", 0): {"final": (0.8, 0.9), "early": 0.2},
    ("mora r=4 sharing", 1): {"final": (0.0, 0.0), "early": 0.0},
}


def _synthetic_group(store, tmp_path):
    preset = dataclasses.replace(bench.get_preset("tiny"), lr_factors=(0.5, 2.0))
    group = "synthetic"
    for seed in (0, 1):
        for plan in bench.plan_runs(preset, seed, data_dir=tmp_path):
            config = TrainConfig.from_dict(plan)
            key = bench.method_key(config.adapter, config.r, config.variant)
            rates = preset.learning_rates(next(m for m in preset.methods() if m.key == key).base_learning_rate)
            values = SYNTHETIC[(key, rates.index(config.learning_rate))]
            run = store.create_run(plan, name=config.name, model="tiny", adapter=config.adapter, r=config.r,
                                   variant=config.variant, group_name=group)
            final = values["final"][seed]
            if final is None:
                store.set_status(run.id, "failed", message="boom")
                continue
            points = [{"name": "loss", "step": s, "value": 5.0 - s * final} for s in range(1, preset.steps + 1)]
            for step in preset.checkpoints:
                value = final if step == preset.steps else values["early"]
                points += [{"name": "char_accuracy", "step": step, "value": value},
                           {"name": "exact_match", "step": step, "value": value / 2}]
            store.add_metric_points(run.id, points)
            store.set_status(run.id, "running")
            store.set_status(run.id, "succeeded")
    return group, preset


@pytest.fixture
def store(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'studio.db'}")
    yield store
    store.close()


def test_the_table_takes_each_methods_best_rate_with_mean_and_spread_over_seeds(store, tmp_path):
    group, preset = _synthetic_group(store, tmp_path)
    rows = bench.results_table(store, group)
    assert [row["label"] for row in rows] == ["full fine-tuning", "LoRA r=1", "MoRA r=1 (rope)", "LoRA r=4",
                                              "MoRA r=4 (sharing)"]
    by_key = {row["method"]: row for row in rows}
    rates = {row["method"]: [e["learning_rate"] for e in row["sweep"]] for row in rows}
    chosen = {key: rates[key].index(row["learning_rate"]) for key, row in by_key.items()}
    assert chosen == {"full": 0, "lora r=1": 1, "mora r=1 rope": 1, "lora r=4": 0, "mora r=4 sharing": 0}
    final, first = preset.checkpoints[-1], preset.checkpoints[0]
    full = by_key["full"]["char_accuracy"]
    assert full[final]["mean"] == pytest.approx(95.0)
    assert full[final]["spread"] == pytest.approx(statistics.stdev([90.0, 100.0]))
    assert full[first] == {"mean": pytest.approx(50.0), "spread": 0.0, "n": 2}
    assert by_key["lora r=1"]["char_accuracy"][final]["mean"] == pytest.approx(40.0)
    assert by_key["lora r=1"]["exact_match"][final]["mean"] == pytest.approx(20.0)
    assert by_key["lora r=4"]["char_accuracy"][final] == {"mean": pytest.approx(20.0), "spread": 0.0, "n": 1}
    assert by_key["lora r=4"]["sweep"][0]["statuses"].count("failed") == 1
    assert by_key["mora r=4 sharing"]["seeds"] == [0, 1]
    assert by_key["mora r=4 sharing"]["sweep"][1]["char_accuracy"][final]["mean"] == 0.0
    markdown = bench.markdown_table(rows, group)
    assert f"| full fine-tuning | {by_key['full']['learning_rate']:g} | 50.0 ± 0.0 |" in markdown
    assert "95.0 ± 7.1 |" in markdown and "| MoRA r=8 | 10.1 | 15.7 | 87.4 | 100 |" in markdown
    assert "The best rate is the largest swept for LoRA r=1, MoRA r=1 (rope): a larger one" in markdown
    assert by_key["lora r=4"]["seeds"] == [0]  # its seed-1 run failed: one seed of evidence, and the table says so
    assert f"| LoRA r=4 | {by_key['lora r=4']['learning_rate']:g} | 10.0 (n=1) |" in markdown
    assert "In progress" not in markdown
    with pytest.raises(ValueError, match="no runs"):
        bench.results_table(store, "no such group")


def test_a_group_still_running_is_shown_as_such(store, tmp_path):
    group, preset = _synthetic_group(store, tmp_path)
    plan = bench.plan_runs(preset, 2, data_dir=tmp_path)[0]
    store.create_run(plan, name=plan["name"], model="tiny", adapter="full", r=8, variant=None, group_name=group)
    rows = bench.results_table(store, group)
    markdown = bench.markdown_table(rows, group)
    assert "**In progress:** 20 of 21 runs finished" in markdown
    assert "over 2 seed(s) (0, 1)" in markdown  # the queued seed-2 run has measured nothing yet


def test_write_results_writes_the_table_and_the_curves(store, tmp_path):
    group, preset = _synthetic_group(store, tmp_path)
    files = bench.write_results(store, group, tmp_path / "out")
    assert files.problems == [], files.problems
    summary = json.loads(files.json.read_text())
    assert summary["group"] == group and len(summary["rows"]) == 5 and len(summary["runs"]) == 20
    assert summary["steps"] == list(preset.checkpoints)
    assert files.markdown.read_text().startswith("### Memorisation — synthetic")
    assert "plotly" in files.html.read_text()[:100_000].lower()
    assert files.png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    figure = bench.results_figure(store, bench.results_table(store, group), group)
    assert len(figure.data) == 10  # a loss curve and an accuracy curve per method


def test_group_progress_and_waiting(store, tmp_path):
    group, _ = _synthetic_group(store, tmp_path)
    progress = bench.wait_for_group(store, group, report=lambda line: None, poll_s=0.01)
    assert progress["finished"] and progress["by_status"] == {"succeeded": 19, "failed": 1}
    store.create_run({"adapter": "lora"}, name="late", model="", adapter="lora", r=1, group_name=group)
    with pytest.raises(TimeoutError, match="20 of 21"):
        bench.wait_for_group(store, group, report=lambda line: None, poll_s=0.01, timeout_s=0.05)


def test_bench_memorize_local_end_to_end(tmp_path, tiny_model_dir, monkeypatch, capsys):
    monkeypatch.setenv("MORA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.setenv("MORA_MODELS_DIR", str(Path(tiny_model_dir).parent))
    monkeypatch.delenv("MORA_DB_URL", raising=False)
    out = tmp_path / "results"
    assert main(["bench", "memorize", "--preset", "tiny", "--seeds", "1", "--local", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| LoRA r=4 |" in printed and f"wrote {out / 'results.json'}" in printed
    summary = json.loads((out / "results.json").read_text())
    assert [row["method"] for row in summary["rows"]] == ["full", "lora r=1", "mora r=1 rope", "lora r=4",
                                                         "mora r=4 sharing"]
    for row in summary["rows"]:
        assert list(row["char_accuracy"]) == ["3", "5", "7", "9"]
        assert all(0 <= cell["mean"] <= 100 and cell["n"] == 1 for cell in row["char_accuracy"].values())
    assert {path.name for path in out.iterdir()} == {"results.json", "results.md", "curves.html", "curves.png"}
    store = Store()  # the studio's own store: the runs show in the Runs tab like any run
    runs = store.list_runs(group_name=summary["group"])
    assert len(runs) == 5 and {run.status for run in runs} == {"succeeded"}
    assert all(Path(run.run_dir).parent == tmp_path / "data" / "runs" for run in runs)
    assert store.metric_count(runs[0].id, "char_accuracy") == 4 and store.metric_count(runs[0].id, "loss") == 9
    assert main(["bench", "results", summary["group"], "--out", str(tmp_path / "again")]) == 0
    assert (tmp_path / "again" / "results.md").read_text() == (out / "results.md").read_text()
    store.close()


def test_bench_memorize_refuses_an_unknown_preset_and_an_unreachable_studio(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MORA_DATA_DIR", str(tmp_path / "data"))
    monkeypatch.delenv("MORA_DB_URL", raising=False)
    assert main(["bench", "memorize", "--preset", "huge"]) == 2
    assert "unknown preset 'huge'" in capsys.readouterr().err
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")  # nothing listens there
    assert main(["bench", "memorize", "--preset", "tiny", "--seeds", "1"]) == 2
    assert "--local" in capsys.readouterr().err


def test_the_sweep_can_be_extended_past_the_presets_rates(tmp_path):
    extended = bench.with_lr_factors("cpu", [4, 8])
    assert extended.lr_factors == (4.0, 8.0) and extended.steps == bench.PRESETS["cpu"].steps
    default_rates = {p["name"].split(" · ")[0]: p["learning_rate"] for p in bench.plan_runs("cpu", 0, data_dir=tmp_path)}
    plans = bench.plan_runs(extended, 0, data_dir=tmp_path)
    assert len(plans) == 10
    for label, rate in default_rates.items():  # the default's top rate is 2x; 4x and 8x go on from it
        rates = sorted(p["learning_rate"] for p in plans if p["name"].startswith(label + " · "))
        assert rates == [pytest.approx(2 * rate, rel=0.05), pytest.approx(4 * rate, rel=0.05)]
    for bad in ([], [0], [-1.0], [float("nan")]):
        with pytest.raises(ValueError, match="learning-rate factors must be positive"):
            bench.with_lr_factors("cpu", bad)


def test_bench_memorize_refuses_a_bad_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MORA_DATA_DIR", str(tmp_path / "data"))
    assert main(["bench", "memorize", "--lr-factors", "0", "--local"]) == 2
    assert "learning-rate factors must be positive numbers, got 0.0" in capsys.readouterr().err


@pytest.mark.parametrize("text, seeds", [("3", [0, 1, 2]), ("1", [0]), ("1,2", [1, 2]), ("4,", [4])])
def test_seeds_are_a_count_or_a_list(text, seeds):
    assert bench.parse_seeds(text) == seeds


@pytest.mark.parametrize("text", ["0", "-1", "a", "1,1", "2,-3", ","])
def test_bad_seeds_are_refused_with_the_reason(text, tmp_path, monkeypatch, capsys):
    with pytest.raises(ValueError, match="seeds"):
        bench.parse_seeds(text)
    monkeypatch.setenv("MORA_DATA_DIR", str(tmp_path / "data"))
    assert main(["bench", "memorize", "--seeds", text, "--local"]) == 2
    assert "mora-studio bench: seeds:" in capsys.readouterr().err


def test_groups_extending_a_sweep_read_as_one_table(store, tmp_path):
    """A sweep extended later (a larger rate on one seed, in its own group) joins the table, but a rate tried on one
    seed does not displace one averaged over every seed, however well it scored."""
    group, preset = _synthetic_group(store, tmp_path)
    extension = "synthetic-extension"
    plan = next(p for p in bench.plan_runs(bench.with_lr_factors(preset, [8.0]), 0, data_dir=tmp_path)
                if p["adapter"] == "lora" and p["r"] == 1)
    run = store.create_run(plan, name=plan["name"], model="tiny", adapter="lora", r=1, variant=None,
                           group_name=extension)
    store.add_metric_points(run.id, [{"name": metric, "step": step, "value": 0.99}
                                     for step in preset.checkpoints for metric in bench.METRICS])
    store.set_status(run.id, "running")
    store.set_status(run.id, "succeeded")
    alone = {row["method"]: row for row in bench.results_table(store, group)}
    rows = bench.results_table(store, [group, extension])
    merged = {row["method"]: row for row in rows}
    assert [e["learning_rate"] for e in merged["lora r=1"]["sweep"]][-1] == plan["learning_rate"]
    assert len(merged["lora r=1"]["sweep"]) == len(alone["lora r=1"]["sweep"]) + 1
    assert merged["lora r=1"]["learning_rate"] == alone["lora r=1"]["learning_rate"]
    assert f"— {group} + {extension}" in bench.markdown_table(rows, [group, extension])
    files = bench.write_results(store, [group, extension], tmp_path / "merged")
    summary = json.loads(files.json.read_text())
    assert summary["groups"] == [group, extension] and run.id in summary["runs"]
    with pytest.raises(ValueError, match="no runs in group 'nope'"):
        bench.results_table(store, [group, "nope"])


@pytest.mark.parametrize("seeds,problem", [(40, "run 1 to 10 seeds"), (10**19, "run 1 to 10 seeds"),
                                           (0, "run 1 to 10 seeds"), ([1, 2_000_000], "each from 0 to 1,000,000")])
def test_seed_counts_are_bounded_before_anything_is_listed(seeds, problem):
    with pytest.raises(ValueError, match=problem):
        bench.plan._seed_list(seeds)
    text = ",".join(map(str, seeds)) + ("" if len(seeds) > 1 else ",") if isinstance(seeds, list) else str(seeds)
    with pytest.raises(ValueError, match=problem):
        bench.parse_seeds(text)
