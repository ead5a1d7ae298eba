"""The Runs tab's tables and CSV export, from records built here or read back from a real store."""
from dataclasses import replace
from datetime import datetime, timedelta, timezone

import pytest

from app.runs_view import (
    ADAPTER_COLUMNS,
    RUN_COLUMNS,
    adapter_metrics_rows,
    config_diff,
    format_duration,
    metrics_csv,
    primary_artifact,
    run_labels,
    runs_table_rows,
    write_metrics_csv,
)
from storage.records import ArtifactRecord, RunRecord
from storage.repo import Store
from workers.formatting import format_bytes, format_parameters

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=timezone.utc)
CONFIG = {"adapter": "mora", "r": 8, "variant": "rope", "learning_rate": 3e-4, "batch_size": 4, "seed": 0,
          "use_rslora": False, "data": "/data/datasets/alpaca.jsonl", "target_modules": None}


def make_run(**changes) -> RunRecord:
    run = RunRecord(
        id="abc123", name="mora r=8 rope", tags=[], group_name=None, config=dict(CONFIG), model="", adapter="mora",
        r=8, variant="rope", dataset_id=None, status="succeeded", status_message="", error=None, worker=None,
        created_at=datetime(2025, 3, 1, 11, 30, tzinfo=timezone.utc), started_at=NOW - timedelta(minutes=20),
        finished_at=NOW, parent_id=None, run_dir=None, output_dir=None, output_kind=None, step=300, max_steps=300,
        last_loss=0.123456, last_eval_loss=None, tokens_per_second=1234.44, tokens_seen=None, peak_memory_mb=None,
        cancel_requested=False)
    return replace(run, **changes)


def artifact(**changes) -> ArtifactRecord:
    record = ArtifactRecord(run_id="abc123", kind="adapter", path="/runs/abc123/adapter", size_bytes=9_751_756,
                            trainable_parameters=2_436_096, r_hat=[28, 38],
                            effective_rank={"mean": 27.34, "min": 20.0, "max": 31.0, "layers": 14}, layers=[],
                            created_at=NOW)
    return replace(record, **changes)


# -- runs table ---------------------------------------------------------------------------------------------------


def test_a_running_run_shows_progress_and_the_eta_at_its_step_rate():
    # 100 steps in 100 s: the 200 left take 200 s
    run = make_run(status="running", step=100, max_steps=300, started_at=NOW - timedelta(seconds=100),
                   finished_at=None, last_loss=None, tokens_per_second=None)
    [row] = runs_table_rows([run], now=NOW)
    assert len(row) == len(RUN_COLUMNS)
    cells = dict(zip(RUN_COLUMNS, row))
    assert cells["progress"] == "100/300 (33%)"
    assert cells["ETA"] == "3m 20s"
    assert cells["final loss"] == "" and cells["tokens/s"] == ""


def test_eta_scales_with_elapsed_time_and_remaining_steps():
    # 120 steps in 10 min: 180 left at 12 steps/min take 15 min
    run = make_run(status="running", step=120, max_steps=300, started_at=NOW - timedelta(minutes=10))
    cells = dict(zip(RUN_COLUMNS, runs_table_rows([run], now=NOW)[0]))
    assert cells["progress"] == "120/300 (40%)"
    assert cells["ETA"] == "15m 00s"


@pytest.mark.parametrize("changes", [
    {"status": "succeeded"},  # finished
    {"status": "running", "max_steps": None},  # total unknown yet
    {"status": "running", "step": 0},  # no rate yet
    {"status": "running", "started_at": None},
    {"status": "queued", "step": 0},
])
def test_no_eta_when_it_cannot_be_known(changes):
    cells = dict(zip(RUN_COLUMNS, runs_table_rows([make_run(**changes)], now=NOW)[0]))
    assert cells["ETA"] == ""


def test_a_finished_run_row_cell_by_cell():
    [row] = runs_table_rows([make_run()], now=NOW)
    assert row == ["abc123", "mora r=8 rope", "mora rope", 8, "succeeded", "300/300 (100%)", "", 0.1235, 1234.4, "",
                   "2025-03-01 11:30"]  # disk: no sizes given


def test_adapter_labels_and_unknown_totals():
    runs = [make_run(variant="sharing", r=256), make_run(adapter="lora", variant=None),
            make_run(adapter="full", variant=None, max_steps=None, step=7)]
    rows = runs_table_rows(runs, now=NOW)
    assert [row[RUN_COLUMNS.index("adapter")] for row in rows] == ["mora sharing", "lora", "full"]
    assert rows[2][RUN_COLUMNS.index("progress")] == "7"


def test_format_duration():
    assert [format_duration(s) for s in (0, 45, 200, 3600, 7500)] == ["0s", "45s", "3m 20s", "1h 00m", "2h 05m"]


# -- config diff --------------------------------------------------------------------------------------------------


def test_config_diff_shows_only_the_settings_that_differ_sorted():
    mora = make_run(id="m1")
    lora = make_run(id="l1", config={**CONFIG, "adapter": "lora", "variant": None, "learning_rate": 2e-4,
                                     "lora_alpha": 16.0})
    assert config_diff([mora, lora]) == [
        ["adapter", "mora", "lora"],
        ["learning_rate", "0.0003", "0.0002"],
        ["lora_alpha", "—", "16"],
        ["variant", "rope", "None"],
    ]


def test_config_diff_of_one_run_lists_every_setting_as_short_text():
    long_path = "/data/" + "nested/" * 20 + "alpaca.jsonl"
    rows = config_diff([make_run(config={**CONFIG, "data": long_path, "target_modules": ["q_proj", "v_proj"]})])
    assert [row[0] for row in rows] == sorted(CONFIG)
    values = dict(rows)
    assert values["use_rslora"] == "false" and values["r"] == "8" and values["target_modules"] == "q_proj, v_proj"
    assert values["data"].startswith("…") and values["data"].endswith("alpaca.jsonl") and len(values["data"]) <= 48


def test_config_diff_of_identical_runs_is_empty():
    assert config_diff([make_run(id="a"), make_run(id="b")]) == []


# -- adapter metrics ----------------------------------------------------------------------------------------------


def test_adapter_metrics_in_human_units():
    mora = make_run(id="m1", peak_memory_mb=1228.8)
    lora = make_run(id="l1", name="lora r=8", adapter="lora", variant=None, tokens_per_second=None)
    rows = adapter_metrics_rows([mora, lora], {"m1": artifact(), "l1": None})
    assert len(rows[0]) == len(ADAPTER_COLUMNS)
    assert rows[0] == ["mora r=8 rope", "mora rope", "28–38", "2.44M", "9.3 MiB", "27.3", "1,234", "1.2 GiB"]
    assert rows[1] == ["lora r=8", "lora", "", "", "", "", "", ""]


def test_r_hat_of_one_size_and_of_lora():
    runs = [make_run(id="a"), make_run(id="b", adapter="lora", variant=None)]
    rows = adapter_metrics_rows(runs, {"a": artifact(r_hat=[32]), "b": artifact(r_hat=[], effective_rank=None)})
    assert rows[0][2] == "32"
    assert rows[1][2] == "" and rows[1][5] == ""


def test_primary_artifact_prefers_the_adapter():
    adapter, model = artifact(), artifact(kind="model")
    assert primary_artifact([model, adapter]) is adapter
    assert primary_artifact([model]) is model
    assert primary_artifact([]) is None


def test_run_labels_tell_same_named_runs_apart():
    labels = run_labels([make_run(id="a1"), make_run(id="b2"), make_run(id="c3", name="lora")])
    assert labels == {"a1": "mora r=8 rope (a1)", "b2": "mora r=8 rope (b2)", "c3": "lora"}


@pytest.mark.parametrize("count, text", [(999, "999"), (1_000, "1K"), (12_345, "12.3K"), (2_436_096, "2.44M"),
                                         (134_515_008, "135M"), (999_999, "1M"), (7_240_000_000, "7.24B")])
def test_format_parameters(count, text):
    assert format_parameters(count) == text


@pytest.mark.parametrize("size, text", [(512, "512 B"), (2048, "2.0 KiB"), (9_751_756, "9.3 MiB"),
                                        (300 * 2**20, "300 MiB"), (2**20 - 1, "1.0 MiB"),
                                        (1_288_490_189, "1.2 GiB")])
def test_format_bytes(size, text):
    assert format_bytes(size) == text


# -- CSV export ---------------------------------------------------------------------------------------------------


@pytest.fixture
def stored(tmp_path):
    """A run with train points at steps 1-3 (step 2 diverged) and one eval point at step 2, read back from a store."""
    with Store(f"sqlite:///{tmp_path}/s.db") as store:
        run = store.create_run(CONFIG, name="Mora r=8 / rope", model="", adapter="mora", r=8, variant="rope")
        store.add_metric_points(run.id, [
            {"name": "loss", "step": 1, "value": 2.5, "epoch": 0.5, "tokens": 512, "time": 100.0},
            {"name": "loss", "step": 2, "value": float("nan"), "epoch": 1.0, "tokens": 1024, "time": 101.5},
            {"name": "loss", "step": 3, "value": 1.25, "epoch": 1.5, "tokens": 1536, "time": 103.0},
            {"name": "learning_rate", "step": 1, "value": 3e-4, "epoch": 0.5, "tokens": 512, "time": 100.0},
            {"name": "eval_loss", "step": 2, "value": 1.75, "epoch": 1.0, "time": 102.0},
        ])
        yield store.get_run(run.id), store.metric_series([run.id])


def test_metrics_csv_row_by_row(stored):
    run, series = stored
    assert metrics_csv(run, series).splitlines() == [
        "step,epoch,tokens,time,loss,eval_loss,learning_rate",
        "1,0.5,512,100.0,2.5,,0.0003",
        "2,1.0,1024,101.5,,1.75,",
        "3,1.5,1536,103.0,1.25,,",
    ]


def test_metrics_csv_of_a_run_without_points_is_the_header():
    run = make_run()
    assert metrics_csv(run, {run.id: {"loss": []}}) == "step,epoch,tokens,time\n"


def test_write_metrics_csv_names_the_file_after_the_run(stored, tmp_path):
    run, series = stored
    path = write_metrics_csv(run, series, tmp_path / "exports")
    assert path == tmp_path / "exports" / f"mora-r-8-rope-{run.id}-metrics.csv"
    assert path.read_text() == metrics_csv(run, series)


@pytest.mark.parametrize("name", ["../../etc/passwd", "..", "/abs/path", "a\\..\\b", "名前", "   "])
def test_the_csv_file_cannot_escape_its_folder(tmp_path, name):
    run = make_run(name=name, id="../x")
    path = write_metrics_csv(run, {}, tmp_path)
    assert path.parent == tmp_path and path.resolve().parent == tmp_path.resolve()
    assert "/" not in path.name and "\\" not in path.name and ".." not in path.name
    assert path.name.endswith("-metrics.csv") and path.exists()
