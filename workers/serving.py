"""The OpenAI-compatible API's side on a chat worker: requests that arrive together are answered in one batched
generation, one row per request, each with its own adapter, settings and stop strings, on one resident base.

The web process (`app.openai_api`, through `workers.api.start_serving`) pushes each request onto one Redis list
(`bus.SERVE_PENDING`) and sends a doorbell task to the chat queue. The worker that takes a doorbell waits until the
oldest waiting request is `MORA_SERVE_WINDOW_MS` old, takes every waiting request (at most `MORA_SERVE_MAX_BATCH`) and
answers them grouped by model: one `stream_rows` per base, adapters per row from the engine's LRU cache, the base
loaded once. A doorbell that finds the list empty does nothing: an earlier one took its request.

A request (JSON):

    {"id": "…", "base_model": "tiny-llama" or None (the default model), "adapter_path": folder or None,
     "model_path": folder or None (a whole fine-tuned model), "messages": [{role, content}] or "prompt": "text",
     "settings": {"max_new_tokens", "temperature", "top_p", "seed"}, "stop": ["…"],
     "enqueued_at": epoch seconds, "expires_at": epoch seconds}

Its answer goes on its chat stream (`bus.add_chat_snapshot`, one text) with `extra`: `{"state": "taken"}` as soon as a
worker has it, then `prompt_tokens` in every snapshot once it is accepted, and in the last one `completion_tokens`,
`finish_reason` ("stop" or "length"), `batch_id` and `batch_size`. A request refused gets an error with `error_type`
("invalid_request_error", "not_found_error" or "server_error") and the `param` at fault.
"""
from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import redis

from workers import bus
from workers.chat import (PUBLISH_EVERY_S, STOP_POLL_S, ChatEngine, ChatError, SnapshotPublisher, StopCheck,
                          _check_conversation, _settings, check_adapter_folder, default_engine)
from workers.generation import GenerationSettings, LengthError, check_lengths, context_length, render_prompt, \
    stream_rows
from workers.models import ModelError, ModelInfo, resolve_model
from workers.settings import SettingError, serve_max_batch, serve_window_ms

log = logging.getLogger(__name__)

API_NAMES = {"max_new_tokens": "max_tokens"}  # the worker's setting names as the API calls them
MAX_WINDOWS = 4  # requests that keep arriving are collected for at most this many windows before answering
HEARTBEAT_S = 1.0  # an answer that shows no new text still sends a snapshot this often, so its reader never gives up


class ServeError(ValueError):
    """A request the worker cannot answer: the message, the OpenAI error type and the parameter at fault."""

    def __init__(self, message: str, error_type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.error_type, self.param, self.code = error_type, param, code


@dataclass
class ServeRequest:
    id: str
    model: Optional[str]  # a model name or folder, None: the default model
    adapter_path: Optional[str]
    messages: Optional[list[dict[str, str]]]
    prompt: Optional[str]
    settings: GenerationSettings
    stop: list[str]
    publish: SnapshotPublisher
    prompt_ids: list[int] = field(default_factory=list)
    finished: bool = False
    last_text: str = ""
    last_sent: float = float("-inf")

    @property
    def label(self) -> str:
        return f"request {self.id}"

    def send(self, text: str, done: bool = False, error: Optional[ServeError] = None,
             stopped: Optional[str] = None, force: bool = True, **extra: Any) -> None:
        """Publish a snapshot; one that is neither final nor forced goes out only if its text changed, at most every
        PUBLISH_EVERY_S, and at least every HEARTBEAT_S."""
        now = time.monotonic()
        final = done or error is not None
        if not (final or force):
            since = now - self.last_sent
            if not ((text != self.last_text and since >= PUBLISH_EVERY_S) or since >= HEARTBEAT_S):
                return
        if error is not None:
            extra = {"error_type": error.error_type, "param": error.param, "code": error.code}
        elif self.prompt_ids:
            extra = {"prompt_tokens": len(self.prompt_ids), **extra}
        self.publish([text], done, str(error) if error is not None else None, stopped, extra)
        self.last_text, self.last_sent = text, now
        self.finished = self.finished or final


def refuse(publish: SnapshotPublisher, error: ServeError) -> None:
    """A request's last snapshot: the error, its OpenAI type and the parameter at fault."""
    publish([""], True, str(error), None, {"error_type": error.error_type, "param": error.param, "code": error.code})


def parse_request(raw: Any, publish: SnapshotPublisher) -> ServeRequest:
    """A request as the web process sent it, checked with the chat's own checks (conversation, settings)."""
    if not isinstance(raw, dict):
        raise ServeError(f"a request is an object, found {type(raw).__name__}")
    messages, prompt = raw.get("messages"), raw.get("prompt")
    if (messages is None) == (prompt is None):
        raise ServeError("a request has either 'messages' or 'prompt'", param="messages")
    if messages is not None:
        try:
            _check_conversation("messages", messages)
        except ChatError as error:
            raise ServeError(str(error), param="messages") from None
    elif not isinstance(prompt, str) or not prompt:
        raise ServeError("prompt: give the text to complete", param="prompt")
    try:
        settings = _settings(raw.get("settings") or {})
    except ChatError as error:
        text = str(error).removeprefix("settings: ")
        name = text.split(" ", 1)[0].rstrip(":")
        raise ServeError(text.replace(name, API_NAMES.get(name, name), 1), param=API_NAMES.get(name, name)) from None
    stop = raw.get("stop") or []
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise ServeError("stop: a list of non-empty strings", param="stop")
    model = raw.get("model_path") or raw.get("base_model")
    adapter = raw.get("adapter_path")
    if (model is not None and not isinstance(model, str)) or (adapter is not None and not isinstance(adapter, str)):
        raise ServeError("base_model, model_path and adapter_path are names or folders", param="model")
    return ServeRequest(str(raw.get("id")), model, adapter, messages, prompt, settings, stop, publish)


def _enqueued_at(item: Optional[str]) -> float:
    try:
        return float(json.loads(item).get("enqueued_at", 0))
    except (ValueError, TypeError, AttributeError):
        return 0.0


def take_waiting(client: redis.Redis, window_s: float, max_batch: int) -> list[dict[str, Any]]:
    """Every request waiting (at most `max_batch`), once none has arrived for `window_s` (counted from the oldest,
    then from the newest, at most MAX_WINDOWS windows in all), so a burst is answered together. Requests whose caller
    has given up (past `expires_at`, or stopped) are dropped unanswered."""
    head = client.lindex(bus.SERVE_PENDING, 0)
    if head is None:
        return []
    started = time.monotonic()
    wait = min(window_s, _enqueued_at(head) + window_s - time.time())  # another host's clock may be off
    while wait > 0:
        time.sleep(wait)
        if client.llen(bus.SERVE_PENDING) >= max_batch:
            break
        newest = client.lindex(bus.SERVE_PENDING, -1)
        wait = min(window_s, _enqueued_at(newest) + window_s - time.time(),
                   started + MAX_WINDOWS * window_s - time.monotonic())
    taken = client.lpop(bus.SERVE_PENDING, max_batch) or []
    now, waiting = time.time(), []
    for item in taken:
        try:
            request = json.loads(item)
        except ValueError:
            log.warning("dropped an API request that is not JSON: %.80r", item)
            continue
        if not isinstance(request, dict) or not request.get("id"):
            log.warning("dropped an API request without an id: %.80r", item)
            continue
        expires_at = request.get("expires_at")
        if (isinstance(expires_at, (int, float)) and expires_at < now) or bus.chat_stop_requested(
                client, str(request["id"])):
            continue
        waiting.append(request)
    return waiting


@dataclass
class _Batch:
    """The requests on one model: one batched generation."""

    model: ModelInfo
    requests: list[ServeRequest]


class Server:
    """Answers batches of API requests with a chat engine (its resident models and adapter cache, shared with the
    Chat tab's requests) and publishes each request's answer on its own stream."""

    def __init__(self, client: redis.Redis, engine: Optional[ChatEngine] = None) -> None:
        self.client = client
        self.engine = engine or default_engine()

    def answer(self, raw_requests: list[dict[str, Any]]) -> None:
        requests = []
        for raw in raw_requests:
            publish = SnapshotPublisher(self.client, str(raw["id"]), every_s=0)  # `ServeRequest.send` paces it
            try:
                request = parse_request(raw, publish)
            except ServeError as error:
                refuse(publish, error)
                continue
            request.send("", state="taken")
            requests.append(request)
        def answer_all() -> None:
            for batch in self._batches(requests):
                self._answer_batch(batch)

        self.engine.turns.run(answer_all)

    def _batches(self, requests: list[ServeRequest]) -> list[_Batch]:
        """Requests grouped by model; those naming a model or adapter that is not there are answered at once."""
        batches: dict[Path, _Batch] = {}
        for request in requests:
            try:
                info = resolve_model(request.model)
                if request.adapter_path is not None:
                    check_adapter_folder(request.label, request.adapter_path)
            except (ModelError, ChatError) as error:
                request.send("", error=ServeError(str(error), "not_found_error", "model", "model_not_found"))
                continue
            batches.setdefault(info.path, _Batch(info, [])).requests.append(request)
        return list(batches.values())

    def _answer_batch(self, batch: _Batch) -> None:
        requests = batch.requests
        try:
            resident = self.engine.model(batch.model, [r.label for r in requests])
        except (ChatError, ModelError) as error:
            for request in requests:
                request.send("", error=ServeError(str(error), "server_error"))
            return
        keep = {Path(r.adapter_path).expanduser().resolve() for r in requests if r.adapter_path}
        ready, adapters = [], []
        for request in requests:
            try:
                adapter = (self.engine.adapter(resident, Path(request.adapter_path), request.label, keep=keep)
                           if request.adapter_path else None)
                request.prompt_ids = self._prompt(resident.tokenizer, request)
                check_lengths([request.prompt_ids], request.settings.max_new_tokens, context_length(resident.model))
            except LengthError as error:
                param = "max_tokens" if str(error).startswith("max_new_tokens") else (
                    "messages" if request.messages is not None else "prompt")
                message = str(error).replace("max_new_tokens", "max_tokens").replace("max new tokens", "max_tokens")
                request.send("", error=ServeError(message, param=param, code="context_length_exceeded"))
                continue
            except ChatError as error:  # the adapter does not fit this model
                request.send("", error=ServeError(str(error), "server_error", "model"))
                continue
            request.send("")  # accepted: its prompt's length goes out before anything is generated
            ready.append(request)
            adapters.append(adapter)
        if not ready:
            return
        batch_id = uuid.uuid4().hex[:12]
        log.info("batch %s: %d API request(s), %d adapter(s), on %s in one generation", batch_id, len(ready),
                 len({r.adapter_path for r in ready}), batch.model.name)
        stop = StopCheck(lambda: False, self.engine.time_limit_s)
        leaving = _Leaving(self.client, ready)
        outputs = []
        try:
            for outputs in stream_rows(resident.model, resident.tokenizer, [r.prompt_ids for r in ready], adapters,
                                       [r.settings for r in ready], [r.stop for r in ready], should_stop=stop,
                                       rows_to_end=leaving):
                for request, output in zip(ready, outputs):
                    if request.finished:
                        continue
                    if output.finish_reason is not None:
                        request.send(output.text, True, None, None, completion_tokens=output.tokens,
                                     finish_reason=output.finish_reason, batch_id=batch_id, batch_size=len(ready))
                    else:
                        request.send(output.text, force=False)
        except Exception as error:  # the model's own failure (out of memory): every caller still gets an answer
            log.exception("batch %s failed", batch_id)
            for request in ready:
                if not request.finished:
                    request.send("", error=ServeError(f"generation failed ({type(error).__name__}: {error})",
                                                      "server_error"))
            return
        for request, output in zip(ready, outputs):  # the whole batch stopped (the time limit)
            if not request.finished:
                request.send(output.text, True, None, stop.reason, completion_tokens=output.tokens,
                             finish_reason="length", batch_id=batch_id, batch_size=len(ready))

    @staticmethod
    def _prompt(tokenizer, request: ServeRequest) -> list[int]:
        if request.messages is not None:
            return render_prompt(tokenizer, request.messages)
        return list(tokenizer(request.prompt)["input_ids"])


class _Leaving:
    """The rows whose caller has left (its stop flag set: the client disconnected), read at most every poll_s."""

    def __init__(self, client: redis.Redis, requests: list[ServeRequest], poll_s: float = STOP_POLL_S) -> None:
        self.client, self.requests, self.poll_s = client, requests, poll_s
        self.rows: set[int] = set()
        self._polled = float("-inf")

    def __call__(self) -> set[int]:
        now = time.monotonic()
        if now - self._polled >= self.poll_s:
            self._polled = now
            try:
                pipe = self.client.pipeline(transaction=False)
                for request in self.requests:
                    pipe.exists(bus.chat_stop_key(request.id))
                flags = pipe.execute()
            except redis.RedisError:  # Redis restarting: go on; the time limit still bounds the batch
                return self.rows
            self.rows |= {row for row, flag in enumerate(flags) if flag}
        return self.rows


def run_waiting_requests(url: str) -> None:
    """The doorbell task: answer every API request waiting, in batches."""
    client = bus.connect(url)
    try:
        window_s, max_batch = serve_window_ms() / 1000, serve_max_batch()
        server = Server(client)
    except SettingError as error:  # every waiting caller hears why, instead of waiting for nobody
        for raw in take_waiting(client, 0.0, 256):
            refuse(SnapshotPublisher(client, str(raw["id"]), every_s=0),
                   ServeError(f"the chat worker cannot answer: {error}", "server_error"))
        return
    waiting = take_waiting(client, window_s, max_batch)
    if waiting:
        server.answer(waiting)
