"""The Chat tab's logic: choose a base and up to four adapters, send one prompt, stream the answers side by side
(generated on the `chat` queue in one batched pass), save the conversation, stop an answer, and take blind A/B votes.

Each request's stream is followed by a thread of the web process (`AnswerFollower`), not by the page: the answers
are stored when the worker finishes, stops or fails, even if the page has gone. A page that goes away while its
answer streams (closed, reloaded, cancelled) sets the request's stop flag, so the worker does not generate for
nobody.
"""
from __future__ import annotations

import logging
import random
import threading
from typing import Any, Iterator, Optional

import gradio as gr

from app import datasets
from app.service import StudioService
from storage.records import DatasetRecord
from workers import api

log = logging.getLogger(__name__)

MAX_ROWS = 4
BASE_ONLY = "base"


def preview_for(dataset: Optional[DatasetRecord], model: Optional[str], max_length: int = 512) -> str:
    """The first examples as the model will see them, rendered by a worker (the web process loads no tokenizer)."""
    if dataset is None:
        return ""
    try:
        reply = api.call_worker("preview", {"path": dataset.path, "model": model, "max_length": max_length, "n": 3})
    except Exception as error:
        return f"<p>Preview unavailable: {error}</p>"
    if "error" in reply:
        return f"<p>⚠️ {reply['error']}</p>"
    examples = [[(text, bool(trained)) for text, trained in example] for example in reply["examples"]]
    note = "" if reply.get("has_chat_template", True) else "<p>This model has no chat template: plain format.</p>"
    return note + datasets.preview_html(examples)


def _finished_outputs(service: StudioService) -> list:
    return [r for r in service.runs() if r.output_dir and r.status in ("succeeded", "cancelled")]


def adapter_choices(service: StudioService, base_model: Optional[str]) -> list[tuple[str, str]]:
    """The base alone, every adapter trained on this base, and whole models from full fine-tuning or ReMoRA."""
    choices = [("base model only", BASE_ONLY)]
    for run in _finished_outputs(service):
        if run.output_kind == "model":
            choices.append((f"{run.name} (whole model) · {run.id}", run.id))
        elif not base_model or (run.model or base_model) == base_model:
            choices.append((f"{run.name} · {run.id}", run.id))
    return choices


def _rows(service: StudioService, chosen: list[str], blind: bool) -> list[dict[str, Any]]:
    rows = []
    for value in chosen:
        if value == BASE_ONLY:
            rows.append({"label": "base model", "run_id": None, "adapter_path": None, "model_path": None})
            continue
        run = service.run(value)
        path_key = "model_path" if run.output_kind == "model" else "adapter_path"
        rows.append({"label": run.name, "run_id": run.id, "adapter_path": None, "model_path": None,
                     path_key: run.output_dir})
    if blind:
        random.shuffle(rows)
    return rows


def _bot_updates(session: Optional[dict], reveal: bool = False) -> list:
    updates = []
    for index in range(MAX_ROWS):
        if session is None or index >= len(session["rows"]):
            updates.append(gr.Chatbot(value=[], visible=index < 2 and session is None))
            continue
        row = session["rows"][index]
        label = ("AB"[index] if session["blind"] and not reveal else row["label"])
        updates.append(gr.Chatbot(value=session["histories"][index], label=label, visible=True))
    return updates


def _start(service: StudioService, model: str, chosen: list[str], blind: bool, settings: dict, title: str) -> dict:
    rows = _rows(service, chosen, blind)
    # the title is the first message with its whitespace folded: 80 leading spaces made a blank title the store refused
    chat = service.create_chat(title=" ".join(title.split())[:80] or "chat", base_model=model or "default model",
                                     adapters=[{"label": r["label"], "run_id": r["run_id"]} for r in rows],
                                     settings=settings)
    return {"chat_id": chat.id, "chosen": list(chosen), "blind": blind, "rows": rows,
            "histories": [[] for _ in rows], "turn": 0, "voted": set(), "model": model}


def _store_answers(service: StudioService, chat_id: int, turn: int, rows: list[dict[str, Any]],
                   texts: list[str]) -> None:
    for index, row in enumerate(rows):
        service.add_chat_message(chat_id, turn=turn, role="assistant", content=texts[index] if index < len(texts) else "",
                               run_id=row["run_id"], label=row["label"])


class AnswerFollower:
    """Reads one request's snapshots in a thread of its own and stores every row's answer when the request ends
    (done, stopped or failed), whether a page still watches or not. Ending without the worker's own last word (the
    worker silent, the stream broken) sets the request's stop flag, so the worker stops as well."""

    def __init__(self, service: StudioService, chat_id: int, turn: int, rows: list[dict[str, Any]],
                 request_id: str) -> None:
        self.service, self.chat_id, self.turn, self.rows, self.request_id = service, chat_id, turn, rows, request_id
        self.latest: dict[str, Any] = {"texts": [""] * len(rows), "done": False, "error": None, "stopped": None}
        self.stored = threading.Event()
        self._changed = threading.Condition()
        self._version = 0
        self._thread = threading.Thread(target=self._follow, daemon=True, name=f"chat-{request_id}")
        self._thread.start()

    def _update(self, update: dict[str, Any]) -> None:
        with self._changed:
            # a last item written by the reader itself (no worker, a silent one) carries no texts: keep what came
            self.latest = {**self.latest, **update, "texts": update.get("texts") or self.latest["texts"]}
            self._version += 1
            self._changed.notify_all()

    def _follow(self) -> None:
        try:
            for update in api.chat_updates(self.request_id):
                self._update(update)
        except Exception as error:  # Redis gone mid-answer: keep what came, tell the page
            self._update({"done": True, "error": f"the answer's stream broke off ({error})"})
        finally:
            if self.latest["error"] or not self.latest["done"]:
                try:
                    api.stop_chat(self.request_id)
                except Exception:
                    log.warning("could not set the stop flag of chat request %s", self.request_id)
            try:
                _store_answers(self.service, self.chat_id, self.turn, self.rows, self.latest["texts"])
            except Exception:
                log.exception("could not store the answers of chat %s, turn %s", self.chat_id, self.turn)
            with self._changed:
                self.stored.set()
                self._changed.notify_all()

    def updates(self, wait_s: float = 1.0) -> Iterator[dict[str, Any]]:
        """Each new snapshot for the page, the last one once the answers are stored."""
        seen = 0
        while True:
            with self._changed:
                self._changed.wait_for(lambda: self._version != seen or self.stored.is_set(), timeout=wait_s)
                changed, seen, latest = self._version != seen, self._version, self.latest
                over = self.stored.is_set()
            if over:
                yield latest
                return
            if changed:
                yield latest


def _ending_message(update: dict[str, Any], blind: bool) -> str:
    if update.get("error"):
        return f"⚠️ {update['error']}"
    message = ""
    if update.get("stopped"):
        reason = update["stopped"]
        message = f"⏹ {reason[0].upper()}{reason[1:]}: the answers hold what was generated until then."
    if blind:
        message += (" " if message else "") + "Which answer is better? Vote below; the names are revealed after " \
                                               "your vote."
    return message


def send(service: StudioService, model: str, chosen: list[str], temperature: float, max_tokens: int, blind: bool,
         text: str, session: Optional[dict]) -> Iterator[tuple]:
    """Yield (session, prompt box, bot 1..4, message) as the answers stream in. The answers are stored by the
    request's follower even if this generator is closed first; closing it stops the generation."""
    chosen = list(chosen or [])
    problem = None
    if not text or not text.strip():
        problem = "Type a message first."
    elif len(text) > api.MAX_MESSAGE_CHARS:
        problem = (f"Your message is {len(text):,} characters; a chat message holds at most "
                   f"{api.MAX_MESSAGE_CHARS:,}: shorten it.")
    elif not chosen:
        problem = "Choose the base model or at least one adapter to answer."
    elif len(chosen) > MAX_ROWS:
        problem = f"Choose at most {MAX_ROWS} to compare side by side."
    elif blind and (len(chosen) != 2 or BASE_ONLY in chosen):
        problem = "Blind A/B compares exactly two trained adapters."
    continuing = session is not None and (session["chosen"], session["blind"], session["model"]) == (chosen, blind,
                                                                                                      model)
    if not problem and continuing:
        problem = api.chat_size_problem([h + [{"role": "user", "content": text}] for h in session["histories"]])
    if problem:
        yield (session, gr.skip(), *_bot_updates(session), f"⚠️ {problem}")
        return
    settings = {"temperature": float(temperature), "max_new_tokens": int(max_tokens)}
    if not continuing:
        session = _start(service, model, chosen, blind, settings, text)
    session["turn"] += 1
    for index, row in enumerate(session["rows"]):
        session["histories"][index] = session["histories"][index] + [{"role": "user", "content": text}]
        service.add_chat_message(session["chat_id"], turn=session["turn"], role="user", content=text,
                                       run_id=row["run_id"], label=row["label"])
    conversations = [list(h) for h in session["histories"]]
    for history in session["histories"]:
        history.append({"role": "assistant", "content": ""})
    request = {"base_model": model, "rows": session["rows"], "conversations": conversations, "settings": settings}
    try:
        request_id = api.start_chat(request)
    except Exception as error:  # the queue is unreachable: tell the user, keep the conversation
        _store_answers(service, session["chat_id"], session["turn"], session["rows"], [])
        yield (session, "", *_bot_updates(session), f"⚠️ {error}")
        return
    session["request_id"] = request_id  # what the Stop button stops
    follower = AnswerFollower(service, session["chat_id"], session["turn"], session["rows"], request_id)
    final = follower.latest
    try:
        yield (session, "", *_bot_updates(session), "")
        for final in follower.updates():
            for index, answer in enumerate(final["texts"]):
                session["histories"][index][-1] = {"role": "assistant", "content": answer}
            if not follower.stored.is_set():
                yield (session, "", *_bot_updates(session), "")
    finally:
        if not follower.stored.is_set():  # the page went away mid-answer (closed, reloaded, cancelled)
            try:
                api.stop_chat(request_id)
            except Exception:
                log.warning("could not set the stop flag of chat request %s", request_id)
    session["request_id"] = None
    yield (session, "", *_bot_updates(session), _ending_message(final, session["blind"]))


def stop(session: Optional[dict]) -> str:
    """The Stop button: the worker ends the answer after its current token; the stream then shows how it ended."""
    request_id = (session or {}).get("request_id")
    if not request_id:
        return "Nothing is being generated."
    try:
        api.stop_chat(request_id)
    except Exception as error:  # Redis unreachable
        return f"⚠️ Cannot reach the queue to stop the answer: {error}"
    return "Stopping…"


def vote(service: StudioService, session: Optional[dict], winner: str) -> tuple:
    """Store a blind A/B vote against the two runs, then reveal which adapter was which."""
    if session is None or not session["blind"] or session["turn"] == 0:
        return ("Turn on blind A/B, choose two adapters and send a message first.", *_bot_updates(session))
    if session["turn"] in session["voted"]:
        return ("You already voted on this answer.", *_bot_updates(session, reveal=True))
    index = "AB".index(winner)
    rows = session["rows"]
    service.add_vote(session["chat_id"], turn=session["turn"], winner_run_id=rows[index]["run_id"],
                           loser_run_id=rows[1 - index]["run_id"])
    session["voted"].add(session["turn"])
    return (f"Vote stored: **{rows[index]['label']}** (was {winner}) beat **{rows[1 - index]['label']}**.",
            *_bot_updates(session, reveal=True))
