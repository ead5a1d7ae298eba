"""The Runs tab's Evaluation view, as plain functions (service and values in, values out):

- `launch`: start an evaluation of the ticked runs (and the base model) from the view's controls;
- `score_rows`: the score table, one row per answering row (the base model is a row), one column per metric, with
  the blind A/B votes from the Chat tab beside them as the human score (wins / votes);
- `examples_html`: the per-example table: prompt, reference, each row's answer with its score, the words that differ
  from the reference highlighted and the best answer marked; sortable by where the rows disagree most (the spread of
  the chosen metric across rows), by the worst mean score, or in file order;
- `curves_figure`: each metric over steps: the generation eval during training (`eval_generate_steps`) as lines, and
  every stored evaluation of the runs as markers at the step it was run.

`refresh` is the view's cheap tick: it reads one evaluation record and sends nothing (`UNCHANGED`) until its status or
progress moves or the view's choices change.
"""
from __future__ import annotations

import difflib
import html
from dataclasses import dataclass
from typing import Any, Optional, Sequence

import plotly.graph_objects as go

from app.charts import PALETTE
from app.evaluations import MAX_EXAMPLES, SOURCES
from app.runs_dashboard import UNCHANGED
from app.service import StudioService
from storage.records import (EvaluationAnswerRecord, EvaluationExampleRecord, EvaluationRecord, EvaluationScoreRecord,
                             VoteCounts)
from workers.eval_metrics import LOWER_IS_BETTER, METRICS, curve_name

PROMPT_SOURCES, MOST_PROMPTS = SOURCES, MAX_EXAMPLES  # the launch controls' choices
SORTS = ("most disagreement", "worst mean score", "file order")
TABLE_METRICS = (*METRICS, "judge_score", "judge_win_rate")
SHOWN_EXAMPLES = 100
"""Examples the per-example table shows at once (the top of the chosen order)."""
HUMAN = "human A/B (wins/votes)"
CSS = """
.eval-table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
.eval-table td, .eval-table th { border: 1px solid #ddd; padding: 4px 6px; vertical-align: top; }
.eval-table .best { background: #dcfce7; }
.eval-table ins { background: #fde68a; text-decoration: none; }
.eval-table .score { color: #555; font-size: 0.9em; }
"""


def launch(service: StudioService, run_ids: Sequence[str], include_base: bool, prompts: str,
           dataset_id: Optional[int], limit: Any, max_new_tokens: Any, judge_mode: str = "off", judge_url: str = "",
           judge_model: str = "", judge_key: str = "") -> EvaluationRecord:
    """Start an evaluation from the view's controls (a cleared number box sends 0: it is refused, named)."""
    dataset = service.dataset(int(dataset_id)) if prompts == "file" and dataset_id is not None else None
    judge = None
    if judge_mode and judge_mode != "off":
        judge = {"url": (judge_url or "").strip(), "model": (judge_model or "").strip(), "api_key": judge_key or "",
                 "mode": judge_mode}
    return service.start_evaluation(list(run_ids or ()), include_base=bool(include_base), prompts=prompts,
                                    data=dataset.path if dataset else None, limit=_whole("prompts", limit),
                                    max_new_tokens=_whole("max new tokens", max_new_tokens), judge=judge,
                                    data_label=dataset.name if dataset else "")


def _whole(name: str, value: Any) -> int:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name}: a whole number, got {value!r}") from None
    if number != int(number):
        raise ValueError(f"{name}: a whole number, got {value!r}")
    return int(number)


def evaluation_choices(records: Sequence[EvaluationRecord]) -> list[tuple[str, str]]:
    return [(f"{e.name} · {e.status} · {e.id}", e.id) for e in records]


def status_text(evaluation: EvaluationRecord) -> str:
    progress = f"{evaluation.examples_done}/{evaluation.examples_total} prompts" if evaluation.examples_total else ""
    message = evaluation.error if evaluation.status == "failed" else evaluation.status_message
    return " · ".join(part for part in (f"**{evaluation.status}**", progress, message) if part)


def _shown_metrics(scores: Sequence[EvaluationScoreRecord]) -> list[str]:
    present = {s.metric for s in scores}
    return [m for m in TABLE_METRICS if m in present]


def score_rows(evaluation: EvaluationRecord, scores: Sequence[EvaluationScoreRecord],
               votes: dict[str, VoteCounts]) -> tuple[list[str], list[list]]:
    """(columns, rows): row, step, then each metric's value (4 decimals), then the human score from A/B votes."""
    metrics = _shown_metrics(scores)
    value = {(s.row, s.metric): s for s in scores}
    rows = []
    for index, row in enumerate(evaluation.rows):
        step = next((s.step for s in scores if s.row == index and s.step is not None), None)
        cells = ["" if value.get((index, m)) is None or value[(index, m)].value is None
                 else round(value[(index, m)].value, 4) for m in metrics]
        counts = votes.get(row["run_id"]) if row["run_id"] else None
        played = counts.wins + counts.losses if counts else 0
        human = f"{counts.wins}/{played}" if played else ""
        rows.append([row["label"], "" if step is None else step, *cells, human])
    return ["row", "step", *metrics, HUMAN], rows


def disagreement(answers: Sequence[EvaluationAnswerRecord], metric: str) -> float:
    """The spread (max − min) of `metric` across the rows' answers to one example; 0 when fewer than two have it."""
    values = [a.scores.get(metric) for a in answers if a.scores.get(metric) is not None]
    return max(values) - min(values) if len(values) > 1 else 0.0


def ordered_examples(examples: Sequence[EvaluationExampleRecord], answers: Sequence[EvaluationAnswerRecord],
                     sort: str, metric: str) -> list[tuple[EvaluationExampleRecord, list[EvaluationAnswerRecord]]]:
    """Examples with their answers (by row) in the order `sort` (one of SORTS) says, file order breaking ties."""
    if sort not in SORTS:
        raise ValueError(f"sort: one of {', '.join(SORTS)}, got {sort!r}")
    by_example: dict[int, list[EvaluationAnswerRecord]] = {}
    for answer in answers:
        by_example.setdefault(answer.example, []).append(answer)
    pairs = [(example, sorted(by_example.get(example.example, []), key=lambda a: a.row)) for example in examples]
    sign = -1 if metric in LOWER_IS_BETTER else 1
    if sort == "most disagreement":
        pairs.sort(key=lambda pair: (-disagreement(pair[1], metric), pair[0].example))
    elif sort == "worst mean score":
        def mean(pair) -> float:
            values = [a.scores.get(metric) for a in pair[1] if a.scores.get(metric) is not None]
            return sign * sum(values) / len(values) if values else float("inf")
        pairs.sort(key=lambda pair: (mean(pair), pair[0].example))
    return pairs


def highlight_differences(answer: str, reference: str) -> str:
    """The answer as HTML, its words that are not in the reference (in order) marked with <ins>."""
    words, expected = answer.split(), reference.split()
    matcher = difflib.SequenceMatcher(a=[w.lower() for w in expected], b=[w.lower() for w in words], autojunk=False)
    parts = []
    for tag, _, _, start, end in matcher.get_opcodes():
        text = html.escape(" ".join(words[start:end]))
        if text:
            parts.append(text if tag == "equal" else f"<ins>{text}</ins>")
    return " ".join(parts)


def examples_html(evaluation: EvaluationRecord, examples: Sequence[EvaluationExampleRecord],
                  answers: Sequence[EvaluationAnswerRecord], sort: str = "most disagreement",
                  metric: str = "token_f1", limit: int = SHOWN_EXAMPLES) -> str:
    """The per-example table (the first `limit` in `sort` order)."""
    if metric not in TABLE_METRICS:
        raise ValueError(f"metric: one of {', '.join(TABLE_METRICS)}, got {metric!r}")
    if not examples:
        return "<p>No answers yet.</p>"
    labels = [row["label"] for row in evaluation.rows]
    head = "".join(f"<th>{html.escape(label)}</th>" for label in labels)
    body = []
    pairs = ordered_examples(examples, answers, sort, metric)
    for example, row_answers in pairs[:limit]:
        prompt = html.escape(example.prompt[-1]["content"] if example.prompt else "")
        by_row = {a.row: a for a in row_answers}
        values = {a.row: _metric(a, metric) for a in row_answers if _metric(a, metric) is not None}
        best = (min if metric in LOWER_IS_BETTER else max)(values.values()) if len(set(values.values())) > 1 else None
        cells = []
        for index in range(len(labels)):
            answer = by_row.get(index)
            if answer is None:
                cells.append("<td>…</td>")
                continue
            score = _metric(answer, metric)
            shown = "" if score is None else f"{score:.3g}"
            judge = f" · judge {answer.judge_score:g}" if answer.judge_score is not None else ""
            title = f' title="{html.escape(answer.judge_reason)}"' if answer.judge_reason else ""
            marked = ' class="best"' if best is not None and score == best else ""
            cells.append(f"<td{marked}{title}>{highlight_differences(answer.answer, example.reference)}"
                         f"<div class='score'>{metric} {shown}{judge}</div></td>")
        spread = disagreement(row_answers, metric)
        body.append(f"<tr><td>{example.example + 1}<div class='score'>row {example.source_row} · spread "
                    f"{spread:.3g}</div></td><td>{prompt}</td><td>{html.escape(example.reference)}</td>"
                    f"{''.join(cells)}</tr>")
    note = f"<p>{min(limit, len(pairs))} of {len(pairs)} prompts, by {sort} of {metric}.</p>"
    return (f"{note}<table class='eval-table' id='eval-examples-table'><tr><th>#</th><th>prompt</th>"
            f"<th>reference</th>{head}</tr>{''.join(body)}</table>")


def _metric(answer: EvaluationAnswerRecord, metric: str) -> Optional[float]:
    return answer.judge_score if metric == "judge_score" else answer.scores.get(metric)


def curves_figure(labels: dict[str, str], series: dict[str, dict[str, list]],
                  evaluated: Sequence[EvaluationScoreRecord], metric: str) -> go.Figure:
    """`metric` over steps for each run in `labels`: its generation eval during training (`series`, what
    `StudioService.metric_series` returns for `curve_name(metric)`) as a line, each evaluation's score
    (`evaluated`, `StudioService.run_scores`) as a marker."""
    figure = go.Figure()
    for index, (run_id, label) in enumerate(labels.items()):
        colour = PALETTE[index % len(PALETTE)]
        points = series.get(run_id, {}).get(curve_name(metric), [])
        if points:
            figure.add_scatter(x=[p.step for p in points], y=[p.value for p in points], mode="lines+markers",
                               name=f"{label} (during training)", line={"color": colour})
        marks = [(s.step, s.value) for s in evaluated
                 if s.run_id == run_id and s.metric == metric and s.step is not None and s.value is not None]
        if marks:
            figure.add_scatter(x=[m[0] for m in marks], y=[m[1] for m in marks], mode="markers",
                               name=f"{label} (evaluations)", marker={"color": colour, "size": 11, "symbol": "diamond"})
    figure.update_layout(template="plotly_white", margin={"l": 60, "r": 20, "t": 30, "b": 50}, uirevision="eval",
                         xaxis_title="step", yaxis_title=metric)
    if not figure.data:
        figure.add_annotation(text=f"no {metric} yet: evaluate the runs, or train with eval_generate_steps",
                              showarrow=False, xref="paper", yref="paper", x=0.5, y=0.5)
    return figure


@dataclass(frozen=True)
class ViewChoice:
    eval_id: Optional[str]
    sort: str
    metric: str
    run_ids: tuple[str, ...]


@dataclass
class Refresh:
    version: Any
    status: Any = UNCHANGED
    scores: Any = UNCHANGED
    examples: Any = UNCHANGED
    curves: Any = UNCHANGED


def refresh(service: StudioService, last: Any, choice: ViewChoice) -> Refresh:
    """One tick of the view: everything again when the evaluation's status or progress, or a choice, moved since
    `last` (the version the page was sent); otherwise nothing."""
    evaluation = service.evaluation(choice.eval_id) if choice.eval_id else None
    version = (choice, evaluation and (evaluation.status, evaluation.examples_done, evaluation.finished_at))
    if version == last:
        return Refresh(version)
    result = Refresh(version)
    runs = service.runs_by_id(choice.run_ids)
    if evaluation is not None:
        scores, examples, answers = service.evaluation_results(evaluation.id)
        votes = service.votes([row["run_id"] for row in evaluation.rows if row["run_id"]])
        columns, rows = score_rows(evaluation, scores, votes)
        result.status = status_text(evaluation)
        result.scores = {"headers": columns, "data": rows}
        result.examples = examples_html(evaluation, examples, answers, choice.sort, choice.metric)
        runs = runs or service.runs_by_id([row["run_id"] for row in evaluation.rows if row["run_id"]])
    labels = {run.id: run.name for run in runs}
    result.curves = curves_figure(labels, service.metric_series(list(labels), [curve_name(choice.metric)]),
                                  service.run_scores(list(labels), choice.metric), choice.metric)
    return result


__all__ = ["launch", "score_rows", "examples_html", "curves_figure", "refresh", "ordered_examples", "disagreement",
           "highlight_differences", "SORTS", "TABLE_METRICS", "CSS", "UNCHANGED", "ViewChoice"]
