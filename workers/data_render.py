"""From validated examples to token ids and labels for a causal LM, and a view of which tokens train.

`workers.data` reads and checks the user's file and holds the public API; this module is the part that needs a
tokenizer.

Conversations (every schema but `text`) are rendered with the model's chat template and trained only on the
assistant turns: each assistant message's content and the end-of-turn token right after it (`<|im_end|>` for
ChatML), so the model learns to stop. Everything else gets the label -100. The assistant spans are found in the
rendered text, not with the template's `{% generation %}` markers, which most templates (SmolLM2's among them) lack;
tokens are then marked through the tokenizer's character offsets, so this needs a fast tokenizer.
A tokenizer without a chat template gets a plain "User: ...\\nAssistant: ...<eos>" rendering instead, and the
report says so.

Raw `text` documents are tokenized, each followed by the eos token, concatenated and cut into blocks of exactly
`max_length` tokens, all trained; the last, partial block is kept if at least half full. Blocks attend across the
document boundaries inside them, as usual for packed pretraining. Without packing (`pack_text=False`), each document
is one example, cut to `max_length` and padded in its batch.

Tokenized examples are written to a memory-mapped Arrow file with `datasets` as they are made, so a big dataset is
never a list of Python token lists. transformers is imported for type hints only, and `datasets` only when examples
are written: the web process imports `workers.data` and needs neither.
"""
from __future__ import annotations

import re
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Iterable, Iterator, Optional, Union

from jinja2 import TemplateError

if TYPE_CHECKING:
    import datasets
    from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
TOKENIZE_BATCH = 512
_WHITESPACE = re.compile(r"\s*")

Message = dict[str, str]
Conversation = list[Message]
Features = dict[str, list[int]]


@dataclass
class Example:
    """One validated row: the conversation it trains on, or its document for the `text` schema."""

    row: int
    content: Union[Conversation, str]


@dataclass
class DataReport:
    """What building the data did to the user's rows, shown before training starts."""

    rows_in: int
    """Rows read, from the training file and the eval file if there is one."""
    examples_out: int = 0
    """Training plus eval examples (packed blocks for `text`)."""
    dropped: list[tuple[int, str]] = field(default_factory=list)
    """(row, reason) for each row that yields no example."""
    truncated: list[int] = field(default_factory=list)
    """Rows cut to max_length."""
    total_tokens: int = 0
    trained_tokens: int = 0
    """Tokens with a label, over both splits."""
    notes: list[str] = field(default_factory=list)


@dataclass
class EncodedConversation:
    """One tokenized conversation, with the text it came from so the trained parts can be shown."""

    row: int
    text: str
    input_ids: list[int]
    offsets: list[tuple[int, int]]
    trained: list[bool]

    def features(self) -> Features:
        labels = [token if trained else IGNORE_INDEX for token, trained in zip(self.input_ids, self.trained)]
        return {"input_ids": self.input_ids, "labels": labels, "attention_mask": [1] * len(self.input_ids)}

    def segments(self) -> list[tuple[str, bool]]:
        """The text cut where training switches on or off; a cut falls where the next token starts, and the text
        ends where the last token does (truncation may have cut it)."""
        segments: list[tuple[str, bool]] = []
        start = 0
        for index in range(1, len(self.trained) + 1):
            if index == len(self.trained) or self.trained[index] != self.trained[index - 1]:
                end = self.offsets[-1][1] if index == len(self.trained) else max(start, self.offsets[index][0])
                segments.append((self.text[start:end], self.trained[index - 1]))
                start = end
        return segments


class _RenderError(Exception):
    """A conversation that cannot be rendered with this tokenizer; its row is dropped with this reason."""


class ChatRenderer:
    """Renders conversations to text and finds the character spans to train on."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        if not tokenizer.is_fast:
            raise ValueError("training on assistant tokens needs a fast tokenizer (one that reports character "
                             f"offsets); {type(tokenizer).__name__} is not")
        self.tokenizer = tokenizer
        self.has_template = bool(tokenizer.chat_template)
        specials = set(tokenizer.all_special_tokens)
        specials.update(t.content for t in tokenizer.added_tokens_decoder.values() if t.special)
        self.special_tokens = sorted(specials, key=len, reverse=True)
        self.generation_prompt = self._generation_prompt() if self.has_template else ""

    def _generation_prompt(self) -> str:
        """What the template writes before an assistant's content (`<|im_start|>assistant\\n` for ChatML).

        An assistant's content is searched for after it, so an answer that happens to read "assistant" is not
        found inside its own header.
        """
        probe = [{"role": "user", "content": "x"}]
        try:
            bare = self.tokenizer.apply_chat_template(probe, tokenize=False)
            prompted = self.tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=True)
        except TemplateError:
            return ""
        return prompted[len(bare):] if prompted.startswith(bare) else ""

    def _end_of_turn(self, text: str, end: int) -> int:
        """Where the special token that closes an assistant turn ends: right after the content, or after
        whitespace when it is the eos token (Llama 2 writes `answer </s>`). `end` when there is none."""
        for token in self.special_tokens:
            if text.startswith(token, end):
                return end + len(token)
        after_space = _WHITESPACE.match(text, end).end()
        eos = self.tokenizer.eos_token
        if eos and text.startswith(eos, after_space):
            return after_space + len(eos)
        return end

    def render(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
        """The conversation as the model sees it, and the character spans of its assistant turns."""
        if not self.has_template:
            return self._render_plain(conversation)
        try:
            text = self.tokenizer.apply_chat_template(conversation, tokenize=False)
        except TemplateError as error:
            raise _RenderError(f"the model's chat template rejects it: {error}") from None
        # Each message is searched for after the previous one, so an answer that repeats the question is found in
        # the answer. Templates may trim whitespace around content; the trimmed content is still there verbatim.
        spans, cursor = [], 0
        for number, message in enumerate(conversation, start=1):
            content = message["content"].strip()
            if message["role"] != "assistant":
                # Some templates rewrite or drop other turns (a system prompt folded into the first user turn).
                start = text.find(content, cursor)
                cursor = start + len(content) if start >= 0 else cursor
                continue
            if self.generation_prompt:
                header = text.find(self.generation_prompt, cursor)
                cursor = header + len(self.generation_prompt) if header >= 0 else cursor
            start = text.find(content, cursor)
            if start < 0:
                raise _RenderError(f"the model's chat template changes the text of message {number}, so its "
                                   "trained tokens cannot be located")
            cursor = start + len(content)
            spans.append((start, self._end_of_turn(text, cursor)))
        return text, spans

    def _render_plain(self, conversation: Conversation) -> tuple[str, list[tuple[int, int]]]:
        eos = self.tokenizer.eos_token or ""
        text, spans = "", []
        for message in conversation:
            text += f"{message['role'].capitalize()}: "
            if message["role"] == "assistant":
                spans.append((len(text), len(text) + len(message["content"]) + len(eos)))
                text += message["content"] + eos
            else:
                text += message["content"]
            text += "\n"
        return text, spans


def _mark_trained(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[bool]:
    """Whether each token overlaps an assistant span: a token straddling a span's edge (a leading space merged
    into the first word) is trained rather than losing the word."""
    trained, index = [], 0
    for start, end in offsets:
        while index < len(spans) and spans[index][1] <= start:
            index += 1
        trained.append(index < len(spans) and spans[index][0] < end and start < spans[index][1])
    return trained


def _batches(items: Iterable, size: int) -> Iterator[list]:
    iterator = iter(items)
    while batch := list(islice(iterator, size)):
        yield batch


def chat_renderer(tokenizer: PreTrainedTokenizerBase, report: DataReport) -> ChatRenderer:
    """The renderer for this tokenizer; the report says when it falls back to plain text."""
    renderer = ChatRenderer(tokenizer)
    if not renderer.has_template:
        report.notes.append("the tokenizer has no chat template: conversations are rendered as plain "
                            "'User: ...' / 'Assistant: ...' lines, each answer followed by the eos token")
    return renderer


def _encode(examples: Iterable[Example], renderer: ChatRenderer, report: DataReport,
            batch_size: int = TOKENIZE_BATCH) -> Iterator[EncodedConversation]:
    """Render and tokenize conversations lazily, in batches (the tokenizer is much faster on a batch)."""
    for batch in _batches(examples, batch_size):
        rendered = []
        for example in batch:
            try:
                rendered.append((example.row, *renderer.render(example.content)))
            except _RenderError as error:
                report.dropped.append((example.row, str(error)))
        if not rendered:
            continue
        encoding = renderer.tokenizer([text for _, text, _ in rendered], add_special_tokens=False,
                                      return_offsets_mapping=True)
        for (row, text, spans), ids, offsets in zip(rendered, encoding["input_ids"], encoding["offset_mapping"]):
            offsets = [tuple(o) for o in offsets]
            yield EncodedConversation(row, text, ids, offsets, _mark_trained(offsets, spans))


def _fit(encoded: EncodedConversation, max_length: int, report: DataReport) -> Optional[EncodedConversation]:
    """Cut an example to max_length, or drop it when none of its trained tokens would remain."""
    if not any(encoded.trained):
        report.dropped.append((encoded.row, "no assistant token found in the rendered text"))
        return None
    if len(encoded.input_ids) <= max_length:
        return encoded
    if not any(encoded.trained[:max_length]):
        prompt = encoded.trained.index(True)
        report.dropped.append((encoded.row, f"every trained token lies beyond max_length={max_length} "
                                            f"(the prompt alone is {prompt} tokens)"))
        return None
    report.truncated.append(encoded.row)
    return EncodedConversation(encoded.row, encoded.text, encoded.input_ids[:max_length],
                               encoded.offsets[:max_length], encoded.trained[:max_length])


def encode_conversations(examples: Iterable[Example], renderer: ChatRenderer, max_length: int,
                         report: DataReport, batch_size: int = TOKENIZE_BATCH) -> Iterator[EncodedConversation]:
    """Each conversation rendered, tokenized and fitted to max_length, lazily (a preview needs only the first);
    rows that yield nothing to train on are recorded in the report and skipped."""
    for encoded in _encode(examples, renderer, report, batch_size):
        fitted = _fit(encoded, max_length, report)
        if fitted is not None:
            yield fitted


def document_tokens(examples: Iterable[Example], tokenizer: PreTrainedTokenizerBase,
                    report: DataReport, batch_size: int = TOKENIZE_BATCH) -> Iterator[tuple[int, list[int]]]:
    """Each non-empty document's row and tokens followed by eos, so the model learns where a document ends."""
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    for batch in _batches(examples, batch_size):
        documents = []
        for example in batch:
            if example.content.strip():
                documents.append(example)
            else:
                report.dropped.append((example.row, "empty text"))
        if documents:
            encoded = tokenizer([d.content for d in documents], add_special_tokens=False)["input_ids"]
            yield from ((d.row, ids + eos) for d, ids in zip(documents, encoded))


def _block(tokens: list[int]) -> Features:
    return {"input_ids": tokens, "labels": list(tokens), "attention_mask": [1] * len(tokens)}


def pack(token_lists: Iterable[list[int]], max_length: int, report: DataReport, split: str) -> Iterator[Features]:
    """Blocks of exactly max_length tokens from the documents' tokens laid end to end, holding less than one block
    besides the document being cut; a last, shorter block is worth training on only if at least half full."""
    pending: list[int] = []
    for tokens in token_lists:
        pending.extend(tokens)
        full = len(pending) - len(pending) % max_length
        for start in range(0, full, max_length):
            yield _block(pending[start:start + max_length])
        pending = pending[full:]
    if not pending:
        return
    if 2 * len(pending) >= max_length:
        report.notes.append(f"{split}: kept the last block of {len(pending)} tokens (at least half of "
                            f"max_length={max_length})")
        yield _block(pending)
    else:
        report.notes.append(f"{split}: dropped the last {len(pending)} tokens (less than half of "
                            f"max_length={max_length})")


def unpacked(examples: Iterable[Example], tokenizer: PreTrainedTokenizerBase, max_length: int,
             report: DataReport) -> Iterator[Features]:
    """One example per document (its tokens and eos), cut to max_length: what a task needs whose examples must not
    share a sequence, such as key:value pairs recalled one at a time."""
    for row, tokens in document_tokens(examples, tokenizer, report):
        if len(tokens) > max_length:
            report.truncated.append(row)
            tokens = tokens[:max_length]
        yield _block(tokens)


def prepare(examples: Iterable[Example], tokenizer: PreTrainedTokenizerBase, renderer: Optional[ChatRenderer],
            max_length: int, report: DataReport, split: str, pack_text: bool = True) -> Iterator[Features]:
    """Raw text (no renderer): packed blocks, or one example per document without `pack_text`; else one example
    per conversation. Lazily: one tokenizer batch of the file at a time."""
    if renderer is None and not pack_text:
        return unpacked(examples, tokenizer, max_length, report)
    if renderer is None:
        return pack((tokens for _, tokens in document_tokens(examples, tokenizer, report)), max_length, report, split)
    return (encoded.features() for encoded in encode_conversations(examples, renderer, max_length, report))


class TokenizedExamples(Sequence):
    """Training examples ({input_ids, labels, attention_mask}) in a memory-mapped Arrow table: indexing reads one
    example, so the tokenized set is never Python lists in memory. What `Trainer` and `collate` take."""

    def __init__(self, dataset: "datasets.Dataset") -> None:
        self._dataset = dataset

    def __len__(self) -> int:
        return self._dataset.num_rows

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self._dataset[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(f"example {index} of {len(self)}")
        return self._dataset[index]


def write_examples(examples: Iterable[Features], cache_dir: Path, report: DataReport) -> TokenizedExamples:
    """Write examples to an Arrow file with `datasets`, a writer batch at a time, and map it back; count tokens.

    The file is deleted as soon as it is mapped: the mapping keeps its pages readable (POSIX), and nothing is left
    in the cache folder, even when the worker is killed later.
    """
    import datasets
    from datasets.arrow_writer import ArrowWriter

    cache_dir.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix="tokenized-", dir=cache_dir))
    try:
        path = folder / "examples.arrow"
        columns = datasets.Features({key: datasets.List(datasets.Value("int32"))
                                     for key in ("input_ids", "labels", "attention_mask")})
        with ArrowWriter(features=columns, path=str(path)) as writer:
            for example in examples:
                writer.write(example)
                report.total_tokens += len(example["input_ids"])
                report.trained_tokens += sum(label != IGNORE_INDEX for label in example["labels"])
            writer.finalize()
        return TokenizedExamples(datasets.Dataset.from_file(str(path), in_memory=False))
    finally:
        shutil.rmtree(folder, ignore_errors=True)
