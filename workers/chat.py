"""Chat on the `chat` queue: several rows answer the same conversation side by side, each with its own adapter (or
none) on a shared base, or with a whole fine-tuned model of its own.

A request is a plain dict (it travels as JSON):

    {"base_model": "SmolLM2-135M-Instruct",             # a model name or folder; None: the default model
     "rows": [{"label": "base", "adapter_path": None},   # the base alone
              {"label": "mora r=8", "adapter_path": "/data/runs/abc/adapter"},
              {"label": "full", "model_path": "/data/runs/def/model"}],   # a whole model (full fine-tune, ReMoRA)
     "messages": [{"role": "user", "content": "..."}],   # or "conversations": one list of messages per row
     "settings": {"max_new_tokens": 256, "temperature": 0.7, "top_p": 0.9, "seed": None}}

Rows on the same model answer in one batched `stream_chat`, so N adapters cost one copy of the base. The engine keeps
models resident (least recently used evicted past `max_models`) and, per model, adapters (past `max_adapters`, removed
with `mora.remove_adapter`). Both are keyed by folder and re-checked against the files' modification times, so a
folder trained again is loaded again. Every problem with a request reaches the caller as a message naming the row and
what is wrong, never as a traceback.

Every request is bounded: the conversation is counted in tokens against the model's context before anything is
generated, a stop flag (the page's Stop button, or the page gone) is read between tokens, and a time limit
(`MORA_CHAT_TIME_LIMIT_S`) ends the longest answers. A stopped answer ends cleanly: its last snapshot holds what was
generated and says why it stopped.
"""
from __future__ import annotations

import concurrent.futures
import gc
import itertools
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Optional, TypeVar

import redis
import torch

import mora
from workers import bus
from workers.generation import GenerationSettings, LengthError, Message, stream_chat
from workers.model_loading import load_model
from workers.models import ModelError, ModelInfo, resolve_model
from workers.settings import chat_max_adapters, chat_time_limit_s

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_MODELS = 2
PUBLISH_EVERY_S = 0.05
STOP_POLL_S = 0.05  # how often the stop flag is read while tokens come: a Stop takes effect within this and a token

Publish = Callable[[list[str], bool, Optional[str], Optional[str]], None]
"""Receives snapshots: every row's text so far, whether the answer is complete, an error message or None, and why
the answer was stopped early or None."""
Loader = Callable[..., tuple[Any, Any]]


class ChatError(ValueError):
    """A request the engine cannot answer; the message names the row(s) and the problem."""


def _rows_named(labels: list[str], problem: str) -> ChatError:
    quoted = ", ".join(repr(label) for label in labels)
    return ChatError(f"{'row' if len(labels) == 1 else 'rows'} {quoted}: {problem}")


# ---- the request ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChatRow:
    label: str
    adapter_path: Optional[str] = None
    model_path: Optional[str] = None


@dataclass
class ChatRequest:
    base_model: Optional[str]
    rows: list[ChatRow]
    conversations: list[list[Message]]  # one per row
    settings: GenerationSettings

    @classmethod
    def from_dict(cls, request: Any) -> "ChatRequest":
        if not isinstance(request, dict):
            raise ChatError(f"a chat request is an object, found {type(request).__name__}")
        raw_rows = request.get("rows")
        if not isinstance(raw_rows, list) or not raw_rows:
            raise ChatError("'rows' must be a non-empty list of {label, adapter_path, model_path}")
        rows = [_row(index, raw) for index, raw in enumerate(raw_rows)]
        if "conversations" in request:
            conversations = request["conversations"]
            if not isinstance(conversations, list) or len(conversations) != len(rows):
                raise ChatError(f"'conversations' must hold one conversation per row ({len(rows)})")
            for row, conversation in zip(rows, conversations):
                _check_conversation(f"row {row.label!r}: the conversation", conversation)
        else:
            _check_conversation("'messages'", request.get("messages"))
            conversations = [request["messages"]] * len(rows)
        base_model = request.get("base_model")
        if base_model is not None and not isinstance(base_model, str):
            raise ChatError(f"'base_model' must be a model name or folder, found {type(base_model).__name__}")
        return cls(base_model, rows, [list(c) for c in conversations], _settings(request.get("settings") or {}))


def _row(index: int, raw: Any) -> ChatRow:
    if not isinstance(raw, dict):
        raise ChatError(f"row {index + 1}: expected an object with label, adapter_path, model_path; "
                        f"found {type(raw).__name__}")
    label = str(raw.get("label") or f"row {index + 1}")
    for key in ("adapter_path", "model_path"):
        if raw.get(key) is not None and not isinstance(raw[key], str):
            raise _rows_named([label], f"{key} must be a folder path, found {type(raw[key]).__name__}")
    return ChatRow(label, raw.get("adapter_path") or None, raw.get("model_path") or None)


def _check_conversation(what: str, conversation: Any) -> None:
    if not isinstance(conversation, list) or not conversation:
        raise ChatError(f"{what} must be a non-empty list of {{role, content}} messages")
    for position, message in enumerate(conversation, 1):
        if not (isinstance(message, dict) and isinstance(message.get("role"), str)
                and isinstance(message.get("content"), str)):
            raise ChatError(f"{what}: message {position} must be {{role: str, content: str}}, found {message!r}")


def _settings(raw: Any) -> GenerationSettings:
    known = {f.name for f in fields(GenerationSettings)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise ChatError(f"settings: expected an object with {', '.join(sorted(known))}, found {raw!r}")
    try:
        settings = GenerationSettings(**{key: value for key, value in raw.items() if value is not None
                                         or key == "seed"})
        settings.max_new_tokens = int(settings.max_new_tokens)
        settings.temperature, settings.top_p = float(settings.temperature), float(settings.top_p)
        settings.seed = None if settings.seed is None else int(settings.seed)
        settings.validate()
    except (TypeError, ValueError) as error:
        raise ChatError(f"settings: {error}") from error
    return settings


# ---- the engine ---------------------------------------------------------------------------------------------------

class StopCheck:
    """Whether a request should end now: its stop flag was set, or it has run for `time_limit_s`. The first reason
    found is kept, to tell the caller why its answer ended early. The flag is read at most every `poll_s`."""

    def __init__(self, requested: Callable[[], bool], time_limit_s: float, poll_s: float = STOP_POLL_S) -> None:
        self.requested, self.time_limit_s, self.poll_s = requested, time_limit_s, poll_s
        self.deadline = time.monotonic() + time_limit_s
        self.reason: Optional[str] = None
        self._polled = float("-inf")

    def __call__(self) -> bool:
        if self.reason is None:
            now = time.monotonic()
            if now >= self.deadline:
                self.reason = (f"stopped at the time limit of {self.time_limit_s:g} s (MORA_CHAT_TIME_LIMIT_S); "
                               f"ask for a shorter answer (max new tokens) or raise the limit")
            elif now - self._polled >= self.poll_s:
                self._polled = now
                if self.requested():
                    self.reason = "stopped on request"
        return self.reason is not None


def folder_signature(folder: Path) -> tuple:
    """The modification times of a folder and the files in it: they change when it is written again."""
    entries = [(".", folder.stat().st_mtime_ns)]
    entries += sorted((f.name, f.stat().st_mtime_ns) for f in folder.iterdir() if f.is_file())
    return tuple(entries)


@dataclass
class ResidentModel:
    model: Any
    tokenizer: Any
    signature: tuple
    adapters: "OrderedDict[Path, tuple[str, tuple]]" = field(default_factory=OrderedDict)
    """Adapter folder → (its name on the model, the folder's signature when loaded), least recently used first."""


@dataclass
class _Group:
    """The rows that answer together: one model, one batched generation."""

    model: ModelInfo
    rows: list[int]


class ModelTurns:
    """Every use of the resident models, run on one thread of their own, in the order asked.

    The chat worker runs two jobs at once (an evaluation and a chat, say) that share its models; the evaluation asks
    for a turn per batch, so a chat sent meanwhile waits for one batch, not the whole evaluation (first come, first
    served: the turns queue). One thread matters as much as the order: each OS thread that runs torch ops gets an
    OpenMP pool of its own, and once a process has more pool threads than cores libgomp stops spinning between
    parallel regions, so every small op of a decode step pays a wake-up (a 32-row SmolLM2 step: 230 ms against 142).
    Turns do not nest: a turn that asks for another waits for itself."""

    def __init__(self) -> None:
        self._thread = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="models")

    def run(self, job: Callable[[], T]) -> T:
        """`job()` on the models' thread once the turns asked before it are done; its result or its exception."""
        return self._thread.submit(job).result()


class ChatEngine:
    """Keeps models and adapters resident between requests and answers a request's rows, batched per model."""

    def __init__(self, max_models: int = MAX_MODELS, max_adapters: Optional[int] = None, load: Loader = load_model,
                 device: Optional[str] = None, time_limit_s: Optional[float] = None) -> None:
        self.max_models, self._load = max_models, load
        self.max_adapters = max_adapters if max_adapters is not None else chat_max_adapters()
        self.time_limit_s = time_limit_s if time_limit_s is not None else chat_time_limit_s()
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.models: "OrderedDict[Path, ResidentModel]" = OrderedDict()
        self._names = itertools.count(1)
        self.turns = ModelTurns()  # one generation at a time (chat, API, evaluation batch), in the order they came

    def run(self, request: Any, publish: Publish, stop_requested: Callable[[], bool] = lambda: False) -> None:
        """Answer `request`, handing every snapshot to `publish`; the last one has done=True (and maybe an error,
        or the reason it was stopped). `stop_requested()` is asked between tokens; the time limit counts from here."""
        self.turns.run(lambda: self._run(request, publish, stop_requested))

    def _run(self, request: Any, publish: Publish, stop_requested: Callable[[], bool]) -> None:
        texts: list[str] = []
        stop = StopCheck(stop_requested, self.time_limit_s)
        try:
            parsed = ChatRequest.from_dict(request)
            texts = [""] * len(parsed.rows)
            groups = self._plan(parsed)
            for group in groups:
                if stop():
                    break
                self._answer(parsed, group, texts, publish, stop)
        except ChatError as error:
            publish(list(texts), True, str(error), None)
            return
        except Exception as error:  # a bug or the machine's failure: the caller still gets an answer
            log.exception("chat request failed")
            publish(list(texts), True, f"chat failed ({type(error).__name__}: {error})", None)
            return
        publish(list(texts), True, None, stop.reason)

    def _plan(self, request: ChatRequest) -> list[_Group]:
        """Resolve every model and check every adapter folder before anything loads, so a bad row fails fast."""
        wanted: dict[Optional[str], list[int]] = {}
        for index, row in enumerate(request.rows):
            wanted.setdefault(row.model_path or request.base_model, []).append(index)
        groups: dict[Path, _Group] = {}
        for name, indices in wanted.items():
            try:
                info = resolve_model(name)
            except ModelError as error:
                raise _rows_named([request.rows[i].label for i in indices], str(error)) from error
            groups.setdefault(info.path, _Group(info, [])).rows.extend(indices)
        for row in request.rows:
            if row.adapter_path is not None:
                check_adapter_folder(row.label, row.adapter_path)
        return list(groups.values())

    def _answer(self, request: ChatRequest, group: _Group, texts: list[str], publish: Publish,
                stop: Callable[[], bool]) -> None:
        labels = [request.rows[i].label for i in group.rows]
        resident = self.model(group.model, labels)
        wanted = {Path(request.rows[i].adapter_path).expanduser().resolve()
                  for i in group.rows if request.rows[i].adapter_path}
        adapters = []
        for index in group.rows:
            row = request.rows[index]
            adapters.append(self.adapter(resident, Path(row.adapter_path), row.label, keep=wanted)
                            if row.adapter_path else None)
        publish(list(texts), False, None, None)
        try:
            for snapshot in stream_chat(resident.model, resident.tokenizer,
                                        [request.conversations[i] for i in group.rows], adapters, request.settings,
                                        should_stop=stop):
                for index, text in zip(group.rows, snapshot):
                    texts[index] = text
                publish(list(texts), False, None, None)
        except LengthError as error:  # refused before generating: the message has the numbers and what to change
            raise _rows_named([labels[i] for i in error.rows], str(error)) from error
        except Exception as error:  # the model's own failure (out of memory, a prompt past its context)
            log.exception("chat generation failed on %s", group.model.path)
            raise _rows_named(labels, f"generation failed ({type(error).__name__}: {error})") from error

    def model(self, info: ModelInfo, labels: list[str]) -> ResidentModel:
        """The model of `info`, loaded unless it is resident and its folder unchanged."""
        resident = self.models.get(info.path)
        if resident is not None and info.path.is_dir() and resident.signature == folder_signature(info.path):
            self.models.move_to_end(info.path)
            return resident
        self._drop_model(info.path)
        while len(self.models) >= self.max_models:
            self._drop_model(next(iter(self.models)))
        try:
            model, tokenizer = self._load(info.path if info.prepared else info.name, device=self.device)
        except ModelError as error:
            raise _rows_named(labels, str(error)) from error
        self.models[info.path] = ResidentModel(model.eval(), tokenizer, folder_signature(info.path))
        return self.models[info.path]

    def _drop_model(self, path: Path) -> None:
        if self.models.pop(path, None) is not None:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def adapter(self, resident: ResidentModel, folder: Path, label: str, keep: set[Path] = frozenset()) -> str:
        """The name under which the adapter in `folder` is attached to the resident model, loading it if needed.
        Adapters in `keep` (the ones the current request uses) are never evicted to make room."""
        folder = folder.expanduser().resolve()
        signature = folder_signature(folder)
        if folder in resident.adapters:
            name, loaded_signature = resident.adapters[folder]
            if loaded_signature == signature:
                resident.adapters.move_to_end(folder)
                return name
            self._drop_adapter(resident, folder)
        evictable = [path for path in resident.adapters if path not in keep]
        while len(resident.adapters) >= self.max_adapters and evictable:
            self._drop_adapter(resident, evictable.pop(0))
        name = f"chat{next(self._names)}"
        try:
            mora.load_adapter(resident.model, folder, name=name, activate=False)
            _check_fits(resident.model, name, folder)
        except (mora.AdapterFormatError, ValueError, KeyError, OSError) as error:
            if name in mora.adapter_names(resident.model):
                mora.remove_adapter(resident.model, name)
            raise _rows_named([label], f"the adapter does not fit {_model_name(resident)}: {error}") from error
        resident.adapters[folder] = (name, signature)
        return name

    def _drop_adapter(self, resident: ResidentModel, folder: Path) -> None:
        name, _ = resident.adapters.pop(folder)
        mora.remove_adapter(resident.model, name)


def check_adapter_folder(label: str, path: str) -> None:
    """Refuse, naming the row, a folder that does not exist or holds no adapter, before any model loads."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise _rows_named([label], f"adapter folder {folder} does not exist")
    try:
        mora.read_adapter_config(folder)
    except mora.AdapterFormatError as error:
        raise _rows_named([label], str(error)) from error


def _model_name(resident: ResidentModel) -> str:
    return str(getattr(resident.model.config, "_name_or_path", "") or "the model")


def _check_fits(model, name: str, folder: Path) -> None:
    """A MoRA M of any size loads onto any layer, so compare each layer's M with the side r gives on this model: a
    different side means the adapter was trained on another model. (LoRA's shapes are checked when loading.)"""
    info = mora.adapter_info(model, name)
    if info.kind != "mora":
        return
    layers = mora.adapted_layers(model)
    for path, side in info.r_hat.items():
        layer = layers[path]
        expected = mora.r_hat(layer.in_features, layer.out_features, info.r, info.variant)
        if side != expected:
            raise mora.AdapterFormatError(
                f"{folder}: {path} holds a {side}×{side} M, but r={info.r} ({info.variant}) on this model's "
                f"{layer.in_features}→{layer.out_features} layer gives {expected}×{expected}; it was trained on "
                f"another model")


_engine: Optional[ChatEngine] = None


def default_engine() -> ChatEngine:
    """The worker's one engine: its resident models outlive a request."""
    global _engine
    if _engine is None:
        _engine = ChatEngine()
    return _engine


def run_chat(request: Any, publish: Publish, stop_requested: Callable[[], bool] = lambda: False) -> None:
    """Answer a chat request (see the module's docstring) with the worker's engine."""
    default_engine().run(request, publish, stop_requested)


# ---- on the queue -------------------------------------------------------------------------------------------------

class SnapshotPublisher:
    """Writes snapshots to the request's Redis stream, at most one every `every_s` seconds, and always the last one.

    Each snapshot holds every row's whole text, so one skipped is made good by the next. A lost connection skips an
    intermediate snapshot; the final one must arrive, so its failure propagates."""

    def __init__(self, client: redis.Redis, request_id: str, every_s: float = PUBLISH_EVERY_S) -> None:
        self.client, self.request_id, self.every_s = client, request_id, every_s
        self._last = float("-inf")

    def __call__(self, texts: list[str], done: bool, error: Optional[str], stopped: Optional[str] = None,
                 extra: Optional[dict[str, Any]] = None) -> None:
        final = done or error is not None
        now = time.monotonic()
        if not final and now - self._last < self.every_s:
            return
        try:
            bus.add_chat_snapshot(self.client, self.request_id, texts, final, error, stopped, extra)
            self._last = now
        except redis.RedisError:
            if final:
                raise


def run_queued_chat(url: str, request_id: str, request: Any) -> None:
    """Answer a chat request from the queue onto its stream. An empty snapshot goes out first, so the caller knows
    a worker has the request while the models load; a redelivered job that already answered does nothing, and one
    stopped while it waited in the queue generates nothing."""
    client = bus.connect(url)
    previous = bus.last_chat_snapshot(client, request_id)
    if previous is not None and previous["done"]:
        return
    publish = SnapshotPublisher(client, request_id)
    rows = request.get("rows") if isinstance(request, dict) else None
    empty = [""] * len(rows) if isinstance(rows, list) else []

    def stop_requested() -> bool:
        try:
            return bus.chat_stop_requested(client, request_id)
        except redis.RedisError:  # Redis restarting: go on; the time limit still bounds the answer
            return False

    if stop_requested():
        publish(empty, True, None, "stopped on request")
        return
    publish(empty, False, None)
    run_chat(request, publish, stop_requested)
