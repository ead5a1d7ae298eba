"""What an evaluation of runs needs before it is queued: who answers (each run's adapter or whole model, and the base
model alone), which prompts (the runs' eval split, their training rows, or a file), and the checks that make a bad
choice a message before anything is recorded. `StudioService.start_evaluation` calls these; torch-free.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Any, Optional, Sequence

from app.runs_view import run_labels
from storage.records import RunRecord
from workers.evaluation import (DEFAULT_MAX_NEW_TOKENS, MAX_EXAMPLES, MAX_NEW_TOKENS, MAX_ROWS, EvalError, EvalRequest,
                                EvalSource)
from workers.judge import JudgeSettings

SOURCES = ("eval split", "training rows", "file")
"""Where the prompts come from: the runs' held-out rows, the rows they trained on (memorisation), or a file."""
BASE_LABEL = "base model"
EVALUABLE = ("succeeded", "cancelled")


def check_runs(runs: Sequence[RunRecord], include_base: bool) -> None:
    """Runs with a result to answer with, on one base model, at most MAX_ROWS rows with the base."""
    if not runs and not include_base:
        raise EvalError("choose the runs to evaluate (tick them under Compare runs), or the base model")
    if len(runs) + include_base > MAX_ROWS:
        raise EvalError(f"at most {MAX_ROWS} rows answer side by side (runs and the base model); "
                        f"{len(runs) + include_base} were chosen")
    for run in runs:
        if run.status not in EVALUABLE or not run.output_dir:
            raise EvalError(f"run {run.name} ({run.id}) is {run.status} and has no adapter or model to evaluate")
    bases = {run.model or "" for run in runs}
    if len(bases) > 1:
        raise EvalError(f"the runs are on different base models ({', '.join(sorted(b or 'the default' for b in bases))}"
                        "); evaluate the runs of one base together")


def source_for(runs: Sequence[RunRecord], choice: str, data: Optional[str], limit: int,
               seed: int = 0) -> EvalSource:
    """The prompts of `choice` (one of SOURCES): the first run's eval split or training rows, which every other run
    must share, or `data` for "file"."""
    if choice not in SOURCES:
        raise EvalError(f"prompts: expected one of {', '.join(SOURCES)}, got {choice!r}")
    if choice == "file":
        if not data:
            raise EvalError("prompts from a file: choose the dataset or give the file")
        source = EvalSource(str(data), "all", 0.0, seed, limit)
    else:
        if not runs:
            raise EvalError(f"the {choice} belong to runs: choose at least one run, or take the prompts from a file")
        sources = [_run_source(run, choice, limit) for run in runs]
        for run, other in zip(runs[1:], sources[1:]):
            if other != sources[0]:
                raise EvalError(f"run {run.name} ({run.id}) has other {choice} than {runs[0].name} (another data "
                                f"file, eval fraction or seed); take the prompts from a file instead")
        source = sources[0]
    source.validate()
    return source


def _run_source(run: RunRecord, choice: str, limit: int) -> EvalSource:
    config = run.config
    fraction, seed = float(config.get("eval_fraction") or 0.0), int(config.get("seed") or 0)
    if choice == "eval split":
        if config.get("eval_data"):
            return EvalSource(str(config["eval_data"]), "all", 0.0, seed, limit)
        if fraction > 0:
            return EvalSource(str(config.get("data")), "eval", fraction, seed, limit)
        raise EvalError(f"run {run.name} ({run.id}) kept no eval split (no eval_data, eval_fraction 0): take its "
                        "training rows or a file")
    return EvalSource(str(config.get("data")), "train" if fraction > 0 else "all", fraction, seed, limit)


def build_request(runs: Sequence[RunRecord], include_base: bool, source: EvalSource,
                  max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS, judge: Optional[dict[str, Any]] = None
                  ) -> tuple[list[dict[str, Any]], EvalRequest]:
    """(the rows to record: [{label, run_id}], the worker's request), checked."""
    check_runs(runs, include_base)
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not (
            1 <= max_new_tokens <= MAX_NEW_TOKENS):
        raise EvalError(f"max new tokens: between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
    if judge is not None:
        judge = asdict(JudgeSettings.from_dict(judge))  # every setting, defaults filled in
    labels = run_labels(runs)
    rows, request_rows = [], []
    if include_base:
        rows.append({"label": BASE_LABEL, "run_id": None})
        request_rows.append({"label": BASE_LABEL})
    for run in runs:
        path = "model_path" if run.output_kind == "model" else "adapter_path"
        rows.append({"label": labels[run.id], "run_id": run.id})
        request_rows.append({"label": labels[run.id], "run_id": run.id, path: run.output_dir, "step": run.step})
    base = next((run.model for run in runs), "") or None
    request = EvalRequest.from_dict({"base_model": base, "rows": request_rows, "source": source.__dict__,
                                     "max_new_tokens": max_new_tokens, "judge": judge})
    return rows, request


def stored_settings(request: EvalRequest) -> dict[str, Any]:
    """What the store keeps of the settings: the judge without its key."""
    judge = None if request.judge is None else {k: v for k, v in request.judge.items() if k != "api_key"}
    return {"max_new_tokens": request.max_new_tokens, "judge": judge}


def default_name(runs: Sequence[RunRecord], include_base: bool, source: EvalSource, data_label: str = "") -> str:
    """"mora, lora + base on capitals.jsonl (all, 50)": `data_label` names the data (a dataset's name) where its
    stored file name would not."""
    who = ", ".join(run.name for run in runs[:3]) + (f" +{len(runs) - 3}" if len(runs) > 3 else "")
    who = (who + " + base" if who else "base") if include_base else who
    return f"{who} on {data_label or Path(source.data).name} ({source.split}, {source.limit})"[:200]


__all__ = ["SOURCES", "BASE_LABEL", "MAX_EXAMPLES", "check_runs", "source_for", "build_request", "stored_settings",
           "default_name"]
