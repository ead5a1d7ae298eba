"""The Chat tab's logic: choose a base and up to four adapters, send one prompt, stream the answers side by side
(generated on the `chat` queue in one batched pass), save the conversation, and take blind A/B votes."""
from __future__ import annotations

import random
from typing import Any, Iterator, Optional

import gradio as gr

from app import datasets
from app.service import StudioService
from storage.records import DatasetRecord
from workers import api

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
    chat = service.store.create_chat(title=title[:80] or "chat", base_model=model or "default model",
                                     adapters=[{"label": r["label"], "run_id": r["run_id"]} for r in rows],
                                     settings=settings)
    return {"chat_id": chat.id, "chosen": list(chosen), "blind": blind, "rows": rows,
            "histories": [[] for _ in rows], "turn": 0, "voted": set(), "model": model}


def send(service: StudioService, model: str, chosen: list[str], temperature: float, max_tokens: int, blind: bool,
         text: str, session: Optional[dict]) -> Iterator[tuple]:
    """Yield (session, prompt box, bot 1..4, message) as the answers stream in."""
    chosen = list(chosen or [])
    problem = None
    if not text or not text.strip():
        problem = "Type a message first."
    elif not chosen:
        problem = "Choose the base model or at least one adapter to answer."
    elif len(chosen) > MAX_ROWS:
        problem = f"Choose at most {MAX_ROWS} to compare side by side."
    elif blind and (len(chosen) != 2 or BASE_ONLY in chosen):
        problem = "Blind A/B compares exactly two trained adapters."
    if problem:
        yield (session, gr.skip(), *_bot_updates(session), f"⚠️ {problem}")
        return
    settings = {"temperature": float(temperature), "max_new_tokens": int(max_tokens)}
    if session is None or session["chosen"] != chosen or session["blind"] != blind or session["model"] != model:
        session = _start(service, model, chosen, blind, settings, text)
    session["turn"] += 1
    for index, row in enumerate(session["rows"]):
        session["histories"][index] = session["histories"][index] + [{"role": "user", "content": text}]
        service.store.add_chat_message(session["chat_id"], turn=session["turn"], role="user", content=text,
                                       run_id=row["run_id"], label=row["label"])
    conversations = [list(h) for h in session["histories"]]
    for history in session["histories"]:
        history.append({"role": "assistant", "content": ""})
    yield (session, "", *_bot_updates(session), "")
    request = {"base_model": model, "rows": session["rows"], "conversations": conversations, "settings": settings}
    message = ""
    try:
        for update in api.chat_updates(api.start_chat(request)):
            if update.get("error"):
                message = f"⚠️ {update['error']}"
                break
            for index, answer in enumerate(update["texts"]):
                session["histories"][index][-1] = {"role": "assistant", "content": answer}
            yield (session, "", *_bot_updates(session), "")
    except Exception as error:  # the queue is unreachable: tell the user, keep the conversation
        message = f"⚠️ {error}"
    for index, row in enumerate(session["rows"]):
        service.store.add_chat_message(session["chat_id"], turn=session["turn"], role="assistant",
                                       content=session["histories"][index][-1]["content"], run_id=row["run_id"],
                                       label=row["label"])
    if session["blind"] and not message:
        message = "Which answer is better? Vote below; the names are revealed after your vote."
    yield (session, "", *_bot_updates(session), message)


def vote(service: StudioService, session: Optional[dict], winner: str) -> tuple:
    """Store a blind A/B vote against the two runs, then reveal which adapter was which."""
    if session is None or not session["blind"] or session["turn"] == 0:
        return ("Turn on blind A/B, choose two adapters and send a message first.", *_bot_updates(session))
    if session["turn"] in session["voted"]:
        return ("You already voted on this answer.", *_bot_updates(session, reveal=True))
    index = "AB".index(winner)
    rows = session["rows"]
    service.store.add_vote(session["chat_id"], turn=session["turn"], winner_run_id=rows[index]["run_id"],
                           loser_run_id=rows[1 - index]["run_id"])
    session["voted"].add(session["turn"])
    return (f"Vote stored: **{rows[index]['label']}** (was {winner}) beat **{rows[1 - index]['label']}**.",
            *_bot_updates(session, reveal=True))
