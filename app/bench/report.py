"""A benchmark group's report: the Markdown table shaped like the paper's Table 2, the Plotly figure of its curves,
and the files results.json, results.md, curves.html and curves.png."""
from __future__ import annotations

import json
import re
import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Optional, Union

import plotly.graph_objects as go
from plotly.subplots import make_subplots

from app import settings
from app.bench.presets import PAPER_CHECKPOINTS, PAPER_TABLE2
from app.bench.results import Groups, group_runs, group_title, results_table
from app.charts import PALETTE
from storage.repo import Store
from storage.statuses import TERMINAL_STATUSES
from workers.memorize import FORMAT_ONLY_CHAR_ACCURACY


def _cell(stats: Optional[dict[str, float]], seeds: int = 1) -> str:
    """Mean ± spread; a cell measured on fewer seeds than the table's says how many."""
    if stats is None:
        return "–"
    text = f"{stats['mean']:.1f}" + (f" ± {stats['spread']:.1f}" if stats["n"] > 1 else "")
    return text + (f" (n={stats['n']})" if stats["n"] < seeds else "")


def _steps_of(rows: list[dict[str, Any]]) -> list[int]:
    return sorted({step for row in rows for step in row["char_accuracy"]})


def markdown_table(rows: list[dict[str, Any]], group: Groups = "") -> str:
    """The table (character accuracy, then exact match, in %), the sweep behind it, and the paper's Table 2."""
    steps = _steps_of(rows)
    seeds = sorted({seed for row in rows for seed in row["seeds"]})
    header = "| method | learning rate | " + " | ".join(f"step {s}" for s in steps) + " |\n"
    rule = "|---|---|" + "---|" * len(steps) + "\n"
    statuses = [status for row in rows for entry in row["sweep"] for status in entry["statuses"]]
    unfinished = sum(status not in TERMINAL_STATUSES for status in statuses)
    lines = [f"### Memorisation{f' — {group_title(group)}' if group else ''}\n"]
    if unfinished:
        lines.append(f"**In progress:** {len(statuses) - unfinished} of {len(statuses)} runs finished; the table "
                     "fills in as the others do.\n")
    lines += [f"Character accuracy (%) of greedy recall, mean ± standard deviation over {len(seeds)} seed(s) "
              f"({', '.join(map(str, seeds))}), at each method's best learning rate.\n", header + rule.rstrip()]
    lines += [f"| {row['label']} | {row['learning_rate']:g} | "
              + " | ".join(_cell(row["char_accuracy"].get(s), len(seeds)) for s in steps) + " |" for row in rows]
    lines += ["", f"A model that has learnt only the UUID format, none of the values, scores "
                  f"{100 * FORMAT_ONLY_CHAR_ACCURACY:.1f}% (hyphens and version digit right, the other digits by "
                  "chance).", "", "Exact match (%), same runs.", "", header + rule.rstrip()]
    lines += [f"| {row['label']} | {row['learning_rate']:g} | "
              + " | ".join(_cell(row["exact_match"].get(s), len(seeds)) for s in steps) + " |" for row in rows]
    lines += ["", "Learning-rate sweep: final character accuracy and exact match (%), the chosen rate in bold.", "",
              "| method | learning rate | seeds | final char accuracy | final exact match |", "|---|---|---|---|---|"]
    for row in rows:
        for entry in row["sweep"]:
            rate = f"{entry['learning_rate']:g}"
            rate = f"**{rate}**" if entry["learning_rate"] == row["learning_rate"] else rate
            final_step = max(entry["char_accuracy"]) if entry["char_accuracy"] else None
            lines.append(f"| {row['label']} | {rate} | {len(entry['seeds'])} | "
                         f"{_cell(entry['char_accuracy'].get(final_step))} | "
                         f"{_cell(entry['exact_match'].get(final_step))} |")
    edges = [row["label"] for row in rows if len(row["sweep"]) > 1
             and row["learning_rate"] == max(entry["learning_rate"] for entry in row["sweep"])]
    if edges:
        lines += ["", f"The best rate is the largest swept for {', '.join(edges)}: a larger one may do better "
                      "(sweep further with `--lr-factors`)."]
    if any(row["adapter"] == "lora" for row in rows):
        lines += ["", "The paper (LLaMA-2-7B, 10k pairs), character accuracy (%):", "",
                  "| method | " + " | ".join(f"step {s}" for s in PAPER_CHECKPOINTS) + " |",
                  "|---|" + "---|" * len(PAPER_CHECKPOINTS)]
        lines += [f"| {label} | " + " | ".join(f"{v:g}" for v in values) + " |"
                  for label, values in PAPER_TABLE2.items()]
    return "\n".join(lines) + "\n"


def results_figure(store: Store, rows: list[dict[str, Any]], group: Groups) -> go.Figure:
    """Training loss (left) and character accuracy at the checkpoints (right) of each method at its chosen
    learning rate, averaged over seeds, with the spread as error bars. `rows` is `results_table(store, group)`."""
    chosen = {row["method"]: next(e for e in row["sweep"] if e["learning_rate"] == row["learning_rate"])
              for row in rows}
    losses = store.metric_series([rid for entry in chosen.values() for rid in entry["runs"]], ["loss"])
    figure = make_subplots(rows=1, cols=2, subplot_titles=("training loss", "character accuracy (%)"))
    for index, row in enumerate(rows):
        colour, name = PALETTE[index % len(PALETTE)], f"{row['label']} (lr {row['learning_rate']:g})"
        by_step = defaultdict(list)
        for run_id in chosen[row["method"]]["runs"]:
            for point in losses[run_id]["loss"]:
                if point.value is not None:
                    by_step[point.step].append(point.value)
        steps = sorted(by_step)
        figure.add_trace(go.Scatter(x=steps, y=[statistics.fmean(by_step[s]) for s in steps], name=name,
                                    mode="lines", line={"color": colour, "width": 2}, legendgroup=row["method"]),
                         row=1, col=1)
        cells = [(s, c) for s, c in sorted(row["char_accuracy"].items()) if c]
        figure.add_trace(go.Scatter(x=[s for s, _ in cells], y=[c["mean"] for _, c in cells], name=name,
                                    mode="lines+markers", line={"color": colour, "width": 2}, showlegend=False,
                                    error_y={"type": "data", "array": [c["spread"] for _, c in cells]},
                                    legendgroup=row["method"]), row=1, col=2)
    seeds = sorted({seed for row in rows for seed in row["seeds"]})
    figure.update_layout(template="plotly_white", title=f"{group_title(group)}: memorisation of UUID pairs "
                                                        f"({len(seeds)} seed(s), best learning rate per method)",
                         legend_title_text="method", margin={"l": 60, "r": 20, "t": 70, "b": 50})
    figure.update_xaxes(title_text="step")
    figure.update_yaxes(title_text="loss", row=1, col=1)
    figure.update_yaxes(title_text="%", range=[0, 101], row=1, col=2)
    figure.add_hline(y=100 * FORMAT_ONLY_CHAR_ACCURACY, line_dash="dot", line_color="#888", row=1, col=2,
                     annotation_text="format only", annotation_position="top left")
    return figure


@dataclass
class ResultFiles:
    json: Path
    markdown: Path
    html: Path
    png: Optional[Path]
    problems: list[str] = field(default_factory=list)
    """What could not be written, and why (the PNG needs a Chrome or Chromium for kaleido)."""


def write_results(store: Store, group: Groups, folder: Union[str, Path]) -> ResultFiles:
    """results.json (the table with every sweep entry and run id), results.md, curves.html (self-contained, works
    offline) and curves.png in `folder`."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rows = results_table(store, group)
    runs = group_runs(store, group)
    files = ResultFiles(json=folder / "results.json", markdown=folder / "results.md", html=folder / "curves.html",
                        png=folder / "curves.png")
    summary = {"group": group_title(group), "groups": [group] if isinstance(group, str) else list(group),
               "written": datetime.now().isoformat(timespec="seconds"), "metric_unit": "percent",
               "steps": _steps_of(rows), "runs": {run.id: {"name": run.name, "status": run.status,
                                                           "run_dir": run.run_dir} for run in runs},
               "rows": rows}
    files.json.write_text(json.dumps(summary, indent=2) + "\n")
    files.markdown.write_text(markdown_table(rows, group))
    figure = results_figure(store, rows, group)
    figure.write_html(files.html, include_plotlyjs=True)
    try:
        figure.write_image(files.png, width=1400, height=550)
    except Exception as error:  # kaleido without a browser, or one that fails to start: the rest still stands
        files.png = None
        files.problems.append(f"curves.png not written: {type(error).__name__}: {error}")
    return files


def default_output_dir(group: Groups) -> Path:
    return settings.data_dir() / "bench" / re.sub(r"[^A-Za-z0-9._-]+", "-", group_title(group))
