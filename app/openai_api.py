"""The OpenAI-compatible API, served by the web process on its own FastAPI app and port: `GET /v1/models`,
`POST /v1/chat/completions` and `POST /v1/completions`, streamed (server-sent events ending in `data: [DONE]`) or not.

A model is a base model's name, or a succeeded run's id or name (its adapter on its base, or its whole model). Each
request becomes one job for the chat workers (`workers.api.start_serving`), and requests that arrive together are
answered in one batched generation, one row each (`workers.serving`). This process checks a request's shape and
follows its answer's stream; the worker checks the settings and counts the prompt's tokens against the model's
context with the chat's own checks, and its refusals come back here as OpenAI errors with their status.

Keys: with MORA_API_KEYS set, every request carries one as a bearer token; unset, only clients on this machine are
answered, and none while the studio has a login (MORA_AUTH). A client that disconnects sets its request's stop flag,
and its row stops generating.
"""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Optional

import anyio
from fastapi.routing import APIRoute
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from app import settings
from app.service import StudioService
from workers import api
from workers.models import DEFAULT_MODEL_NAME, list_models
from workers.settings import chat_time_limit_s

log = logging.getLogger(__name__)

MAX_MESSAGES = 256
DRAIN_FACTOR = 16  # a refused body is read and dropped up to this many times the limit, so its sender sees the 413
MAX_STOP = 4
MAX_STOP_CHARS = 256
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat's default is the worker's (256)
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
STATUS_OF = {"invalid_request_error": 400, "not_found_error": 404, "server_error": 500}
# Parameters the API does not implement, with the values that ask for nothing (anything else is refused, by name).
NOT_IMPLEMENTED = {"n": (None, 1), "logprobs": (None, False, 0), "top_logprobs": (None, 0), "tools": (None, []),
                   "tool_choice": (None, "none"), "functions": (None, []), "function_call": (None, "none"),
                   "presence_penalty": (None, 0), "frequency_penalty": (None, 0), "logit_bias": (None, {}),
                   "echo": (None, False), "suffix": (None, ""), "best_of": (None, 1),
                   "response_format": (None, {"type": "text"})}


class APIError(Exception):
    """A refusal in OpenAI's error shape, with its HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None, headers: Optional[dict[str, str]] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def _refusal(update: dict[str, Any]) -> APIError:
    """The error a worker's last snapshot carries, or the reader's own (no worker took the request, or one fell
    silent), which says the studio is full or has no chat worker: 503."""
    extra = update.get("extra") or {}
    kind = extra.get("error_type")
    if kind is None:
        return APIError(503, update.get("error") or "the chat worker sent no answer", "server_error",
                        code="worker_unavailable", headers={"Retry-After": "5"})
    return APIError(STATUS_OF.get(kind, 500), update["error"], kind, extra.get("param"), extra.get("code"))


async def _discard_rest(request: Request, budget: int) -> None:
    """Reads and drops what is left of a refused body, up to `budget` bytes, before the 413 is sent.

    A server that answers without reading closes a socket with unread data, which the kernel turns into a reset:
    the client, still sending, gets a broken connection instead of the 413 that says what to change. Draining a
    bounded amount (memory stays one chunk) lets an ordinary oversized request read its answer; beyond the budget
    the connection is dropped as before.
    """
    async for chunk in request.stream():
        budget -= len(chunk)
        if budget <= 0:
            return


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


@dataclass(frozen=True)
class ServedModel:
    """A name a request may give as `model`, and what the worker loads for it."""

    id: str
    created: int
    root: str  # the base model
    target: dict[str, Optional[str]]  # base_model / adapter_path / model_path, as `workers.serving` takes them

    def card(self) -> dict[str, Any]:
        return {"id": self.id, "object": "model", "created": self.created, "owned_by": "mora-studio",
                "root": self.root, "parent": None if self.target.get("adapter_path") is None else self.root}


def catalog(service: StudioService) -> dict[str, ServedModel]:
    """Every servable name: each base model, each succeeded run by id, and by name where the name is its own."""
    models: dict[str, ServedModel] = {}
    for info in list_models():
        created = int(info.path.stat().st_mtime) if info.path.exists() else 0
        models[info.name] = ServedModel(info.name, created, info.name, {"base_model": info.name})
    runs = [run for run in service.runs(status="succeeded") if run.output_dir]
    by_run = {}
    for run in runs:
        base = run.model or DEFAULT_MODEL_NAME
        target = ({"model_path": run.output_dir} if run.output_kind == "model" else
                  {"base_model": run.model or None, "adapter_path": run.output_dir})
        by_run[run.id] = ServedModel(run.id, int(run.created_at.timestamp()), base, target)
    models.update(by_run)
    names = [run.name for run in runs]
    for run in runs:
        if names.count(run.name) == 1 and run.name not in models:
            models[run.name] = ServedModel(run.name, by_run[run.id].created, by_run[run.id].root,
                                           by_run[run.id].target)
    return models


# ---- what a request says --------------------------------------------------------------------------------------

def _number(body: dict[str, Any], name: str, default: Optional[float]) -> Optional[float]:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise APIError(400, f"{name}: a number, found {json.dumps(value)[:80]}", param=name)
    return value


def _integer(body: dict[str, Any], name: str, low: int, high: int) -> Optional[int]:
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise APIError(400, f"{name}: a whole number from {low} to {high}, found {json.dumps(value)[:80]}",
                       param=name)
    return value


def _messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages: a non-empty list of {role, content}", param="messages")
    if len(messages) > MAX_MESSAGES:
        raise APIError(400, f"messages: at most {MAX_MESSAGES} messages, found {len(messages):,}", param="messages")
    parsed = []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise APIError(400, f"{where}: an object with role and content", param=where)
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise APIError(400, f"{where}.role: {json.dumps(role)[:40]} is not one of system, developer, user, "
                                "assistant (tool calls are not supported)", param=f"{where}.role")
        if isinstance(content, list):  # content parts: text only
            if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                       for p in content):
                raise APIError(400, f"{where}.content: only text parts ({{type: text, text}}) are supported",
                               param=f"{where}.content")
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise APIError(400, f"{where}.content: a string", param=f"{where}.content")
        parsed.append({"role": ROLES[role], "content": content})
    return parsed


def _prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise APIError(400, "prompt: one non-empty string (send one prompt per request; token lists are not "
                            "supported)", param="prompt")
    if len(prompt) > api.MAX_CONVERSATION_CHARS:
        raise APIError(400, f"prompt: {len(prompt):,} characters; at most {api.MAX_CONVERSATION_CHARS:,}",
                       param="prompt")
    return prompt


def _stops(body: dict[str, Any]) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else stop
    if not isinstance(stops, list) or len(stops) > MAX_STOP or not all(
            isinstance(s, str) and 0 < len(s) <= MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop: a string or a list of at most {MAX_STOP} strings, each 1 to {MAX_STOP_CHARS} "
                            "characters", param="stop")
    return stops


def _not_implemented(body: dict[str, Any]) -> None:
    for name, allowed in NOT_IMPLEMENTED.items():
        if name in body and body[name] not in allowed:
            raise APIError(400, f"{name}: not supported by this server (leave it out)", param=name)


def build_job(body: dict[str, Any], model: ServedModel, chat: bool) -> dict[str, Any]:
    """The worker's request (`workers.serving`) for an API request body; shapes and types checked here, the
    settings' bounds by the worker."""
    _not_implemented(body)
    max_tokens = _integer(body, "max_completion_tokens", -2**31, 2**31) if chat else None
    if max_tokens is None:
        max_tokens = _integer(body, "max_tokens", -2**31, 2**31)
    if max_tokens is None and not chat:
        max_tokens = COMPLETIONS_MAX_TOKENS
    job: dict[str, Any] = dict(model.target)
    if chat:
        job["messages"] = _messages(body)
    else:
        job["prompt"] = _prompt(body)
    job["settings"] = {"max_new_tokens": max_tokens, "temperature": _number(body, "temperature", 1.0),
                       "top_p": _number(body, "top_p", 1.0), "seed": _integer(body, "seed", -2**63, 2**64 - 1)}
    job["stop"] = _stops(body)
    return job


# ---- the routes -------------------------------------------------------------------------------------------------

class _Slot:
    """One of the MORA_API_MAX_PENDING requests the web process follows at once; released once, whatever ends it."""

    def __init__(self, owner: "OpenAIAPI") -> None:
        self.owner, self.held = owner, True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.owner.pending -= 1


class OpenAIAPI:
    """The routes, given to the web app's FastAPI app (`routes()`), over the studio's service."""

    def __init__(self, service: StudioService, keys: Optional[list[str]] = None, login: bool = False,
                 max_body_bytes: Optional[int] = None, max_pending: Optional[int] = None) -> None:
        self.service = service
        self.keys = [key.encode() for key in (keys if keys is not None else settings.api_keys())]
        self.login = login
        self.max_body_bytes = max_body_bytes or settings.api_max_body_kb() * 1024
        self.max_pending = max_pending or settings.api_max_pending()
        self.pending = 0
        self._limiter: Optional[anyio.CapacityLimiter] = None

    def routes(self) -> list[APIRoute]:
        return [APIRoute("/v1/models", self.models, methods=["GET"], include_in_schema=False),
                APIRoute("/v1/models/{model_id:path}", self.model, methods=["GET"], include_in_schema=False),
                APIRoute("/v1/chat/completions", self.chat_completions, methods=["POST"], include_in_schema=False),
                APIRoute("/v1/completions", self.completions, methods=["POST"], include_in_schema=False),
                APIRoute("/v1/{path:path}", self.unknown, methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
                         include_in_schema=False)]

    @property
    def limiter(self) -> anyio.CapacityLimiter:
        """Threads for the blocking reads of answers' streams, one per request followed at most."""
        if self._limiter is None:
            self._limiter = anyio.CapacityLimiter(self.max_pending + 4)
        return self._limiter

    async def _run(self, function, *args):
        return await anyio.to_thread.run_sync(function, *args, limiter=self.limiter)

    # -- checks ------------------------------------------------------------------------------------------------

    def authorize(self, request: Request) -> None:
        if self.keys:
            scheme, _, token = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise APIError(401, "This API needs a key: send `Authorization: Bearer KEY` with one of the keys in "
                                    "MORA_API_KEYS.", code="invalid_api_key")
            given = token.strip().encode()
            if not any(hmac.compare_digest(given, key) for key in self.keys):
                raise APIError(401, "Incorrect API key provided: it is not one of the keys in MORA_API_KEYS.",
                               code="invalid_api_key")
            return
        if self.login:
            raise APIError(401, "This studio has a login (MORA_AUTH), so its API needs keys too: set MORA_API_KEYS "
                                "and send one as `Authorization: Bearer KEY`.", code="invalid_api_key")
        client = request.client.host if request.client else ""
        if not _is_loopback(client):
            raise APIError(401, f"Without MORA_API_KEYS the API answers only this machine (loopback), not {client}: "
                                "set MORA_API_KEYS to call it from elsewhere.", code="invalid_api_key")

    async def read_body(self, request: Request) -> dict[str, Any]:
        limit = self.max_body_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _discard_rest(request, DRAIN_FACTOR * limit)
            raise APIError(413, f"the request body is {int(declared):,} bytes; at most {limit:,} "
                                "(MORA_API_MAX_BODY_KB)")
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                await _discard_rest(request, DRAIN_FACTOR * limit - size)
                raise APIError(413, f"the request body is over {limit:,} bytes (MORA_API_MAX_BODY_KB)")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, RecursionError) as error:
            raise APIError(400, f"the request body is not JSON ({str(error)[:200]})") from None
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        return body

    async def resolve(self, name: Any) -> ServedModel:
        if not isinstance(name, str) or not name:
            raise APIError(400, "model: name a base model or a run (GET /v1/models lists them)", param="model")
        models = await self._run(catalog, self.service)
        if name not in models:
            raise APIError(404, f"The model '{name[:200]}' does not exist: GET /v1/models lists the base models and "
                                "succeeded runs (by id, and by name where it is unique).", param="model",
                           code="model_not_found")
        return models[name]

    def take_slot(self) -> _Slot:
        if self.pending >= self.max_pending:
            raise APIError(429, f"The studio is following {self.pending} API requests, its most "
                                "(MORA_API_MAX_PENDING): try again shortly.", "rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": "1"})
        self.pending += 1
        return _Slot(self)

    # -- endpoints ---------------------------------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        try:
            self.authorize(request)
            models = await self._run(catalog, self.service)
        except APIError as error:
            return error.response()
        return JSONResponse({"object": "list", "data": [model.card() for model in models.values()]})

    async def model(self, request: Request, model_id: str) -> Response:
        try:
            self.authorize(request)
            return JSONResponse((await self.resolve(model_id)).card())
        except APIError as error:
            return error.response()

    async def unknown(self, request: Request, path: str) -> Response:
        return APIError(404, f"Unknown endpoint {request.method} /v1/{path[:200]}: this server has GET /v1/models, "
                             "POST /v1/chat/completions and POST /v1/completions.", code="unknown_url").response()

    async def chat_completions(self, request: Request) -> Response:
        return await self._complete(request, chat=True)

    async def completions(self, request: Request) -> Response:
        return await self._complete(request, chat=False)

    async def _complete(self, request: Request, chat: bool) -> Response:
        slot: Optional[_Slot] = None
        request_id: Optional[str] = None
        try:
            self.authorize(request)
            body = await self.read_body(request)
            model = await self.resolve(body.get("model"))
            job = build_job(body, model, chat)
            stream = body.get("stream") or False
            if not isinstance(stream, bool):
                raise APIError(400, "stream: true or false", param="stream")
            options = body.get("stream_options") or {}
            include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
            slot = self.take_slot()
            try:
                request_id = await self._run(api.start_serving, job)
            except api.ChatRefused as error:
                raise APIError(400, str(error), param="messages") from None
            except api.QueueUnavailable as error:
                raise APIError(503, str(error), "server_error", code="queue_unavailable",
                               headers={"Retry-After": "5"}) from None
            answer = _Answer(request_id, self, chat, str(body["model"]))
            accepted = await answer.accepted()
            if stream:
                response = StreamingResponse(answer.events(accepted, slot, include_usage),
                                             media_type="text/event-stream",
                                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
                slot = None  # the stream releases it when it ends
                return response
            return JSONResponse(await answer.whole(accepted, request))
        except APIError as error:
            if request_id is not None:
                await self._run(api.stop_chat, request_id)
            return error.response()
        except Exception as error:  # a bug or Redis failing mid-answer: still an answer in OpenAI's shape
            log.exception("API request failed")
            if request_id is not None:
                try:
                    await self._run(api.stop_chat, request_id)
                except Exception:
                    log.warning("could not set the stop flag of API request %s", request_id)
            return APIError(500, f"the request failed ({type(error).__name__}: {error})", "server_error").response()
        finally:
            if slot is not None:
                slot.release()


class _Answer:
    """One request's answer as the worker publishes it (whole texts; `extra` with the counts), turned into
    OpenAI's response or its stream of chunks."""

    def __init__(self, request_id: str, owner: OpenAIAPI, chat: bool, model: str) -> None:
        self.request_id, self.owner, self.chat, self.model = request_id, owner, chat, model
        self.updates = api.chat_updates(request_id, timeout_s=chat_time_limit_s() + 60)
        self.id = f"{'chatcmpl' if chat else 'cmpl'}-{request_id}"
        self.created = int(time.time())

    async def next(self) -> dict[str, Any]:
        update = await self.owner._run(next, self.updates, None)
        if update is None:  # the reader ended without a last word: cannot happen, but never hang on it
            return {"texts": [], "done": True, "error": "the answer's stream ended early"}
        return update

    async def accepted(self) -> dict[str, Any]:
        """The first snapshot after the worker accepted the request (its prompt counted); a refusal raises."""
        while True:
            update = await self.next()
            if update.get("error"):
                raise _refusal(update)
            if "prompt_tokens" in (update.get("extra") or {}):
                return update

    async def whole(self, update: dict[str, Any], request: Request) -> dict[str, Any]:
        while not update["done"]:
            if await request.is_disconnected():
                await self.owner._run(api.stop_chat, self.request_id)
                raise APIError(499, "the client closed the connection")
            update = await self.next()
        if update.get("error"):
            raise _refusal(update)
        extra, text = update.get("extra") or {}, _text(update)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                      "finish_reason": extra.get("finish_reason", "stop")}
        else:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": extra.get("finish_reason", "stop")}
        return {**self._head(), "choices": [choice], "usage": _usage(extra), "mora": _batch(extra)}

    def _head(self, chunk: bool = False) -> dict[str, Any]:
        kind = ("chat.completion.chunk" if chunk else "chat.completion") if self.chat else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model,
                "system_fingerprint": None}

    def _chunk(self, text: Optional[str], finish_reason: Optional[str] = None, first: bool = False,
               **more: Any) -> bytes:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if first else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": finish_reason}
        return _event({**self._head(chunk=True), "choices": [choice], **more})

    async def events(self, update: dict[str, Any], slot: _Slot, include_usage: bool) -> AsyncIterator[bytes]:
        finished, sent = False, ""
        try:
            if self.chat:
                yield self._chunk(None, first=True)
            while True:
                if update.get("error"):
                    yield _event(_refusal(update).body())
                    finished = True
                    return
                text = _text(update)
                if len(text) > len(sent):
                    delta, sent = text[len(sent):], text
                    yield self._chunk(delta)
                if update["done"]:
                    extra = update.get("extra") or {}
                    yield self._chunk(None, extra.get("finish_reason", "stop"), mora=_batch(extra))
                    if include_usage:
                        yield _event({**self._head(chunk=True), "choices": [], "usage": _usage(extra)})
                    yield b"data: [DONE]\n\n"
                    finished = True
                    return
                update = await self.next()
        finally:
            if not finished:  # the client went away: its row stops generating
                with anyio.CancelScope(shield=True):
                    try:
                        await self.owner._run(api.stop_chat, self.request_id)
                    except Exception:
                        log.warning("could not set the stop flag of API request %s", self.request_id)
            slot.release()


def _text(update: dict[str, Any]) -> str:
    return update["texts"][0] if update.get("texts") else ""


def _usage(extra: dict[str, Any]) -> dict[str, int]:
    prompt, completion = int(extra.get("prompt_tokens", 0)), int(extra.get("completion_tokens", 0))
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _batch(extra: dict[str, Any]) -> dict[str, Any]:
    """Not OpenAI's: which batched generation answered, and how many requests it answered together."""
    return {"batch_id": extra.get("batch_id"), "batch_size": extra.get("batch_size")}


def _event(payload: dict[str, Any]) -> bytes:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n".encode()


__all__ = ["OpenAIAPI", "APIError", "build_job", "catalog"]
