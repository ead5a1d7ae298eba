"""Evaluation by generation: a dataset's prompts answered greedily by several rows side by side (adapters on one
shared base, the base alone, whole fine-tuned models), every answer scored against its reference.

Where the prompts come from (`EvalSource`): a data file's conversations, all of them, the rows a run trained on
(`split="train"`) or the rows it held out (`split="eval"`, the same rows `workers.data.build_datasets` holds out for
the same `eval_fraction` and seed), at most `limit` of them (a seeded sample when there are more). A conversation's
prompt is everything before its last assistant turn; that turn is the reference. Raw `text` files have no reference
to compare with and are refused.

How they are answered (`answer_batches`): for each batch of examples, a teacher-forced pass over every row of one
model (examples × rows, `mora.adapters_per_row`) gives each reference's mean loss per token and the keys and values
of the prompts (`losses_and_prompt_cache`), and then the same rows answer in one batched `stream_rows` (the chat's
generation, greedy) that continues from those keys and values, so each prompt is read once. Scores are
`workers.eval_metrics`'s; `summarize` averages them per row (perplexity: exp of the mean loss, the geometric mean of
the examples').

On the queue (`run_queued_evaluation`, the `chat` queue's `mora.evaluate` task): the chat worker's engine (its resident
models and adapter cache) answers, and events go on the evaluation's Redis stream (`bus.eval_stream_key`), which the
web process's collector writes into the store: `eval_status`, `eval_examples` (once, before answering),
`eval_answers` (after each batch, with the progress) and `eval_scores` (at the end, per row and metric, at the row's
run's step). The same functions score a model during training (`workers.training.GenerationEvalCallback`).
Importing this module loads no torch: the web process checks an evaluation's request with it before queueing.
"""
from __future__ import annotations

import functools
import logging
import math
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence

from workers.data_readers import DatasetError
from workers.eval_metrics import METRICS, score_answer

log = logging.getLogger(__name__)

SPLITS = ("all", "train", "eval")
MAX_EXAMPLES = 1000
"""Most prompts one evaluation answers: each is stored with every row's answer, and the Runs tab shows them."""
MAX_ROWS = 8
"""Most rows (runs and the base) answering side by side: as many adapters as a chat worker keeps resident."""
MAX_NEW_TOKENS = 1024
DEFAULT_MAX_NEW_TOKENS = 64
MAX_REFERENCE_CHARS = 32_000
DEFAULT_BATCH_ROWS = 32
"""Generated rows per batched `generate` on a CPU (examples × rows); a GPU takes 256."""
EXAMPLES_PER_EVENT = 50
LOSS_ROWS = 32
"""Most rows per teacher-forced forward pass. The prompts' keys and values are gathered from the passes into one cache
for all the batch's rows, the cache the generation's prefill would build."""
MIN_SHARED_PREFIX = 8
"""Fewest tokens at the start of every prompt worth a pass of their own (read once per adapter, not once per prompt):
a chat template's system prompt is 20-40; a few tokens of role markers save less than the pass costs."""
LOSS_LOGITS = 16_000_000
"""Most logits one teacher-forced pass keeps (rows × (answer length + 1) × vocabulary: 64 MB in float32), so long
references take fewer rows a pass (down to one) and short ones share a pass (a few wide passes run faster than many
narrow ones: 32 SmolLM2 rows of 17 tokens in one pass 1.5-1.9 s, in four 2.1-2.6 s)."""

Message = dict[str, str]


class EvalError(ValueError):
    """An evaluation that cannot run as asked; the message names the setting, file or row."""


@dataclass
class EvalSource:
    data: str
    split: str = "all"
    eval_fraction: float = 0.0
    seed: int = 0
    limit: int = 100

    def validate(self) -> None:
        if not isinstance(self.data, str) or not self.data:
            raise EvalError("data: name the file whose prompts to answer")
        if self.split not in SPLITS:
            raise EvalError(f"split: expected one of {', '.join(SPLITS)}, got {self.split!r}")
        if self.split != "all" and not 0 < self.eval_fraction < 1:
            raise EvalError(f"split {self.split!r} needs the run's eval_fraction in (0, 1), got {self.eval_fraction}")
        if isinstance(self.limit, bool) or not isinstance(self.limit, int) or not 1 <= self.limit <= MAX_EXAMPLES:
            raise EvalError(f"limit: between 1 and {MAX_EXAMPLES} prompts (each is stored with every row's "
                            f"answer), got {self.limit!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise EvalError(f"seed: a whole number ≥ 0, got {self.seed!r}")

    @classmethod
    def from_dict(cls, values: Any) -> "EvalSource":
        if not isinstance(values, dict):
            raise EvalError(f"source: expected an object with data, split, limit, got {values!r}")
        unknown = set(values) - {"data", "split", "eval_fraction", "seed", "limit"}
        if unknown:
            raise EvalError(f"source: unknown field {sorted(unknown)[0]!r}")
        source = cls(**values)
        source.validate()
        return source


@dataclass
class EvalExample:
    example: int
    source_row: int
    prompt: list[Message]
    reference: str


def split_conversation(conversation: list[Message]) -> tuple[list[Message], str]:
    """(the messages before the last assistant turn, that turn's content)."""
    last = max(i for i, message in enumerate(conversation) if message["role"] == "assistant")
    return conversation[:last], conversation[last]["content"]


def read_examples(source: EvalSource) -> list[EvalExample]:
    """The source's examples (at most `limit`: a sample drawn with `seed`, kept in file order), streaming the file."""
    from workers.data import _held_out
    from workers.data_schemas import DatasetStream, inspect_dataset

    source.validate()
    path = Path(source.data)
    if not path.exists():
        raise EvalError(f"data: {path} does not exist")
    try:
        held_out: set[int] = set()
        if source.split != "all":
            info = inspect_dataset(path)
            held_out = _held_out(info.rows, source.eval_fraction, source.seed, path.name)
        stream = DatasetStream(path)
        rng = random.Random(source.seed)
        kept: list[tuple[int, Any]] = []
        seen = 0
        for position, example in enumerate(stream.examples()):
            if stream.schema is not None and stream.schema.name == "text":
                raise EvalError(f"{path.name}: raw text has no prompt and reference answer to compare; evaluate on "
                                f"conversations (chat, ShareGPT, alpaca or prompt/completion rows)")
            if source.split == "eval" and position not in held_out or source.split == "train" and position in held_out:
                continue
            if len(example.content[-1]["content"]) > MAX_REFERENCE_CHARS:
                raise EvalError(f"{path.name}, row {example.row}: the reference answer is longer than "
                                f"{MAX_REFERENCE_CHARS:,} characters")
            seen += 1  # reservoir sampling: every example is kept with the same chance, in one pass
            if len(kept) < source.limit:
                kept.append((position, example))
            elif (slot := rng.randrange(seen)) < source.limit:
                kept[slot] = (position, example)
    except DatasetError as error:
        raise EvalError(str(error)) from None
    kept.sort(key=lambda item: item[0])
    examples = []
    for index, (_, example) in enumerate(kept):
        prompt, reference = split_conversation(example.content)
        if not prompt:
            raise EvalError(f"{path.name}, row {example.row}: nothing comes before the assistant's answer, so there "
                            f"is no prompt to answer")
        examples.append(EvalExample(index, example.row, prompt, reference))
    if not examples:
        raise EvalError(f"{path.name}: no example in the {source.split} rows")
    return examples


# ---- answering and scoring ---------------------------------------------------------------------------------------

@dataclass
class Answer:
    example: int
    row: int
    answer: str
    scores: dict[str, Optional[float]]


def prepare(tokenizer, examples: Sequence[EvalExample], max_new_tokens: int, model,
            ) -> tuple[list[list[int]], list[list[int]]]:
    """Each example's prompt in tokens (the chat template's, up to where the answer begins) and its reference's
    tokens; a prompt that leaves no room for the answer in the model's context is refused, naming its row."""
    from workers.generation import check_lengths, context_length, render_prompt

    prompts = [render_prompt(tokenizer, example.prompt) for example in examples]
    references = [list(tokenizer(example.reference, add_special_tokens=False)["input_ids"]) for example in examples]
    context = context_length(model)
    try:
        check_lengths(prompts, max_new_tokens, context)
        if context is not None:
            check_lengths([p + r for p, r in zip(prompts, references)], 0, context)
    except ValueError as error:
        rows = ", ".join(str(examples[i].source_row) for i in getattr(error, "rows", [])[:5])
        raise EvalError(f"row {rows}: {error}") from None
    return prompts, references


def answer_losses(model, prompts: Sequence[Sequence[int]], references: Sequence[Sequence[int]],
                  adapters: Sequence[Optional[str]], pad_token_id: int) -> list[float]:
    """Each reference's mean negative log-likelihood per token after its prompt (teacher forcing), row i with
    `adapters[i]` (`losses_and_prompt_cache` without keeping the prompts' cache)."""
    return losses_and_prompt_cache(model, prompts, references, adapters, pad_token_id, keep_cache=False).losses


@dataclass
class PromptPass:
    """What the teacher-forced pass gives: each reference's loss, and the prompts' keys and values for
    `stream_rows(cache=..., shared_prefix=...)` (None when the model's cache cannot be cut back to them), laid out
    with each row's padding after the `shared_prefix` tokens every prompt starts with."""

    losses: list[float]
    cache: Any = None
    shared_prefix: int = 0


def shared_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """How many leading tokens every prompt shares, leaving each at least one of its own (the token a generation
    that continues from the cache reads)."""
    shortest = min(len(p) for p in prompts)
    length = 0
    while length < shortest - 1 and all(p[length] == prompts[0][length] for p in prompts):
        length += 1
    return length


def _plain_cache(cache) -> bool:
    """A cache of plain full-attention layers, whose keys and values can be copied, gathered and cut back."""
    from transformers import DynamicCache
    from transformers.cache_utils import DynamicLayer

    return type(cache) is DynamicCache and all(type(layer) is DynamicLayer and layer.is_initialized
                                               for layer in cache.layers)


def _prefix_cache(model, prefix: Sequence[int], adapters: Sequence[Optional[str]], device):
    """The shared prefix's keys and values, one forward row per distinct adapter (not one per prompt), and for each
    row of `adapters` the index of its adapter's row; None when the model's cache is not a plain one."""
    import torch

    import mora

    distinct = list(dict.fromkeys(adapters))
    ids = torch.tensor([list(prefix)] * len(distinct), device=device)
    with torch.no_grad(), mora.adapters_per_row(model, distinct):
        output = model(input_ids=ids, use_cache=True, logits_to_keep=1)
    cache = getattr(output, "cache", None)
    if not _plain_cache(cache):
        return None
    return cache, torch.tensor([distinct.index(a) for a in adapters], device=device)


def _loss_passes(references: Sequence[Sequence[int]], vocabulary: int) -> Iterator[range]:
    """Consecutive rows per teacher-forced pass: at most `LOSS_ROWS`, and at most `LOSS_LOGITS` kept logits unless a
    single row needs more."""
    first = 0
    while first < len(references):
        last, width = first + 1, len(references[first]) + 1
        while (last < len(references) and last - first < LOSS_ROWS
               and (last - first + 1) * max(width, len(references[last]) + 1) * vocabulary <= LOSS_LOGITS):
            width = max(width, len(references[last]) + 1)
            last += 1
        yield range(first, last)
        first = last


def losses_and_prompt_cache(model, prompts: Sequence[Sequence[int]], references: Sequence[Sequence[int]],
                            adapters: Sequence[Optional[str]], pad_token_id: int, keep_cache: bool = True,
                            ) -> PromptPass:
    """Each reference's mean negative log-likelihood per token after its prompt (teacher forcing, nan for an empty
    reference), row i with `adapters[i]`, as many rows a forward pass as `_loss_passes` gives; and, with `keep_cache`,
    the prompts' keys and values for `stream_rows(cache=...)`.

    A row is [shared prefix][padding][rest of the prompt][reference][right padding], the prompts padded to the widest
    one (width P), positions counted from each row's real tokens, so only the last positions' logits are computed. The
    prefix every prompt starts with (a chat template's system prompt) is read once per adapter, not once per prompt,
    and its keys and values copied to that adapter's rows. By causality the first P - 1 positions are exactly a batched
    generation's prefill of the prompts in that layout: their keys and values, gathered for all rows, let the
    generation read only each prompt's last token. A cache of sliding-window or linear-attention layers (or any other
    kind than plain full attention) is neither shared nor cut, nor is one whose model generates with a cache of its own
    kind (`cache_implementation`): the generation prefills itself."""
    import torch
    from transformers import DynamicCache

    import mora
    from workers.generation import padded_prompt

    device = next(model.parameters()).device
    prompt_width = max(len(p) for p in prompts)
    keep_cache = keep_cache and getattr(model.generation_config, "cache_implementation", None) is None
    shared = shared_prefix_length(prompts) if len(set(adapters)) < len(prompts) else 0
    prefix = _prefix_cache(model, prompts[0][:shared], adapters, device) if shared >= MIN_SHARED_PREFIX else None
    shared = shared if prefix is not None else 0
    cache = None
    losses = []
    for rows in _loss_passes(references, model.config.get_text_config().vocab_size):
        first, answer_width = rows.start, max(len(references[i]) for i in rows)
        ids, mask = [], []
        for i in rows:  # the prompt as the generation lays it out, then the reference, right-padded
            prompt_ids, prompt_mask = padded_prompt(prompts[i], prompt_width, pad_token_id, shared)
            right = answer_width - len(references[i])
            ids.append(prompt_ids + list(references[i]) + [pad_token_id] * right)
            mask.append(prompt_mask + [1] * len(references[i]) + [0] * right)
        input_ids, mask = torch.tensor(ids, device=device), torch.tensor(mask, device=device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        past = None
        if prefix is not None:  # this pass's rows start from their adapters' prefix
            prefix_cache, which = prefix
            past = DynamicCache(ddp_cache_data=(
                (keys[which[first:first + len(rows)]], values[which[first:first + len(rows)]])
                for keys, values, _ in prefix_cache))
        with torch.no_grad(), mora.adapters_per_row(model, [adapters[i] for i in rows]):
            output = model(input_ids=input_ids[:, shared:], attention_mask=mask, position_ids=positions[:, shared:],
                           cache=past, use_cache=keep_cache or past is not None, logits_to_keep=answer_width + 1)
        # the kept logits start at position prompt_width - 1, the prompt's last: logits[:, j] predicts reference token j
        logits = output.logits.float()
        for row, i in enumerate(rows):
            if not references[i]:
                losses.append(float("nan"))
                continue
            target = torch.tensor(references[i], device=device)
            losses.append(float(torch.nn.functional.cross_entropy(logits[row, :len(references[i])], target)))
        chunk = getattr(output, "cache", None)
        del output, logits, past  # not held through the next pass
        if not keep_cache:
            continue
        if not _plain_cache(chunk):
            keep_cache, cache = False, None
            continue
        if cache is None:  # one layer allocated at a time (a generator), so the cache is never held twice
            cache = DynamicCache(ddp_cache_data=(
                (keys.new_empty((len(prompts), keys.shape[1], prompt_width - 1, keys.shape[3])),
                 values.new_empty((len(prompts), values.shape[1], prompt_width - 1, values.shape[3])))
                for keys, values, _ in chunk))
        for (keys, values, _), (chunk_keys, chunk_values, _) in zip(cache, chunk):
            keys[first:first + len(rows)] = chunk_keys[:, :, :prompt_width - 1]
            values[first:first + len(rows)] = chunk_values[:, :, :prompt_width - 1]
    return PromptPass(losses, cache, shared if cache is not None else 0)


def answer_batches(model, tokenizer, examples: Sequence[EvalExample], rows: Sequence[int],
                   adapters: Sequence[Optional[str]], max_new_tokens: int, batch_rows: int = DEFAULT_BATCH_ROWS,
                   should_stop: Optional[Callable[[], bool]] = None) -> Iterator[list[Answer]]:
    """For each batch of examples, every row's answer (row `rows[i]` uses `adapters[i]` on `model`) with its
    scores: teacher-forced losses over examples × rows, then one batched greedy generation over the same rows that
    continues from the teacher-forced pass's prompt cache. The model is left in the mode (train or eval) it came in."""
    from workers.generation import GenerationSettings, stream_rows

    prompts, references = prepare(tokenizer, examples, max_new_tokens, model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    per_batch = max(1, batch_rows // max(1, len(rows)))
    greedy = GenerationSettings(max_new_tokens=max_new_tokens, temperature=0.0, top_p=1.0, seed=0)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(examples), per_batch):
            if should_stop is not None and should_stop():
                return
            batch = range(start, min(start + per_batch, len(examples)))
            pairs = [(i, k) for i in batch for k in range(len(rows))]
            batch_prompts, batch_adapters = [prompts[i] for i, _ in pairs], [adapters[k] for _, k in pairs]
            prompt_pass = losses_and_prompt_cache(model, batch_prompts, [references[i] for i, _ in pairs],
                                                  batch_adapters, pad)
            outputs = []
            for outputs in stream_rows(model, tokenizer, batch_prompts, batch_adapters, [greedy] * len(pairs),
                                       cache=prompt_pass.cache, shared_prefix=prompt_pass.shared_prefix):
                pass
            losses = prompt_pass.losses
            del prompt_pass
            answers = []
            for (i, k), output, loss in zip(pairs, outputs, losses):
                scores: dict[str, Optional[float]] = dict(score_answer(output.text, examples[i].reference))
                scores["answer_loss"] = loss if math.isfinite(loss) else None
                scores["perplexity"] = math.exp(min(loss, 700)) if math.isfinite(loss) else None
                answers.append(Answer(examples[i].example, rows[k], output.text, scores))
            yield answers
    finally:
        model.train(was_training)


def summarize(answers: Sequence[Answer]) -> dict[int, dict[str, Optional[float]]]:
    """Per row, each metric's mean over its answers; perplexity is exp of the mean answer loss."""
    by_row: dict[int, list[Answer]] = {}
    for answer in answers:
        by_row.setdefault(answer.row, []).append(answer)
    summary = {}
    for row, row_answers in sorted(by_row.items()):
        means: dict[str, Optional[float]] = {}
        for metric in METRICS:
            values = [a.scores.get(metric) for a in row_answers if a.scores.get(metric) is not None]
            means[metric] = sum(values) / len(values) if values else None
        loss = means.get("answer_loss")
        means["perplexity"] = math.exp(min(loss, 700)) if loss is not None else None
        summary[row] = means
    return summary


# ---- a whole evaluation on a chat engine ---------------------------------------------------------------------------

@dataclass
class EvalRow:
    label: str
    run_id: Optional[str] = None
    adapter_path: Optional[str] = None
    model_path: Optional[str] = None
    step: Optional[int] = None
    """The row's run's step when it was evaluated (what its scores are plotted at)."""


@dataclass
class EvalRequest:
    base_model: Optional[str]
    rows: list[EvalRow]
    source: EvalSource
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    batch_rows: int = 0
    judge: Optional[dict[str, Any]] = None
    """`workers.judge.JudgeSettings` as a dict, or None for no judge."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Any) -> "EvalRequest":
        if not isinstance(values, dict):
            raise EvalError(f"an evaluation request is an object, found {type(values).__name__}")
        raw_rows = values.get("rows")
        if not isinstance(raw_rows, list) or not 1 <= len(raw_rows) <= MAX_ROWS:
            raise EvalError(f"rows: between 1 and {MAX_ROWS} runs (or the base model) answer side by side")
        rows = []
        for index, raw in enumerate(raw_rows):
            if not isinstance(raw, dict) or not isinstance(raw.get("label"), str):
                raise EvalError(f"rows[{index}]: expected {{label, run_id, adapter_path, model_path, step}}")
            unknown = set(raw) - {f for f in EvalRow.__dataclass_fields__}
            if unknown:
                raise EvalError(f"rows[{index}]: unknown field {sorted(unknown)[0]!r}")
            rows.append(EvalRow(**raw))
        max_new_tokens = values.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS)
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or not (
                1 <= max_new_tokens <= MAX_NEW_TOKENS):
            raise EvalError(f"max_new_tokens: between 1 and {MAX_NEW_TOKENS}, got {max_new_tokens!r}")
        batch_rows = values.get("batch_rows", 0)
        if isinstance(batch_rows, bool) or not isinstance(batch_rows, int) or not 0 <= batch_rows <= 4096:
            raise EvalError(f"batch_rows: between 0 (the device's default) and 4096, got {batch_rows!r}")
        base = values.get("base_model")
        if base is not None and not isinstance(base, str):
            raise EvalError("base_model: a model name or folder")
        judge = values.get("judge")
        if judge is not None:
            from workers.judge import JudgeSettings

            JudgeSettings.from_dict(judge)  # checked before anything loads
        return cls(base or None, rows, EvalSource.from_dict(values.get("source")), max_new_tokens, batch_rows, judge)


@dataclass
class EvalResult:
    examples: list[EvalExample]
    answers: list[Answer] = field(default_factory=list)
    scores: dict[int, dict[str, Optional[float]]] = field(default_factory=dict)
    stopped: bool = False


def run_evaluation(engine, request: EvalRequest, on_examples: Callable[[list[EvalExample]], None] = lambda e: None,
                   on_answers: Callable[[list[Answer], int], None] = lambda a, done: None,
                   should_stop: Callable[[], bool] = lambda: False) -> EvalResult:
    """Answer and score every example with every row on `engine` (a `workers.chat.ChatEngine`): rows are grouped by
    model (`ChatEngine._plan`, the chat's check of models and adapter folders), and for each batch of examples each
    model's rows answer together. `on_answers(answers, examples_done)` follows each batch."""
    import torch

    from workers.chat import ChatError, ChatRequest, ChatRow
    from workers.generation import GenerationSettings

    examples = read_examples(request.source)
    chat_rows = [ChatRow(row.label, row.adapter_path, row.model_path) for row in request.rows]
    try:
        plan = engine._plan(ChatRequest(request.base_model, chat_rows, [examples[0].prompt] * len(chat_rows),
                                        GenerationSettings()))
    except ChatError as error:
        raise EvalError(str(error)) from None
    batch_rows = request.batch_rows or (256 if torch.cuda.is_available() else DEFAULT_BATCH_ROWS)
    per_batch = max(1, batch_rows // len(request.rows))

    def loaded(group) -> tuple[Any, list[Optional[str]]]:
        """The group's resident model and its rows' adapter names (loaded once, then from the engine's cache)."""
        resident = engine.model(group.model, [chat_rows[i].label for i in group.rows])
        keep = {Path(chat_rows[i].adapter_path).expanduser().resolve() for i in group.rows
                if chat_rows[i].adapter_path}
        return resident, [engine.adapter(resident, Path(chat_rows[i].adapter_path), chat_rows[i].label, keep=keep)
                          if chat_rows[i].adapter_path else None for i in group.rows]

    def check_lengths() -> None:  # every prompt must fit every model before anything is generated
        for group in plan:
            resident, _ = loaded(group)
            prepare(resident.tokenizer, examples, request.max_new_tokens, resident.model)

    def answer(batch, group) -> list[Answer]:
        resident, adapters = loaded(group)
        return [answer for answers in answer_batches(resident.model, resident.tokenizer, batch, group.rows,
                                                     adapters, request.max_new_tokens, batch_rows)
                for answer in answers]

    try:
        engine.turns.run(check_lengths)
        on_examples(examples)
        result = EvalResult(examples)
        for start in range(0, len(examples), per_batch):
            if should_stop():
                result.stopped = True
                break
            batch = examples[start:start + per_batch]
            for group in plan:  # a turn per batch: a chat answer of another job waits for this batch only
                result.answers += engine.turns.run(functools.partial(answer, batch, group))
            on_answers([a for a in result.answers if start <= a.example < start + len(batch)], start + len(batch))
    except ChatError as error:
        raise EvalError(str(error)) from None
    result.scores = summarize(result.answers)
    return result


# ---- on the queue -------------------------------------------------------------------------------------------------

class EvalEvents:
    """Stamps evaluation events (eval id, sequence number, time, kind) and publishes them on the evaluation's stream,
    which survives a Redis restart as a run's does (`bus.RedisStreamSink`)."""

    def __init__(self, client, eval_id: str) -> None:
        from workers import bus

        self.eval_id = eval_id
        self.sink = bus.RedisStreamSink(client, eval_id, key=bus.eval_stream_key(eval_id))
        self._seq = 0

    def emit(self, kind: str, **fields: Any) -> None:
        self.sink.emit({"eval_id": self.eval_id, "seq": self._seq, "time": time.time(), "kind": kind, **fields})
        self._seq += 1

    def status(self, status: str, message: str = "", **fields: Any) -> None:
        self.emit("eval_status", status=status, message=message, **fields)


def run_queued_evaluation(url: str, eval_id: str, request: Any, worker: str = "") -> None:
    """The `mora.evaluate` task: evaluate on the worker's chat engine, publishing events as the module docstring
    says; every failure ends the evaluation `failed` with a message, never unanswered."""
    from workers import bus
    from workers.chat import default_engine

    client = bus.connect(url)
    events = EvalEvents(client, eval_id)
    events.status("running", "loading the models and the data", worker=worker)
    try:
        parsed = EvalRequest.from_dict(request)
        steps = {index: row.step for index, row in enumerate(parsed.rows)}
        runs = {index: row.run_id for index, row in enumerate(parsed.rows)}

        def examples_out(examples: list[EvalExample]) -> None:
            events.status("running", f"answering {len(examples)} prompts", examples_total=len(examples))
            for start in range(0, len(examples), EXAMPLES_PER_EVENT):  # stream entries stay small
                events.emit("eval_examples", examples=[asdict(e) for e in examples[start:start + EXAMPLES_PER_EVENT]])

        def answers_out(answers: list[Answer], done: int) -> None:
            events.emit("eval_answers", answers=[asdict(answer) for answer in answers], examples_done=done)

        result = run_evaluation(default_engine(), parsed, examples_out, answers_out,
                                lambda: bus.eval_cancel_requested(client, eval_id))
        events.emit("eval_scores", scores=[{"row": row, "run_id": runs[row], "step": steps[row], "metric": metric,
                                            "value": value}
                                           for row, means in result.scores.items() for metric, value in means.items()])
        if result.stopped:
            events.status("cancelled", f"stopped after {len({a.example for a in result.answers})} prompts")
            return
        done = f"{len(result.examples)} prompts answered by {len(parsed.rows)} rows"
        if parsed.judge is not None:
            from workers.judge import JudgeError, JudgeSettings, judge_evaluation

            events.status("running", "the judge is reading the answers")
            try:
                verdicts = judge_evaluation(JudgeSettings.from_dict(parsed.judge), result,
                                            [row.label for row in parsed.rows])
            except JudgeError as error:  # the answers and scores stand; the judge's part is what failed
                events.status("succeeded", f"{done}; the judge failed: {error}")
                return
            events.emit("eval_judged", answers=verdicts["answers"], examples=verdicts["examples"])
            events.emit("eval_scores", scores=[{"row": row, "run_id": runs[row], "step": steps[row], "metric": metric,
                                                "value": value} for row, means in verdicts["scores"].items()
                                               for metric, value in means.items()])
        events.status("succeeded", done)
    except (EvalError, ValueError) as error:
        events.status("failed", str(error))
    except Exception as error:  # a bug or the machine's failure: the evaluation still ends with a reason
        log.exception("evaluation %s failed", eval_id)
        events.status("failed", f"evaluation failed ({type(error).__name__}: {error})")
