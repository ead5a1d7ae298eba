"""The Runs tab's Plotly figures, built from what the store hands back (values in, a figure out).

The tab redraws them every second from `Store.metric_series` and `Store.get_artifacts`; each figure sets
`uirevision`, so a user's zoom and hidden legend entries survive the redraw. A run keeps its colour in every figure:
colours follow the order of `labels`, which the caller builds from the selected runs.
"""
from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Optional

import numpy as np
import plotly.graph_objects as go
from plotly.colors import qualitative

from storage.records import ArtifactRecord, MetricPointRecord

TRAIN_METRIC = "loss"
EVAL_METRIC = "eval_loss"
X_AXES = {"step": "step", "epoch": "epoch", "tokens": "tokens seen"}
PALETTE = qualitative.Plotly
RAW_OPACITY = 0.25
_LAYOUT = {"template": "plotly_white", "margin": {"l": 60, "r": 20, "t": 30, "b": 50}, "hovermode": "closest"}
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

Series = Mapping[str, Mapping[str, Sequence[MetricPointRecord]]]


def smooth(values: Iterable[Optional[float]], weight: float) -> list[Optional[float]]:
    """TensorBoard's debiased exponential moving average.

    last_t = weight · last_{t-1} + (1 − weight) · v_t, starting from 0, and each output is last_t / (1 − weight^n)
    where n counts the values seen so far, so the first points are not pulled towards 0. A None (or NaN) value is a
    gap: it stays None and does not enter the average. weight 0 returns the values unchanged.
    """
    _check_weight(weight)
    smoothed: list[Optional[float]] = []
    last, seen = 0.0, 0
    for value in values:
        if value is None or not math.isfinite(value):
            smoothed.append(None)
            continue
        last = last * weight + (1 - weight) * value
        seen += 1
        smoothed.append(last / (1 - weight ** seen))
    return smoothed


def short_layer_name(path: str) -> str:
    """"model.layers.0.self_attn.q_proj" → "L0 q_proj"; a path without a block index keeps its last part."""
    module = path.rsplit(".", 1)[-1]
    block = _LAYER_INDEX.search(path)
    return f"L{block.group(1)} {module}" if block else module


def loss_figure(series: Series, labels: Mapping[str, str], x_axis: str = "step", smoothing: float = 0.0,
                log_scale: bool = False, show_eval: bool = True) -> go.Figure:
    """Train loss (solid) and eval loss (dashed, with markers) of every run in `series`, overlaid, one colour a run.

    `series` is what `Store.metric_series` or `Store.sampled_series` returns; sampled buckets that stand for several
    points also get their min–max band. x is the step, the epoch or the tokens seen; a point without that
    value is left out, except that an eval point borrows it from the train point at the same step (the worker
    reports tokens seen with train steps only). With `smoothing` the train curve is the debiased EMA and the raw
    curve stays faint behind it, in the same legend group; eval points are sparse and never smoothed.
    """
    if x_axis not in X_AXES:
        raise ValueError(f"x_axis must be one of {', '.join(X_AXES)}, got {x_axis!r}")
    _check_weight(smoothing)
    colours = _colours(labels, series)
    traces: list[dict] = []
    for run_id, metrics in series.items():
        label, colour = labels.get(run_id, run_id), colours[run_id]
        train = metrics.get(TRAIN_METRIC, ())
        x_by_step = {point.step: getattr(point, x_axis) for point in train if getattr(point, x_axis) is not None}
        xs, ys = _xy(train, x_axis, x_by_step)
        if xs:
            traces += _band(train, x_axis, x_by_step, run_id, label, colour)
            if smoothing:
                traces.append(_scatter(xs, ys, name=f"{label} train (raw)", mode="lines", legendgroup=run_id,
                                       showlegend=False, line={"color": colour, "width": 1}, opacity=RAW_OPACITY,
                                       hoverinfo="skip"))
                ys = smooth(ys, smoothing)
            # a line through one point draws nothing: the first logged step shows as a dot
            traces.append(_scatter(xs, ys, name=f"{label} train", mode="lines" if len(xs) > 1 else "markers",
                                   legendgroup=run_id, line={"color": colour, "width": 2}, marker={"color": colour}))
        if show_eval:
            xs, ys = _xy(metrics.get(EVAL_METRIC, ()), x_axis, x_by_step)
            if xs:
                traces.append(_scatter(xs, ys, name=f"{label} eval", mode="lines+markers", legendgroup=run_id,
                                       line={"color": colour, "width": 2, "dash": "dash"},
                                       marker={"color": colour, "size": 7}))
    layout = {"xaxis": {"title": {"text": X_AXES[x_axis]}},
              "yaxis": {"title": {"text": "loss"}, "type": "log" if log_scale else "linear"},
              "uirevision": f"loss-{x_axis}-{log_scale}", "legend": {"title": {"text": "run"}}, **_LAYOUT}
    # Built from plain dicts without plotly's per-value validation: the traces are ours and well-formed, and
    # validating a few thousand points a trace cost most of a live tick (about 15 ms a figure against 1 ms).
    figure = go.Figure(data=traces, layout=layout, _validate=False)
    if not traces:
        _annotate(figure, "Select runs to compare" if not series
                  else f"No loss with {X_AXES[x_axis]} logged yet by the selected runs")
    return figure


def _scatter(xs: Sequence, ys: Sequence, dtype: type = np.float64, **options) -> dict:
    """A scatter trace whose values travel as a typed array (plotly writes numpy arrays as base64, about a third of
    their decimal JSON); a gap (None) is NaN, which plotly leaves undrawn as it does None."""
    return {"type": "scatter", "x": np.asarray(xs), "y": np.asarray(ys, dtype=dtype), **options}


def effective_rank_figure(artifacts: Mapping[str, Optional[ArtifactRecord]], labels: Mapping[str, str]) -> go.Figure:
    """Grouped bars: the effective rank of ΔW per adapted layer, one colour a run (the MoRA paper's Fig. 5).

    Runs without per-layer ranks (no adapter saved yet, or full fine-tuning) are left out.
    """
    colours = _colours(labels, artifacts)
    figure = go.Figure()
    for run_id, artifact in artifacts.items():
        layers = (artifact.layers if artifact is not None else None) or []
        if not layers:
            continue
        figure.add_trace(go.Bar(
            x=[short_layer_name(layer["layer"]) for layer in layers],
            y=[layer["effective_rank"] for layer in layers],
            customdata=[[layer["layer"], " × ".join(str(side) for side in layer.get("shape") or ())]
                        for layer in layers],
            hovertemplate="%{customdata[0]}<br>ΔW %{customdata[1]}<br>effective rank %{y}<extra>%{fullData.name}"
                          "</extra>",
            name=labels.get(run_id, run_id), marker_color=colours[run_id]))
    figure.update_layout(barmode="group", xaxis_title="layer", yaxis_title="effective rank of ΔW",
                         uirevision="effective-rank", legend_title_text="run", **_LAYOUT)
    if not figure.data:
        _annotate(figure, "Select finished MoRA or LoRA runs to compare the rank of their updates"
                  if artifacts else "Select runs to compare")
    return figure


def _check_weight(weight: float) -> None:
    if not 0 <= weight < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {weight!r}")


def _colours(labels: Mapping[str, str], runs: Iterable[str]) -> dict[str, str]:
    order = list(dict.fromkeys([*labels, *runs]))
    return {run_id: PALETTE[index % len(PALETTE)] for index, run_id in enumerate(order)}


def _xy(points: Iterable[MetricPointRecord], x_axis: str, x_by_step: Mapping[int, float], field: str = "value"
        ) -> tuple[list[float], list[Optional[float]]]:
    """x and each point's `field` (its value, or a sampled bucket's low or high); a point with no x is left out."""
    xs, ys = [], []
    for point in points:
        x = getattr(point, x_axis)
        x = x_by_step.get(point.step) if x is None else x
        if x is not None:
            xs.append(x)
            ys.append(getattr(point, field))
    return xs, ys


def _band(points: Sequence, x_axis: str, x_by_step: Mapping[int, float], run_id: str, label: str,
          colour: str) -> list[dict]:
    """The min–max range of each sampled bucket (`Store.sampled_series`) as a faint band behind the line, so a spike
    that the bucket's last point hides still shows. None for whole series (every bucket one point). The band's values
    go as float32: it is drawn faint and wide, and it halves its bytes."""
    if not any(getattr(point, "count", 1) > 1 for point in points):
        return []
    xs, highs = _xy(points, x_axis, x_by_step, "high")
    lows = _xy(points, x_axis, x_by_step, "low")[1]
    common = {"mode": "lines", "legendgroup": run_id, "showlegend": False, "hoverinfo": "skip",
              "line": {"width": 0, "color": colour}, "dtype": np.float32}
    return [_scatter(xs, highs, name=f"{label} train (max)", **common),
            _scatter(xs, lows, name=f"{label} train (min)", fill="tonexty", fillcolor=_faint(colour), **common)]


def _faint(colour: str) -> str:
    """A '#rrggbb' colour at the raw-curve opacity, as rgba: a fill takes no opacity of its own."""
    red, green, blue = (int(colour[i:i + 2], 16) for i in (1, 3, 5))
    return f"rgba({red}, {green}, {blue}, {RAW_OPACITY})"


def _annotate(figure: go.Figure, text: str) -> None:
    figure.add_annotation(text=text, showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5,
                          font={"size": 15, "color": "#888"})
    figure.update_xaxes(visible=False)
    figure.update_yaxes(visible=False)


__all__ = ["loss_figure", "effective_rank_figure", "smooth", "short_layer_name", "TRAIN_METRIC", "EVAL_METRIC",
           "X_AXES"]
