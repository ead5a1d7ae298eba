"""Streaming generation, for one conversation or several side by side.

Several adapters on one base answer in one batched `generate`: each batch row names its adapter (or none) through
`mora.adapters_per_row`, so the base model is loaded once however many adapters are compared. A small streamer
hands each step's tokens to the caller, who sees every row's text grow as it is generated.

Lengths are checked in tokens before anything is generated: the prompt and the answer together must fit the model's
context. A stop callable is asked between tokens (a transformers `StoppingCriteria`), so a Stop takes effect within
one token; a caller that stops reading (closes the generator) stops the generation the same way.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Optional, Sequence

import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

import mora

Message = dict[str, str]
MAX_NEW_TOKENS = 4096


class LengthError(ValueError):
    """A prompt or an answer length that the model's context cannot hold; `rows` are the conversations at fault."""

    def __init__(self, message: str, rows: Sequence[int] = ()) -> None:
        super().__init__(message)
        self.rows = list(rows)


@dataclass
class GenerationSettings:
    max_new_tokens: int = 256
    temperature: float = 0.7
    top_p: float = 0.9
    seed: Optional[int] = None

    def validate(self) -> None:
        if not 1 <= self.max_new_tokens <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens (the longest answer, in tokens) must be between 1 and {MAX_NEW_TOKENS}, "
                             f"got {self.max_new_tokens}")
        if not 0 <= self.temperature <= 5:
            raise ValueError(f"temperature: must be between 0 and 5, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: must be in (0, 1], got {self.top_p}")


class _BatchStreamer(BaseStreamer):
    """Receives the prompt once, then one token per row per step, and queues the steps for the consumer."""

    def __init__(self) -> None:
        self.steps: "queue.Queue[Optional[list[int]]]" = queue.Queue()
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        self.steps.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.steps.put(None)


def render_prompt(tokenizer, messages: Sequence[Message]) -> list[int]:
    """The conversation in the model's chat template, ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tokenizer(text)["input_ids"]


class _StopWhen(StoppingCriteria):
    """Ends every row at once when `should_stop()` turns true; asked after each generated token."""

    def __init__(self, should_stop: Callable[[], bool]) -> None:
        self.should_stop = should_stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), bool(self.should_stop()), dtype=torch.bool, device=input_ids.device)


def context_length(model) -> Optional[int]:
    """The most tokens the model reads at once (prompt and answer), from its config; None if it does not say."""
    value = getattr(model.config, "max_position_embeddings", None)
    return value if isinstance(value, int) and value > 0 else None


def check_lengths(prompts: Sequence[Sequence[int]], max_new_tokens: int, context: Optional[int]) -> None:
    """Refuse, with the numbers and what to change, prompts that leave no room for `max_new_tokens` in `context`."""
    if context is None:
        return
    if max_new_tokens >= context:
        raise LengthError(f"max_new_tokens is {max_new_tokens:,} but this model reads at most {context:,} tokens, the "
                          f"prompt included: lower max new tokens below {context:,}", range(len(prompts)))
    room = context - max_new_tokens
    over = [row for row, prompt in enumerate(prompts) if len(prompt) > room]
    if over:
        longest = max(len(prompts[row]) for row in over)
        fewer = f", or lower max new tokens to {context - longest:,}" if context - longest >= 1 else ""
        raise LengthError(f"the conversation is {longest:,} tokens, but this model reads at most {context:,} tokens "
                          f"and {max_new_tokens:,} of them are kept for the answer (max new tokens): shorten the "
                          f"message or start a new conversation (at most {room:,} tokens){fewer}", over)


def stream_chat(
    model, tokenizer, conversations: Sequence[Sequence[Message]], adapters: Sequence[Optional[str]],
    settings: GenerationSettings = GenerationSettings(), should_stop: Optional[Callable[[], bool]] = None,
) -> Iterator[list[str]]:
    """Yield, after every generated token, the answer text so far of each row (row i uses `adapters[i]`).

    `should_stop()` is asked after each token; when it turns true every row ends with what it has, and the last
    texts are yielded as usual. Closing the iterator stops the generation too. Lengths past the model's context
    raise `LengthError` before anything is generated."""
    settings.validate()
    if len(conversations) != len(adapters):
        raise ValueError(f"{len(conversations)} conversations but {len(adapters)} adapter choices")
    prompts = [render_prompt(tokenizer, c) for c in conversations]
    check_lengths(prompts, settings.max_new_tokens, context_length(model))
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=device)
    attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=device)
    streamer = _BatchStreamer()
    abandoned = threading.Event()  # the consumer closed the iterator: nobody reads what would be generated
    sampling = settings.temperature > 0
    kwargs = dict(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=settings.max_new_tokens,
        do_sample=sampling, temperature=settings.temperature if sampling else None,
        top_p=settings.top_p if sampling else None, pad_token_id=pad, streamer=streamer,
        stopping_criteria=StoppingCriteriaList(
            [_StopWhen(lambda: abandoned.is_set() or (should_stop is not None and should_stop()))]),
    )
    failure: list[BaseException] = []

    def generate() -> None:
        try:
            if settings.seed is not None:
                torch.manual_seed(settings.seed)
            with torch.no_grad(), mora.adapters_per_row(model, list(adapters)):
                model.generate(**kwargs)
        except BaseException as error:  # surfaced in the consumer's thread below
            failure.append(error)
            streamer.end()

    worker = threading.Thread(target=generate, daemon=True)
    worker.start()
    stop_ids = {tokenizer.eos_token_id, pad}
    generated: list[list[int]] = [[] for _ in prompts]
    finished = [False] * len(prompts)
    shown = [""] * len(prompts)
    try:
        while (step := streamer.steps.get()) is not None:
            for row, token in enumerate(step):
                if finished[row]:
                    continue
                if token in stop_ids:
                    finished[row] = True
                else:
                    generated[row].append(token)
                text = tokenizer.decode(generated[row], skip_special_tokens=True)
                # a byte-level token can end inside a UTF-8 character: hold it back until the character is whole,
                # so every streamed text is a prefix of the next
                if not text.endswith("\ufffd"):
                    shown[row] = text
            yield list(shown)
    finally:
        abandoned.set()
    worker.join()
    if failure:
        raise failure[0]
    final = [tokenizer.decode(ids, skip_special_tokens=True) for ids in generated]
    if final != shown:
        yield final


def reply(model, tokenizer, messages: Sequence[Message], adapter: Optional[str] = None,
          settings: GenerationSettings = GenerationSettings()) -> str:
    """The whole answer for one conversation (the last of the streamed texts)."""
    text = ""
    for texts in stream_chat(model, tokenizer, [messages], [adapter], settings):
        text = texts[0]
    return text
