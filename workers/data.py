"""Reading a user's dataset file and checking every row before a model sees it.

Formats, by extension: `.jsonl`/`.ndjson` (one object per line), `.json` (a list of objects), `.csv` (a header row),
`.parquet`, `.txt`. Schemas, by columns, in this order when a row has the columns of several:

| schema              | columns                                                               | trains on       |
|---------------------|-----------------------------------------------------------------------|-----------------|
| `chat`              | `messages`: [{role, content}], role system, user or assistant         | assistant turns |
| `sharegpt`          | `conversations`: [{from, value}], from human, gpt, system (or user,   | gpt turns       |
|                     | assistant)                                                            |                 |
| `alpaca`            | `instruction`, `output`, optional `input`; the user turn is the       | output          |
|                     | instruction, a blank line, and the input                              |                 |
| `prompt_completion` | `prompt`, `completion`                                                | completion      |
| `text`              | `text` (continual pretraining)                                        | every token     |

Other columns are ignored. A `.txt` file holds one document per paragraph: paragraphs are separated by blank lines
(lines with only whitespace count as blank), so a file without blank lines is one document. Paragraphs rather than
lines, because prose wraps its lines and a line is rarely a whole thought; rather than the whole file, because a
file of many short documents would otherwise become one.

JSONL, JSON, CSV and text are parsed here in plain Python rather than with `datasets.load_dataset`, whose errors name
neither the line nor the field, and whose CSV reader turns an empty cell into a float NaN. Parquet is read with
pyarrow, the reader `datasets` uses underneath, called directly so that the user's file is not copied into a cache.

Every problem with the user's file becomes a `DatasetError` naming the file, the row and the field. Row numbers are
what the user sees in an editor: the line for JSONL, CSV and text, the 1-based position for JSON lists and Parquet.

This module holds the public API (`inspect_dataset`, `build_datasets`, `collate`, `preview`); the work that needs a
tokenizer is in `workers.data_render`. Importing it loads neither torch nor transformers: the web process calls
`inspect_dataset` on upload and never loads a model.
"""
from __future__ import annotations

import csv
import io
import json
import random
from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Union

import pyarrow
import pyarrow.parquet

from workers.data_render import (IGNORE_INDEX, Conversation, DataReport, Example, Features, chat_renderer,
                                 document_tokens, encode_conversations, pack, prepare)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
           ".txt": "text"}
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
PREVIEW_ROWS = 5
EXPECTED_COLUMNS = ("'messages' (chat), 'conversations' (ShareGPT), 'instruction' + 'output' with an optional "
                    "'input' (alpaca), 'prompt' + 'completion', or 'text' (raw text for continual pretraining)")
# A long document in a text CSV easily passes csv's default cell limit of 128 KiB.
CSV_FIELD_LIMIT = 1 << 30

Row = tuple[int, Any]


class DatasetError(ValueError):
    """A dataset the user must fix, saying where (file, row, field) and what was expected."""


class _RowError(Exception):
    """A problem inside one row; the caller adds the file name and row number."""


@dataclass
class DatasetInfo:
    """What the Data tab shows and `storage` records about an uploaded file."""

    path: Path
    file_format: str
    """One of `jsonl`, `json`, `csv`, `parquet`, `text`."""
    schema: str
    """One of `chat`, `sharegpt`, `alpaca`, `prompt_completion`, `text`."""
    rows: int
    columns: list[str]
    """Every column seen, in order of first appearance, including those the schema ignores."""
    preview_rows: list[dict[str, Any]]
    """The first rows as read, before any conversion."""


def _type_name(value: Any) -> str:
    """The JSON name of a value's type, which is what a user editing the file knows."""
    names = {type(None): "null", dict: "object", list: "list", str: "str", bool: "bool", int: "int", float: "float"}
    return names.get(type(value), type(value).__name__)


def _string(row: Mapping[str, Any], field: str, required: bool = True) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise _RowError(f"'{field}' must be a string, found {_type_name(value)}")
    if required and not value.strip():
        raise _RowError(f"'{field}' is empty")
    return value


def _conversation(row: Mapping[str, Any], field: str, role_key: str, content_key: str,
                  roles: Mapping[str, str]) -> Conversation:
    """Turns of a chat-like field as {role, content} messages with the roles chat templates know."""
    turns = row[field]
    shape = f"{{{role_key}, {content_key}}}"
    if not isinstance(turns, list):
        raise _RowError(f"'{field}' must be a list of {shape}, found {_type_name(turns)}")
    if not turns:
        raise _RowError(f"'{field}' is an empty list")
    messages = []
    for number, turn in enumerate(turns, start=1):
        where = f"message {number} in '{field}'"
        if not isinstance(turn, dict):
            raise _RowError(f"{where} must be an object {shape}, found {_type_name(turn)}")
        for key in (role_key, content_key):
            if turn.get(key) is None:
                raise _RowError(f"{where} has no '{key}'")
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise _RowError(f"{where} has {role_key} {turn[role_key]!r}; expected one of {', '.join(roles)}")
        content = turn[content_key]
        if not isinstance(content, str):
            raise _RowError(f"{where}: '{content_key}' must be a string, found {_type_name(content)}")
        if role == "assistant" and not content.strip():
            raise _RowError(f"{where} is an assistant turn with an empty '{content_key}'")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        assistant_names = [name for name, role in roles.items() if role == "assistant"]
        raise _RowError(f"'{field}' has no assistant message ({role_key} {' or '.join(assistant_names)}), "
                        "so there is nothing to train on")
    return messages


def _alpaca(row: Mapping[str, Any]) -> Conversation:
    instruction = _string(row, "instruction")
    extra = _string(row, "input", required=False) if row.get("input") is not None else ""
    user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": user}, {"role": "assistant", "content": _string(row, "output")}]


def _prompt_completion(row: Mapping[str, Any]) -> Conversation:
    return [{"role": "user", "content": _string(row, "prompt")},
            {"role": "assistant", "content": _string(row, "completion")}]


@dataclass(frozen=True)
class _Schema:
    name: str
    required: tuple[str, ...]
    convert: Callable[[Mapping[str, Any]], Union[Conversation, str]]


_SCHEMAS = (
    _Schema("chat", ("messages",), lambda row: _conversation(row, "messages", "role", "content", CHAT_ROLES)),
    _Schema("sharegpt", ("conversations",),
            lambda row: _conversation(row, "conversations", "from", "value", SHAREGPT_ROLES)),
    _Schema("alpaca", ("instruction", "output"), _alpaca),
    _Schema("prompt_completion", ("prompt", "completion"), _prompt_completion),
    # An empty document is not an error: it is dropped, with its row, when the data is built.
    _Schema("text", ("text",), lambda row: _string(row, "text", required=False)),
)


def _detect(row: Mapping[str, Any]) -> Optional[_Schema]:
    return next((s for s in _SCHEMAS if all(column in row for column in s.required)), None)


def _quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in names) or "none"


def _unknown_schema(name: str, columns: Iterable[str]) -> DatasetError:
    found = list(columns)
    partial = [f"it has {_quoted(c for c in s.required if c in found)} but not "
               f"{_quoted(c for c in s.required if c not in found)}"
               for s in _SCHEMAS if any(c in found for c in s.required)]
    hint = f" ({'; '.join(partial)})" if partial else ""
    return DatasetError(f"{name}: no recognised format: found columns {_quoted(found)}{hint}; "
                        f"expected {EXPECTED_COLUMNS}")


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    if not data:
        raise DatasetError(f"{path.name}: the file is empty")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise DatasetError(f"{path.name}, line {line}: not UTF-8 text (byte 0x{data[error.start]:02x}); "
                           "save the file as UTF-8") from None
    if not text.strip():
        raise DatasetError(f"{path.name}: the file contains only whitespace")
    return text


def _jsonl_rows(path: Path) -> list[Row]:
    rows = []
    # Not splitlines(): it also splits at U+2028 and U+0085, which JSON strings may contain unescaped.
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append((number, json.loads(line)))
        except json.JSONDecodeError as error:
            raise DatasetError(f"{path.name}, row {number}: not valid JSON ({error.msg} at column {error.colno})"
                               ) from None
    return rows


def _json_rows(path: Path) -> list[Row]:
    try:
        value = json.loads(_read_text(path))
    except json.JSONDecodeError as error:
        hint = "; one object per line is JSONL: name the file .jsonl" if error.msg == "Extra data" else ""
        raise DatasetError(f"{path.name}: not valid JSON ({error.msg} at line {error.lineno}, "
                           f"column {error.colno}){hint}") from None
    if not isinstance(value, list):
        raise DatasetError(f"{path.name}: the top level must be a list of rows [{{...}}, ...], "
                           f"found {_type_name(value)}")
    return list(enumerate(value, start=1))


def _csv_rows(path: Path) -> list[Row]:
    csv.field_size_limit(CSV_FIELD_LIMIT)
    reader = csv.reader(io.StringIO(_read_text(path), newline=""))
    header: Optional[list[str]] = None
    rows: list[Row] = []
    last_line = 0
    try:
        for record in reader:
            line, last_line = last_line + 1, reader.line_num
            if not any(cell.strip() for cell in record):
                continue
            if header is None:
                header = [cell.strip() for cell in record]
                repeated = sorted({c for c in header if header.count(c) > 1})
                if repeated:
                    raise DatasetError(f"{path.name}, row {line}: the header repeats {_quoted(repeated)}")
                continue
            if len(record) != len(header):
                raise DatasetError(f"{path.name}, row {line}: {len(record)} fields, but the header has "
                                   f"{len(header)} ({_quoted(header)})")
            rows.append((line, dict(zip(header, record))))
    except csv.Error as error:
        raise DatasetError(f"{path.name}, row {reader.line_num}: not valid CSV ({error})") from None
    return rows


def _parquet_rows(path: Path) -> list[Row]:
    try:
        table = pyarrow.parquet.read_table(path)
    except (pyarrow.ArrowException, OSError) as error:
        raise DatasetError(f"{path.name}: not a Parquet file, or a damaged one ({error})") from None
    return list(enumerate(table.to_pylist(), start=1))


def _text_rows(path: Path) -> list[Row]:
    rows: list[Row] = []
    paragraph: list[str] = []
    start = 0
    for number, line in enumerate(_read_text(path).split("\n"), start=1):
        if line.strip():
            if not paragraph:
                start = number
            paragraph.append(line.rstrip("\r"))
        elif paragraph:
            rows.append((start, {"text": "\n".join(paragraph)}))
            paragraph = []
    if paragraph:
        rows.append((start, {"text": "\n".join(paragraph)}))
    return rows


_READERS: dict[str, Callable[[Path], list[Row]]] = {
    "jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows, "text": _text_rows,
}


def _raw_rows(path: Path) -> tuple[str, list[Row]]:
    if not path.exists():
        raise DatasetError(f"{path.name}: no such file ({path})")
    if not path.is_file():
        raise DatasetError(f"{path.name}: not a file ({path})")
    file_format = FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise DatasetError(f"{path.name}: unsupported file type '{path.suffix}'; expected one of "
                           f"{', '.join(FORMATS)}")
    try:
        rows = _READERS[file_format](path)
    except OSError as error:
        raise DatasetError(f"{path.name}: cannot read the file ({error.strerror})") from None
    if not rows:
        raise DatasetError(f"{path.name}: the file has no rows")
    return file_format, rows


def read_dataset(path: Union[str, Path]) -> tuple[DatasetInfo, list[Example]]:
    """Read and validate every row of a dataset file; raise `DatasetError` at the first problem.

    All rows are checked, not a sample, so that a run never fails an hour in on row 40,000.
    """
    path = Path(path)
    name = path.name
    file_format, rows = _raw_rows(path)
    columns: dict[str, None] = {}
    examples = []
    schema: Optional[_Schema] = None
    for number, row in rows:
        if not isinstance(row, dict):
            raise DatasetError(f"{name}, row {number}: each row must be an object with named fields, "
                               f"found {_type_name(row)}")
        columns.update(dict.fromkeys(row))
        row_schema = _detect(row)
        if schema is None:
            if row_schema is None:
                raise _unknown_schema(name, row)
            schema, first_row = row_schema, number
        elif row_schema is None:
            missing = [c for c in schema.required if c not in row]
            raise DatasetError(f"{name}, row {number}: no {_quoted(missing)} (found {_quoted(row)}); every row "
                               f"of this {schema.name} file needs {_quoted(schema.required)}")
        elif row_schema is not schema:
            raise DatasetError(f"{name}, row {number}: the row is {row_schema.name} ({_quoted(row_schema.required)}) "
                               f"but row {first_row} is {schema.name} ({_quoted(schema.required)}); "
                               "use one format per file")
        try:
            examples.append(Example(number, schema.convert(row)))
        except _RowError as error:
            raise DatasetError(f"{name}, row {number}: {error}") from None
    info = DatasetInfo(path=path, file_format=file_format, schema=schema.name, rows=len(examples),
                       columns=list(columns), preview_rows=[row for _, row in rows[:PREVIEW_ROWS]])
    return info, examples


def inspect_dataset(path: Union[str, Path]) -> DatasetInfo:
    """Validate a dataset file and describe it (format, schema, row count, columns, first rows) for the Data tab."""
    return read_dataset(path)[0]


@dataclass
class PreparedData:
    """Train and eval examples, each {input_ids, labels, attention_mask} as lists, ready for `collate`."""

    train: list[Features]
    eval: list[Features]
    report: DataReport
    info: DatasetInfo


def _split(examples: list[Example], fraction: float, seed: int, name: str) -> tuple[list[Example], list[Example]]:
    """Hold out rows at random, the same rows for the same seed; file order is kept within each split."""
    count = max(1, round(len(examples) * fraction))
    if count >= len(examples):
        raise DatasetError(f"{name}: eval_fraction={fraction} of {len(examples)} rows leaves no row to train on")
    held_out = set(random.Random(seed).sample(range(len(examples)), count))
    train = [e for i, e in enumerate(examples) if i not in held_out]
    return train, [e for i, e in enumerate(examples) if i in held_out]


def _nothing_left(name: str, split: str, report: DataReport, max_length: int) -> DatasetError:
    reasons = [f"row {row}: {reason}" for row, reason in report.dropped[:3]]
    if len(report.dropped) > 3:
        reasons.append(f"{len(report.dropped) - 3} more rows dropped")
    return DatasetError(f"{name}: no {split} example left with max_length={max_length}: "
                        + "; ".join(reasons + report.notes))


def build_datasets(path: Union[str, Path], tokenizer: PreTrainedTokenizerBase, max_length: int,
                   eval_path: Union[str, Path, None] = None, eval_fraction: float = 0.0,
                   seed: int = 0, pack_text: bool = True) -> PreparedData:
    """Validate, render, tokenize and split a dataset file for training.

    Eval comes from `eval_path`, or from `eval_fraction` of the rows chosen with `seed`. Rows are split before
    rendering and packing, so no eval row reaches a training example. A dropped row of the eval file is reported
    with the eval file's name before its reason, since its row number is that file's. With `pack_text=False` each raw
    text document is an example of its own instead of being packed into blocks with others.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    info, examples = read_dataset(path)
    name = info.path.name
    if not 0.0 <= eval_fraction < 1.0:
        raise DatasetError(f"{name}: eval_fraction must be in [0, 1), got {eval_fraction}")
    report = DataReport(rows_in=len(examples))
    eval_name = None
    if eval_path is not None:
        if eval_fraction:
            raise DatasetError(f"{name}: give an eval file or an eval fraction, not both")
        eval_info, eval_examples = read_dataset(eval_path)
        eval_name = eval_info.path.name
        if (eval_info.schema == "text") != (info.schema == "text"):
            raise DatasetError(f"{eval_name}: the eval file is {eval_info.schema} but the training file {name} is "
                               f"{info.schema}; both must be conversations, or both raw text")
        report.rows_in += len(eval_examples)
    elif eval_fraction:
        examples, eval_examples = _split(examples, eval_fraction, seed, name)
        report.notes.append(f"eval: {len(eval_examples)} of {info.rows} rows, chosen with seed {seed}")
    else:
        eval_examples = []
    renderer = None if info.schema == "text" else chat_renderer(tokenizer, report)
    train = prepare(examples, tokenizer, renderer, max_length, report, "train", pack_text)
    if not train:
        raise _nothing_left(name, "training", report, max_length)
    train_drops = len(report.dropped)
    evaluation = prepare(eval_examples, tokenizer, renderer, max_length, report, "eval", pack_text)
    if eval_name:
        report.dropped[train_drops:] = [(row, f"{eval_name}: {reason}") for row, reason in report.dropped[train_drops:]]
    if eval_examples and not evaluation:
        raise _nothing_left(eval_name or name, "eval", report, max_length)
    examples_out = train + evaluation
    report.examples_out = len(examples_out)
    report.total_tokens = sum(len(e["input_ids"]) for e in examples_out)
    report.trained_tokens = sum(sum(label != IGNORE_INDEX for label in e["labels"]) for e in examples_out)
    return PreparedData(train=train, eval=evaluation, report=report, info=info)


def collate(batch: list[Features], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch to its longest example: padding is unattended and carries no loss."""
    # Imported here, not at the top: the web process imports this module for `inspect_dataset` and never loads torch.
    import torch

    width = max(len(example["input_ids"]) for example in batch)

    def padded(key: str, value: int) -> torch.Tensor:
        return torch.tensor([e[key] + [value] * (width - len(e[key])) for e in batch], dtype=torch.long)

    return {"input_ids": padded("input_ids", pad_token_id), "labels": padded("labels", IGNORE_INDEX),
            "attention_mask": padded("attention_mask", 0)}


def preview(path: Union[str, Path], tokenizer: PreTrainedTokenizerBase, max_length: int,
            n: int = 3) -> list[list[tuple[str, bool]]]:
    """The first n training examples as the model will see them, cut into (text, trained) segments, so the user
    can check before launching that the loss falls on the answers.

    A conversation's segments join to its rendered text (cut where truncation cuts it), which is what decoding its
    input_ids gives; a packed `text` block is one trained segment, its decoded tokens.
    """
    info, examples = read_dataset(path)
    report = DataReport(rows_in=info.rows)
    if info.schema == "text":
        stream: list[int] = []
        for tokens in document_tokens(examples, tokenizer, report):
            stream.extend(tokens)
            if len(stream) >= n * max_length:
                break
        blocks = pack(stream, max_length, report, "preview")[:n]
        return [[(tokenizer.decode(block["input_ids"]), True)] for block in blocks]
    encoded = encode_conversations(examples, chat_renderer(tokenizer, report), max_length, report)
    return [example.segments() for example in islice(encoded, n)]
