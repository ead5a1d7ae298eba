"""The service layer behind every face of the studio (the web UI and the `submit/runs/status/cancel/resume/logs`
commands): submit, cancel, resume, list. It talks to the store and to the workers' public API only."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable, Optional

from app import datasets, evaluations, settings
from storage.repo import NotFound, Store
from storage.records import (ArtifactRecord, ChatSessionRecord, DatasetRecord, EvaluationAnswerRecord,
                             EvaluationExampleRecord, EvaluationRecord, EvaluationScoreRecord, RunRecord, RunsPage,
                             VoteCounts)
from workers import api, memory_estimate, model_shapes
from workers.export import ExportError, request_for_run
from workers.models import ModelError
from workers.train_config import MAX_NAME_CHARS, QUANTIZATIONS, ConfigError, TrainConfig

CANCELLABLE = ("queued", "running")
RESUMABLE = ("failed", "cancelled")


class ServiceError(ValueError):
    """An action the user asked for that cannot be done, with the reason."""


def has_checkpoint(run_dir: Optional[str]) -> bool:
    return bool(run_dir) and any((Path(run_dir) / "checkpoints").glob("checkpoint-*"))


MAX_TAGS = 20
MAX_TAG_CHARS = 64


def check_labels(name: str = "", tags: Iterable[str] = (), group_name: Optional[str] = None) -> None:
    """Names, tags and group names are shown in every Runs refresh, so each is short: a 5 MB name would make every
    refresh 5 MB."""
    tags = list(tags)
    if len(name) > MAX_NAME_CHARS:
        raise ServiceError(f"name: at most {MAX_NAME_CHARS} characters, got {len(name):,}")
    if group_name is not None and len(group_name) > MAX_NAME_CHARS:
        raise ServiceError(f"group: at most {MAX_NAME_CHARS} characters, got {len(group_name):,}")
    if len(tags) > MAX_TAGS or any(len(str(tag)) > MAX_TAG_CHARS for tag in tags):
        raise ServiceError(f"tags: at most {MAX_TAGS}, each at most {MAX_TAG_CHARS} characters")


def check_config(config: TrainConfig | dict[str, Any]) -> TrainConfig:
    """The one check of a run's settings on their way to a worker, at the service boundary: a mapping (a YAML file,
    a stored run, a bench plan) is converted once with `TrainConfig.from_dict`, then every setting is checked, each
    problem naming its setting (ConfigError). The worker trusts what passed: it only rebuilds the config from the
    settings it is sent."""
    config = TrainConfig.from_dict(config) if isinstance(config, dict) else config
    config.validate()
    return config


def _training_workers() -> list[dict[str, Any]]:
    """The connected training workers; none when Redis is unreachable (then the Train tab offers the plain run and
    estimates against nothing, and sending the run says what is wrong)."""
    try:
        return memory_estimate.training_workers(api.workers())
    except Exception:
        return []


class StudioService:
    def __init__(self, store: Store, runs_dir: Optional[Path] = None) -> None:
        self.store = store
        self.runs_dir = Path(runs_dir or settings.runs_dir())

    def submit(self, config: TrainConfig | dict[str, Any], name: str = "", tags: Iterable[str] = (),
               group_name: Optional[str] = None, dataset_id: Optional[int] = None,
               parent: Optional[RunRecord] = None) -> RunRecord:
        """Check the settings (`check_config`) and `launch` the run."""
        return self.launch(check_config(config), name=name, tags=tags, group_name=group_name, dataset_id=dataset_id,
                           parent=parent)

    def launch(self, config: TrainConfig, name: str = "", tags: Iterable[str] = (),
               group_name: Optional[str] = None, dataset_id: Optional[int] = None,
               parent: Optional[RunRecord] = None) -> RunRecord:
        """Record the run of a config that passed `check_config` as queued and send it to the training queue; answers
        at once. Its settings, defaults filled in, are serialised once: that dict is what the run records and what
        the worker receives. Both happen or neither: a run whose task cannot be sent (Redis down) is removed again,
        and the user gets the reason."""
        check_labels(name=name, tags=tags, group_name=group_name)
        resolved = config.resolved()
        too_big = self._memory_refusal(resolved)
        if too_big:
            raise ServiceError(too_big)
        run_settings = resolved.to_dict()
        label = name or resolved.name or f"{resolved.adapter} r={resolved.r}" + (
            f" {resolved.variant}" if resolved.adapter == "mora" else "")
        run = self.store.create_run(
            run_settings, name=label, model=resolved.model or "", adapter=resolved.adapter, r=resolved.r,
            variant=resolved.variant, dataset_id=dataset_id, tags=list(tags), group_name=group_name,
            parent_id=parent.id if parent else None,
        )
        run_dir = self.runs_dir / run.id
        run_dir.mkdir(parents=True, exist_ok=True)
        run = self.store.set_output(run.id, run_dir=str(run_dir))
        try:
            api.submit_training(run.id, run_settings, str(run_dir), resume_from=parent.run_dir if parent else None)
        except api.QueueUnavailable as error:
            self.store.delete_run(run.id)
            run_dir.rmdir()
            raise ServiceError(f"the run was not queued: {error}") from None
        return run

    def memory_report(self, config: TrainConfig) -> Optional[dict[str, Any]]:
        """The pre-flight memory estimate of a run (`workers.memory_estimate.fit_report`) against the training
        workers connected now; None for a model whose layer shapes are not known without loading it."""
        shapes = model_shapes.shapes_for(config.model)
        if shapes is None:
            return None
        return memory_estimate.fit_report(shapes, config.resolved(), _training_workers())

    def training_capabilities(self) -> dict[str, Any]:
        """What the connected training workers can take: the most devices one of them can give a run (a CPU worker:
        one), and the quantised bases some worker can load."""
        trainers = _training_workers()
        return {"max_devices": max(map(memory_estimate.worker_devices, trainers), default=1),
                "quantization": [q for q in QUANTIZATIONS if q != "none"]
                if any(map(memory_estimate.worker_quantizes, trainers)) else []}

    def _memory_refusal(self, config: TrainConfig) -> Optional[str]:
        try:
            report = self.memory_report(config)
        except ModelError:  # a model only the workers' hosts have: they check it, and nothing is estimated here
            return None
        return memory_estimate.refusal_message(config, report) if report else None

    def cancel(self, run_id: str) -> RunRecord:
        run = self.store.get_run(run_id)
        if run.status not in CANCELLABLE:
            raise ServiceError(f"run {run_id} is {run.status}; only queued or running runs can be cancelled")
        api.request_cancel(run_id)
        self.store.request_cancel(run_id)
        if run.status == "queued":  # it will never start: the worker checks the flag first
            self.store.set_status(run_id, "cancelled", message="cancelled before it started")
        return self.store.get_run(run_id)

    def resume(self, run_id: str) -> RunRecord:
        """A new run, linked to its parent, that continues from the parent's last checkpoint."""
        parent = self.store.get_run(run_id)
        if parent.status not in RESUMABLE:
            raise ServiceError(f"run {run_id} is {parent.status}; only failed or cancelled runs can be resumed")
        if not has_checkpoint(parent.run_dir):
            raise ServiceError(f"run {run_id} has no checkpoint to resume from (set save_steps to checkpoint runs)")
        return self.submit(parent.config, name=f"{parent.name} (resumed)", tags=parent.tags,
                           group_name=parent.group_name, dataset_id=parent.dataset_id, parent=parent)

    def rename(self, run_id: str, name: str) -> RunRecord:
        if not name or not name.strip():
            raise ServiceError("name: give the run a name")
        check_labels(name=name.strip())
        return self.store.rename_run(run_id, name.strip())

    def delete(self, run_id: str) -> None:
        """Forget a finished run (its folder stays on disk); a live run must be cancelled first."""
        run = self.store.get_run(run_id)
        if run.status in CANCELLABLE:
            raise ServiceError(f"run {run_id} is {run.status}; cancel it before deleting it")
        self.store.delete_run(run_id)

    def runs(self, status: Optional[str] = None) -> list[RunRecord]:
        return self.store.list_runs(status=status)

    def run(self, run_id: str) -> RunRecord:
        return self.store.get_run(run_id)

    def find_run(self, ref: str) -> RunRecord:
        """A run by its id, or by its name where exactly one run has that name (the command line takes either)."""
        ref = (ref or "").strip()
        try:
            return self.store.get_run(ref)
        except NotFound:
            named = [run for run in self.store.list_runs() if run.name == ref]
        if not named:
            raise ServiceError(f"no run has the id or name {ref!r}; `mora-studio runs` lists them")
        if len(named) > 1:
            raise ServiceError(f"{len(named)} runs are named {ref!r} ({', '.join(run.id for run in named[:5])}"
                               f"{', ...' if len(named) > 5 else ''}); give the run's id")
        return named[0]

    def export_request(self, ref: str, format: str, gguf_type: str = "f16") -> dict[str, Any]:
        """What an export of this run needs (`workers.export.ExportRequest` as a dict): a succeeded run, a known
        format; the checks that need the model come later, where it loads."""
        try:
            return request_for_run(self.find_run(ref), format, gguf_type).to_dict()
        except ExportError as error:
            raise ServiceError(str(error)) from None

    def export_download(self, run_id: str, format: str, gguf_type: str = "f16") -> dict[str, Any]:
        """Export a run on the utility worker into the data folder's exports/ (the Runs tab's download) and wait:
        the result (`path`, `summary`, ...) or `{"error": message}`."""
        return api.export_run(self.export_request(run_id, format, gguf_type))

    def logs(self, run_id: str, after_seq: int = -1) -> list:
        self.store.get_run(run_id)
        return self.store.run_logs(run_id, after_seq=after_seq)

    # -- datasets and chats (the Data and Chat tabs go through these, never the store) -----------------------------

    def datasets(self) -> list[DatasetRecord]:
        return self.store.list_datasets()

    def dataset(self, dataset_id: int) -> DatasetRecord:
        return self.store.get_dataset(int(dataset_id))

    def datasets_table(self) -> list[list]:
        return datasets.datasets_rows(self.store)

    def upload_dataset(self, uploaded: Path, original_name: str) -> datasets.UploadResult:
        """Validate and keep an uploaded file under the data folder, within the upload size limit."""
        return datasets.ingest_upload(self.store, settings.datasets_dir(), uploaded, original_name,
                                      max_bytes=settings.max_upload_mb() * 2**20)

    def delete_dataset(self, dataset_id: int) -> str:
        return datasets.delete_dataset(self.store, int(dataset_id))

    def create_chat(self, **chat: Any) -> ChatSessionRecord:
        return self.store.create_chat(**chat)

    def add_chat_message(self, chat_id: int, **message: Any) -> None:
        self.store.add_chat_message(chat_id, **message)

    def add_vote(self, chat_id: int, **vote: Any) -> None:
        self.store.add_vote(chat_id, **vote)

    def paper_results(self, group: str) -> tuple[str, Any]:
        """A memorisation group's table (Markdown, the paper's Table 2 shape) and its loss and accuracy figure."""
        from app import bench  # on demand: it brings plotly, which the command line's service never needs

        rows = bench.results_table(self.store, group)
        return bench.markdown_table(rows, group), bench.results_figure(self.store, rows, group)

    # -- what the Runs tab reads (its views go through these, never the store) -----------------------------------

    def runs_page(self, **query: Any) -> RunsPage:
        """One page of the runs table (filters, sort, offset, limit as `Store.runs_page` takes them)."""
        return self.store.runs_page(**query)

    def runs_by_id(self, run_ids: Iterable[str]) -> list[RunRecord]:
        return self.store.runs_by_id(run_ids)

    def sampled_curves(self, run_ids: Iterable[str], names: Iterable[str], buckets: int,
                       step_range: Optional[tuple[int, int]] = None) -> dict[str, dict[str, list]]:
        """At most `buckets` points a curve, each bucket's last point with its min and max, chosen by the store."""
        return self.store.sampled_series(run_ids, names, buckets=buckets, step_range=step_range)

    def metric_series(self, run_ids: Iterable[str], names: Optional[Iterable[str]] = None) -> dict:
        """Every stored point (for exports, not for drawing)."""
        return self.store.metric_series(run_ids, names)

    def artifacts(self, run_id: str) -> list[ArtifactRecord]:
        return self.store.get_artifacts(run_id)

    # -- evaluations (the Runs tab's Evaluation view and `mora-studio eval`) -------------------------------------

    def start_evaluation(self, run_ids: Iterable[str], include_base: bool = False, prompts: str = "eval split",
                         data: Optional[str] = None, limit: int = 100, max_new_tokens: int = 64,
                         judge: Optional[dict[str, Any]] = None, name: str = "", seed: int = 0,
                         data_label: str = "") -> EvaluationRecord:
        """Check and record an evaluation of these runs (and the base model alone) on `prompts` (one of
        `app.evaluations.SOURCES`; `data` is the file for "file"), and queue it on the chat workers. Both happen or
        neither: an evaluation whose job cannot be sent is removed again."""
        runs = [self.find_run(ref) for ref in run_ids]
        try:
            source = evaluations.source_for(runs, prompts, data, int(limit), seed)
            rows, request = evaluations.build_request(runs, include_base, source, int(max_new_tokens), judge)
        except ValueError as error:  # EvalError, JudgeError: each names the setting
            raise ServiceError(str(error)) from None
        check_labels(name=name)
        record = self.store.create_evaluation(
            name=name.strip() or evaluations.default_name(runs, include_base, source, data_label),
            base_model=request.base_model or "", rows=rows, source=source.__dict__,
            settings=evaluations.stored_settings(request))
        try:
            api.submit_evaluation(record.id, request.to_dict())
        except api.QueueUnavailable as error:
            self.store.delete_evaluation(record.id)
            raise ServiceError(f"the evaluation was not queued: {error}") from None
        return record

    def cancel_evaluation(self, eval_id: str) -> EvaluationRecord:
        evaluation = self.store.get_evaluation(eval_id)
        if evaluation.status not in CANCELLABLE:
            raise ServiceError(f"evaluation {eval_id} is {evaluation.status}; only a queued or running one stops")
        api.cancel_evaluation(eval_id)
        return evaluation

    def evaluations(self, limit: int = 100) -> list[EvaluationRecord]:
        return self.store.list_evaluations(limit)

    def evaluation(self, eval_id: str) -> EvaluationRecord:
        return self.store.get_evaluation(eval_id)

    def evaluation_results(self, eval_id: str) -> tuple[list[EvaluationScoreRecord], list[EvaluationExampleRecord],
                                                        list[EvaluationAnswerRecord]]:
        """(scores per row and metric, examples, answers) of one evaluation."""
        return (self.store.evaluation_scores(eval_id), self.store.evaluation_examples(eval_id),
                self.store.evaluation_answers(eval_id))

    def run_scores(self, run_ids: Iterable[str], metric: str) -> list[EvaluationScoreRecord]:
        """Every stored evaluation's score of these runs on `metric`, by step: the markers on the metric curves."""
        return self.store.run_scores(run_ids, metric)

    def votes(self, run_ids: Iterable[str]) -> dict[str, VoteCounts]:
        """Blind A/B votes won and lost by each run, over every chat: the human score beside the automatic ones."""
        return {run_id: self.store.votes_for_run(run_id) for run_id in run_ids}


__all__ = ["StudioService", "ServiceError", "ConfigError", "check_config"]
