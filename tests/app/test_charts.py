"""The Runs tab's figures, built from records as the store returns them, checked trace by trace."""
import math
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from app.charts import effective_rank_figure, loss_figure, short_layer_name, smooth
from storage.records import ArtifactRecord, MetricPointRecord, SampledPointRecord

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2025, 1, 1, tzinfo=timezone.utc)


def points(run_id, name, values, tokens_per_step=100, epoch_per_step=0.25, with_tokens=True):
    """Points at steps 1, 2, ... with the x values the worker would report."""
    return [MetricPointRecord(run_id=run_id, name=name, step=step, value=value, epoch=step * epoch_per_step,
                              tokens=step * tokens_per_step if with_tokens else None, time=1000.0 + step)
            for step, value in enumerate(values, start=1)]


def eval_point(run_id, step, value, epoch=None):
    """As the collector stores eval loss: no tokens seen."""
    return MetricPointRecord(run_id=run_id, name="eval_loss", step=step, value=value, epoch=epoch, tokens=None,
                             time=2000.0 + step)


def artifact(run_id, layers):
    return ArtifactRecord(run_id=run_id, kind="adapter", path=f"/runs/{run_id}/adapter", size_bytes=1000,
                          trainable_parameters=500, r_hat=[32], effective_rank=None, layers=layers, created_at=T0)


LABELS = {"a": "mora r=8", "b": "lora r=8"}


def two_runs():
    return {
        "a": {"loss": points("a", "loss", [2.0, 1.5, 1.0, 0.8]), "eval_loss": [eval_point("a", 2, 1.6),
                                                                               eval_point("a", 4, 1.1)]},
        "b": {"loss": points("b", "loss", [2.2, 1.9, 1.7], tokens_per_step=50), "eval_loss": []},
    }


def by_name(figure):
    return {trace.name: trace for trace in figure.data}


# -- smoothing ----------------------------------------------------------------------------------------------------


def test_smooth_is_the_debiased_ema():
    # last = 0.5·last + 0.5·v from 0: 0.5, 1.25, 2.625; divided by 1 − 0.5^n: 0.5, 0.75, 0.875
    assert smooth([1.0, 2.0, 4.0], 0.5) == pytest.approx([1.0, 1.25 / 0.75, 3.0])
    # weight 0.9: last = 0.1, then 0.09 + 0.3; divided by 1 − 0.9^n = 0.1, 0.19
    assert smooth([1.0, 3.0], 0.9) == pytest.approx([1.0, (0.09 + 0.3) / 0.19])


def test_smooth_keeps_gaps_without_averaging_them():
    # the gap is skipped: the third value is the second one averaged
    assert smooth([1.0, None, 3.0], 0.5) == pytest.approx([1.0, None, (0.25 + 1.5) / 0.75])
    assert smooth([float("nan"), 2.0], 0.5) == [None, 2.0]


def test_smooth_with_weight_zero_is_identity_and_weight_one_is_refused():
    assert smooth([3.0, 1.0, 2.0], 0.0) == [3.0, 1.0, 2.0]
    with pytest.raises(ValueError, match="smoothing"):
        smooth([1.0], 1.0)


# -- loss figure --------------------------------------------------------------------------------------------------


def sampled(run_id, buckets):
    """Sampled buckets (step, last value, low, high, count) as `Store.sampled_series` returns them."""
    return [SampledPointRecord(run_id=run_id, name="loss", step=step, value=value, epoch=step / 10, tokens=step * 100,
                               time=1000.0 + step, low=low, high=high, count=count)
            for step, value, low, high, count in buckets]


def test_sampled_buckets_draw_their_min_max_band_behind_the_line():
    series = {"a": {"loss": sampled("a", [(99, 1.0, 0.9, 1.2, 100), (199, 0.8, 0.7, 50.0, 100)])}}
    traces = by_name(loss_figure(series, LABELS))
    assert list(traces) == ["mora r=8 train (max)", "mora r=8 train (min)", "mora r=8 train"]
    high, low, line = traces.values()
    assert list(high.y) == [1.2, 50.0] and list(low.y) == [0.9, 0.7]  # the spike to 50 stays visible
    assert low.fill == "tonexty" and low.fillcolor == "rgba(99, 110, 250, 0.25)"
    assert list(line.x) == [99, 199] and list(line.y) == [1.0, 0.8]
    assert not high.showlegend and not low.showlegend and high.legendgroup == line.legendgroup == "a"
    tokens = by_name(loss_figure(series, LABELS, x_axis="tokens"))
    assert list(tokens["mora r=8 train (min)"].x) == [9900, 19900]


def test_whole_series_get_no_band():
    whole = {"a": {"loss": sampled("a", [(1, 2.0, 2.0, 2.0, 1), (2, 1.0, 1.0, 1.0, 1)])}}
    assert [trace.name for trace in loss_figure(whole, LABELS).data] == ["mora r=8 train"]
    assert [trace.name for trace in loss_figure(two_runs(), LABELS, show_eval=False).data] == [
        "mora r=8 train", "lora r=8 train"]


def test_one_train_and_one_eval_trace_per_run_in_the_run_colour():
    figure = loss_figure(two_runs(), LABELS)
    traces = by_name(figure)
    assert [trace.name for trace in figure.data] == ["mora r=8 train", "mora r=8 eval", "lora r=8 train"]
    assert traces["mora r=8 train"].line.dash is None
    assert traces["mora r=8 eval"].line.dash == "dash"
    assert "markers" in traces["mora r=8 eval"].mode
    assert traces["mora r=8 train"].line.color == traces["mora r=8 eval"].line.color
    assert traces["mora r=8 train"].line.color != traces["lora r=8 train"].line.color
    assert traces["mora r=8 eval"].legendgroup == "a"
    assert list(traces["mora r=8 train"].x) == [1, 2, 3, 4]
    assert list(traces["mora r=8 eval"].y) == [1.6, 1.1]
    assert figure.layout.xaxis.title.text == "step"


def test_x_by_tokens_seen_eval_borrows_tokens_from_the_train_step_and_pointless_points_are_left_out():
    series = two_runs()
    series["b"]["loss"] = [*points("b", "loss", [2.2, 1.9], tokens_per_step=50),
                           MetricPointRecord("b", "loss", 3, 1.7, None, None, None)]
    traces = by_name(loss_figure(series, LABELS, x_axis="tokens"))
    assert list(traces["mora r=8 train"].x) == [100, 200, 300, 400]
    assert list(traces["mora r=8 eval"].x) == [200, 400]
    assert list(traces["lora r=8 train"].x) == [50, 100]
    assert list(traces["lora r=8 train"].y) == [2.2, 1.9]


def test_x_by_epoch_uses_the_eval_points_own_epoch_when_it_has_one():
    series = two_runs()
    series["a"]["eval_loss"] = [eval_point("a", 2, 1.6, epoch=0.5), eval_point("a", 9, 1.0)]
    figure = loss_figure(series, LABELS, x_axis="epoch")
    traces = by_name(figure)
    assert list(traces["mora r=8 train"].x) == [0.25, 0.5, 0.75, 1.0]
    assert list(traces["mora r=8 eval"].x) == [0.5]  # step 9 has no epoch and no train point to borrow from
    assert figure.layout.xaxis.title.text == "epoch"


def test_log_scale_and_hidden_eval():
    figure = loss_figure(two_runs(), LABELS, log_scale=True, show_eval=False)
    assert figure.layout.yaxis.type == "log"
    assert [trace.name for trace in figure.data] == ["mora r=8 train", "lora r=8 train"]
    assert loss_figure(two_runs(), LABELS).layout.yaxis.type == "linear"


def test_smoothing_draws_the_smoothed_curve_over_a_faint_raw_one():
    figure = loss_figure(two_runs(), LABELS, smoothing=0.5, show_eval=False)
    assert [trace.name for trace in figure.data] == ["mora r=8 train (raw)", "mora r=8 train",
                                                     "lora r=8 train (raw)", "lora r=8 train"]
    raw, smoothed = figure.data[0], figure.data[1]
    assert list(raw.y) == [2.0, 1.5, 1.0, 0.8]
    assert raw.opacity < 0.5 and raw.showlegend is False and raw.legendgroup == smoothed.legendgroup == "a"
    assert raw.line.color == smoothed.line.color
    # hand-computed: 2.0; (0.5 + 0.75) / 0.75; (0.625 + 0.5) / 0.875 ... as in smooth()
    assert list(smoothed.y) == pytest.approx([2.0, 1.25 / 0.75, 1.125 / 0.875, 0.9625 / 0.9375])


def test_a_run_with_one_logged_step_shows_a_dot():
    trace = loss_figure({"a": {"loss": points("a", "loss", [2.0])}}, LABELS).data[0]
    assert trace.mode == "markers" and list(trace.y) == [2.0]


def test_a_diverged_step_stays_a_gap():
    series = {"a": {"loss": points("a", "loss", [2.0, None, 1.0])}}
    first, gap, last = loss_figure(series, LABELS).data[0].y  # NaN: plotly leaves it undrawn, as it does None
    assert (first, last) == (2.0, 1.0) and math.isnan(gap)


def test_empty_selection_says_what_to_do():
    figure = loss_figure({}, {})
    assert not figure.data
    assert "select runs to compare" in figure.layout.annotations[0].text.lower()
    waiting = loss_figure({"a": {"loss": [], "eval_loss": []}}, LABELS)
    assert not waiting.data and "no loss" in waiting.layout.annotations[0].text.lower()


def test_uirevision_survives_a_redraw_but_not_a_change_of_axis():
    before = loss_figure(two_runs(), LABELS)
    series = two_runs()
    series["a"]["loss"] = points("a", "loss", [2.0, 1.5, 1.0, 0.8, 0.7])
    after = loss_figure(series, LABELS)
    assert before.layout.uirevision and before.layout.uirevision == after.layout.uirevision
    assert loss_figure(series, LABELS, x_axis="tokens").layout.uirevision != before.layout.uirevision


def test_bad_arguments_are_refused_with_the_choices():
    with pytest.raises(ValueError, match="step, epoch, tokens"):
        loss_figure(two_runs(), LABELS, x_axis="time")
    with pytest.raises(ValueError, match="smoothing"):
        loss_figure(two_runs(), LABELS, smoothing=-0.1)


# -- effective rank figure ----------------------------------------------------------------------------------------


def test_short_layer_names():
    assert short_layer_name("model.layers.0.self_attn.q_proj") == "L0 q_proj"
    assert short_layer_name("model.layers.11.mlp.down_proj") == "L11 down_proj"
    assert short_layer_name("transformer.h.3.attn.c_attn") == "L3 c_attn"
    assert short_layer_name("lm_head") == "lm_head"


def test_effective_rank_bars_grouped_one_colour_per_run_matching_the_loss_figure():
    layers = ["model.layers.0.self_attn.q_proj", "model.layers.1.self_attn.q_proj"]
    artifacts = {
        "a": artifact("a", [{"layer": layer, "effective_rank": rank, "shape": [64, 64]}
                            for layer, rank in zip(layers, [30, 34])]),
        "b": artifact("b", [{"layer": layer, "effective_rank": rank, "shape": [64, 64]}
                            for layer, rank in zip(layers, [8, 8])]),
        "full": artifact("full", []),  # full fine-tuning: no per-layer ranks
        "queued": None,
    }
    figure = effective_rank_figure(artifacts, LABELS)
    assert figure.layout.barmode == "group"
    assert [trace.name for trace in figure.data] == ["mora r=8", "lora r=8"]
    assert [trace.type for trace in figure.data] == ["bar", "bar"]
    assert list(figure.data[0].x) == ["L0 q_proj", "L1 q_proj"]
    assert list(figure.data[0].y) == [30, 34] and list(figure.data[1].y) == [8, 8]
    assert figure.data[0].marker.color != figure.data[1].marker.color
    loss = by_name(loss_figure(two_runs(), LABELS))
    assert figure.data[0].marker.color == loss["mora r=8 train"].line.color
    assert figure.data[1].marker.color == loss["lora r=8 train"].line.color


def test_effective_rank_without_layers_explains_itself():
    assert "select runs" in effective_rank_figure({}, {}).layout.annotations[0].text.lower()
    figure = effective_rank_figure({"a": None}, LABELS)
    assert not figure.data and "finished" in figure.layout.annotations[0].text


# -- boundaries ---------------------------------------------------------------------------------------------------


def test_the_runs_view_modules_never_import_torch():
    code = ("import sys, app.charts, app.runs_view; "
            "print(sorted({'torch', 'transformers', 'gradio'} & set(sys.modules)))")
    result = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
