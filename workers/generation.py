"""Streaming generation, for one conversation or several side by side.

Several adapters on one base answer in one batched `generate`: each batch row names its adapter (or none) through
`mora.adapters_per_row`, so the base model is loaded once however many adapters are compared. A small streamer
hands each step's tokens to the caller, who sees every row's text grow as it is generated.

Lengths are checked in tokens before anything is generated: the prompt and the answer together must fit the model's
context. A stop callable is asked between tokens (a transformers `StoppingCriteria`), so a Stop takes effect within
one token; a caller that stops reading (closes the generator) stops the generation the same way.

Each row may have settings of its own (`stream_rows`, what the OpenAI-compatible API batches): its own answer length,
temperature, top_p, seed and stop strings, and its own stop flag. A row samples with a generator of its own seeded by
its seed, so a row answers the same in a batch as alone; a row that is done ends while the others go on.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Collection, Iterator, Optional, Sequence

import greenlet
import torch
from transformers import LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList
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
    """Receives the prompt once, then one token per row per step, and hands each step to the consumer.

    `generate` runs in a greenlet of the consumer's own OS thread, not in a thread of its own: each put() switches to
    the consumer with the step and resumes when the consumer asks for the next. A second OS thread would start a
    second OpenMP pool beside the consumer's, and with more pool threads than cores libgomp stops spinning between
    parallel regions: every op of a decode step then pays a futex wake-up (a 32-row SmolLM2 step took 230 ms in a
    thread against 142 ms in the thread that had run the model before). Grad mode is per OS thread, so each side
    restores its own across a switch."""

    def __init__(self, consumer: greenlet.greenlet) -> None:
        self.consumer = consumer
        self._prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:
            self._prompt_seen = True
            return
        grad = torch.is_grad_enabled()
        self.consumer.switch(value.reshape(-1).tolist())
        torch.set_grad_enabled(grad)

    def end(self) -> None:
        """Nothing to send: the greenlet returning is the end."""


def render_prompt(tokenizer, messages: Sequence[Message]) -> list[int]:
    """The conversation in the model's chat template, ending where the assistant's answer begins."""
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)
    text = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in messages) + "Assistant:"
    return tokenizer(text)["input_ids"]


class _RowsEnd(StoppingCriteria):
    """Asked after each generated token: a row ends when it has its `max_new_tokens`, when the consumer marked it
    done (`ended`: its end token or a stop string came, its caller left), and every row ends when `should_stop()`."""

    def __init__(self, prompt_width: int, max_new_tokens: Sequence[int], ended: set[int],
                 should_stop: Callable[[], bool]) -> None:
        self.prompt_width, self.max_new_tokens, self.ended, self.should_stop = prompt_width, max_new_tokens, ended, \
            should_stop

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        if self.should_stop():
            return torch.ones((input_ids.shape[0],), dtype=torch.bool, device=input_ids.device)
        generated = input_ids.shape[1] - self.prompt_width
        return torch.tensor([generated >= limit or row in self.ended for row, limit in enumerate(self.max_new_tokens)],
                            dtype=torch.bool, device=input_ids.device)


class _RowSampler(LogitsProcessor):
    """Chooses each row's next token with that row's settings: the most likely one at temperature 0, else a draw
    from the temperature-scaled, top_p-truncated distribution with the row's own generator. It leaves only the chosen
    token possible, so `generate` runs greedy over its choices."""

    def __init__(self, settings: Sequence[GenerationSettings], device: torch.device) -> None:
        self.settings = list(settings)
        self.generators = []
        for row in self.settings:
            generator = torch.Generator(device=device)
            if row.seed is None:
                generator.seed()
            else:
                generator.manual_seed(row.seed)
            self.generators.append(generator)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        chosen = []
        for row, (settings, generator) in enumerate(zip(self.settings, self.generators)):
            logits = scores[row].float()
            if settings.temperature <= 0:
                chosen.append(int(logits.argmax()))
                continue
            logits = logits / settings.temperature
            if settings.top_p < 1:
                ordered, order = logits.sort(descending=True)
                probabilities = ordered.softmax(-1)
                beyond = probabilities.cumsum(-1) - probabilities > settings.top_p  # the most likely token stays
                logits = torch.full_like(logits, float("-inf")).scatter(0, order, ordered.masked_fill(beyond, float(
                    "-inf")))
            chosen.append(int(torch.multinomial(logits.softmax(-1), 1, generator=generator)))
        only = torch.full_like(scores, float("-inf"))
        only[torch.arange(scores.shape[0], device=scores.device), torch.tensor(chosen, device=scores.device)] = 0.0
        return only


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
    for rows in stream_rows(model, tokenizer, prompts, adapters, [settings] * len(prompts), should_stop=should_stop):
        yield [row.text for row in rows]


@dataclass
class RowOutput:
    """One row's answer so far: its text (without a stop string, nor what may be the start of one), the tokens
    generated for it, and why it ended ("stop": its end token or a stop string; "length": its max_new_tokens or a stop
    of the whole batch), None while it goes on."""

    text: str = ""
    tokens: int = 0
    finish_reason: Optional[str] = None


def _visible(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """The text up to the first stop string and whether one was found; else the text without a tail that may be the
    start of a stop string, held back until the next tokens tell."""
    found = [text.find(stop) for stop in stops if stop in text]
    if found:
        return text[:min(found)], True
    held = max((k for stop in stops for k in range(1, len(stop)) if text.endswith(stop[:k])), default=0)
    return text[:len(text) - held], False


def padded_prompt(prompt: Sequence[int], width: int, pad: int, shared_prefix: int = 0) -> tuple[list[int], list[int]]:
    """A prompt padded to `width` tokens and its attention mask: the padding goes before the prompt, or after its
    first `shared_prefix` tokens (the layout of `workers.evaluation.losses_and_prompt_cache`'s cache, which a
    generation continuing from that cache must repeat exactly)."""
    padding = width - len(prompt)
    return (list(prompt[:shared_prefix]) + [pad] * padding + list(prompt[shared_prefix:]),
            [1] * shared_prefix + [0] * padding + [1] * (len(prompt) - shared_prefix))


def stream_rows(
    model, tokenizer, prompts: Sequence[Sequence[int]], adapters: Sequence[Optional[str]],
    settings: Sequence[GenerationSettings], stops: Optional[Sequence[Sequence[str]]] = None,
    should_stop: Optional[Callable[[], bool]] = None, rows_to_end: Optional[Callable[[], Collection[int]]] = None,
    cache=None, shared_prefix: int = 0,
) -> Iterator[list[RowOutput]]:
    """Generate for prompts already in tokens (lengths already checked), one batched `generate`, each row with its
    adapter, settings and stop strings; yield every row's `RowOutput` after each generated token.

    `should_stop()` ends every row; `rows_to_end()` names rows to end now (their callers left). Both are asked after
    each token. Closing the iterator stops the generation. `cache`: the keys and values of the left-padded prompts
    but their last position, already computed with the same adapters per row
    (`workers.evaluation.losses_and_prompt_cache`); `generate` then reads only the tokens it does not hold.
    `shared_prefix`: the prompts are padded after their first `shared_prefix` tokens (which every prompt starts
    with), not before them, as the rows of a cache from `losses_and_prompt_cache` are (`padded_prompt`)."""
    if not len(prompts) == len(adapters) == len(settings):
        raise ValueError(f"{len(prompts)} prompts, {len(adapters)} adapter choices and {len(settings)} settings")
    for row_settings in settings:
        row_settings.validate()
    stops = [list(s) for s in stops] if stops is not None else [[] for _ in prompts]
    width = max(len(p) for p in prompts)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = next(model.parameters()).device
    rows = [padded_prompt(p, width, pad, shared_prefix) for p in prompts]
    input_ids = torch.tensor([ids for ids, _ in rows], device=device)
    attention_mask = torch.tensor([mask for _, mask in rows], device=device)
    streamer = _BatchStreamer(greenlet.getcurrent())
    ended: set[int] = set()  # rows the consumer saw finish, or whose caller left
    limits = [s.max_new_tokens for s in settings]
    kwargs = dict(
        input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max(limits), do_sample=False,
        temperature=None, top_p=None, pad_token_id=pad, streamer=streamer,
        logits_processor=LogitsProcessorList([_RowSampler(settings, device)]),
        stopping_criteria=StoppingCriteriaList([_RowsEnd(
            width, limits, ended, lambda: should_stop is not None and should_stop())]),
    )
    if cache is not None:  # `past_key_values` is this argument's deprecated name in transformers 5
        kwargs["cache"] = cache
    def generate() -> None:  # its errors surface in the consumer's switch() below
        with torch.no_grad(), mora.adapters_per_row(model, list(adapters)):
            model.generate(**kwargs)

    runner = greenlet.greenlet(generate)

    def next_step() -> Optional[list[int]]:
        """The next step's tokens, or None once generate has returned."""
        grad = torch.is_grad_enabled()
        try:
            return runner.switch()
        finally:
            torch.set_grad_enabled(grad)
    stop_ids = {tokenizer.eos_token_id, pad}
    generated: list[list[int]] = [[] for _ in prompts]
    outputs = [RowOutput() for _ in prompts]

    def show(row: int) -> None:
        text = tokenizer.decode(generated[row], skip_special_tokens=True)
        # a byte-level token can end inside a UTF-8 character: hold it back until the character is whole, so every
        # streamed text is a prefix of the next
        if text.endswith("\ufffd"):
            return
        outputs[row].text, stopped = _visible(text, stops[row])
        if stopped:
            finish(row, "stop")

    def finish(row: int, reason: str) -> None:
        """The row is done: its whole text is shown, what was held back included, up to a stop string found."""
        full = tokenizer.decode(generated[row], skip_special_tokens=True)
        cut, stopped = _visible(full, stops[row])
        outputs[row].text, outputs[row].finish_reason = (cut if stopped else full), reason
        ended.add(row)

    def snapshot() -> list[RowOutput]:
        return [RowOutput(o.text, o.tokens, o.finish_reason) for o in outputs]

    try:
        while (step := next_step()) is not None:
            leaving = set(rows_to_end()) if rows_to_end is not None else set()
            ended.update(leaving)
            for row, token in enumerate(step):
                if outputs[row].finish_reason is not None:
                    continue
                if token in stop_ids:
                    finish(row, "stop")
                    continue
                generated[row].append(token)
                outputs[row].tokens = len(generated[row])
                show(row)
                if outputs[row].finish_reason is None and (len(generated[row]) >= limits[row] or row in leaving):
                    finish(row, "length")
            yield snapshot()
    finally:
        if not runner.dead:  # the consumer left mid-answer: unwind generate where it waits (adapters restored)
            runner.throw()
    unfinished = [row for row, output in enumerate(outputs) if output.finish_reason is None]
    if unfinished:  # the whole batch was stopped, or generate ended at its length
        for row in unfinished:
            finish(row, "length")
        yield snapshot()


def reply(model, tokenizer, messages: Sequence[Message], adapter: Optional[str] = None,
          settings: GenerationSettings = GenerationSettings()) -> str:
    """The whole answer for one conversation (the last of the streamed texts)."""
    text = ""
    for texts in stream_chat(model, tokenizer, [messages], [adapter], settings):
        text = texts[0]
    return text
