"""What a dataset's rows must hold, checked row by row: the schema each row is recognised as, and its conversion to
the conversation (or document) a model trains on.

Schemas, by columns, in this order when a row has the columns of several:

| schema              | columns                                                               | trains on       |
|---------------------|-----------------------------------------------------------------------|-----------------|
| `chat`              | `messages`: [{role, content}], role system, user or assistant         | assistant turns |
| `sharegpt`          | `conversations`: [{from, value}], from human, gpt, system (or user,   | gpt turns       |
|                     | assistant)                                                            |                 |
| `alpaca`            | `instruction`, `output`, optional `input`; the user turn is the       | output          |
|                     | instruction, a blank line, and the input                              |                 |
| `prompt_completion` | `prompt`, `completion`                                                | completion      |
| `text`              | `text` (continual pretraining)                                        | every token     |

Other columns are ignored; every row of a file has the same schema. Every problem becomes a `DatasetError` naming the
file, the row and the field. `inspect_dataset` validates a file and describes it for the Data tab, keeping no row
(the rows come from `workers.data_readers`, streaming). Importing this module loads neither torch nor transformers:
the web process calls `inspect_dataset` on upload and never loads a model.
"""
from __future__ import annotations

from dataclasses import dataclass
from itertools import islice
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional, Union

from workers.data_readers import (Budget, DatasetError, Limits, RowError, file_format, quoted, read_rows,
                                  type_name)
from workers.data_render import Conversation, Example

CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
PREVIEW_ROWS = 5
# What of a first row is kept for the Data tab and the store: enough to recognise it, never a whole long document.
PREVIEW_CHARS, PREVIEW_ITEMS, PREVIEW_DEPTH = 2000, 50, 8
EXPECTED_COLUMNS = ("'messages' (chat), 'conversations' (ShareGPT), 'instruction' + 'output' with an optional "
                    "'input' (alpaca), 'prompt' + 'completion', or 'text' (raw text for continual pretraining)")


@dataclass
class DatasetInfo:
    """What the Data tab shows and `storage` records about an uploaded file."""

    path: Path
    file_format: str
    """One of `jsonl`, `json`, `csv`, `parquet`, `text`, or `arrow` for a `Dataset.save_to_disk` folder (a folder of
    shards has its shards' format)."""
    schema: str
    """One of `chat`, `sharegpt`, `alpaca`, `prompt_completion`, `text`."""
    rows: int
    columns: list[str]
    """Every column seen, in order of first appearance, including those the schema ignores."""
    preview_rows: list[dict[str, Any]]
    """The first rows as read, before any conversion."""



def _string(row: Mapping[str, Any], field: str, required: bool = True) -> str:
    value = row[field]
    if not isinstance(value, str):
        raise RowError(f"'{field}' must be a string, found {type_name(value)}")
    if required and not value.strip():
        raise RowError(f"'{field}' is empty")
    return value


def _conversation(row: Mapping[str, Any], field: str, role_key: str, content_key: str,
                  roles: Mapping[str, str]) -> Conversation:
    """Turns of a chat-like field as {role, content} messages with the roles chat templates know."""
    turns = row[field]
    shape = f"{{{role_key}, {content_key}}}"
    if not isinstance(turns, list):
        raise RowError(f"'{field}' must be a list of {shape}, found {type_name(turns)}")
    if not turns:
        raise RowError(f"'{field}' is an empty list")
    messages = []
    for number, turn in enumerate(turns, start=1):
        where = f"message {number} in '{field}'"
        if not isinstance(turn, dict):
            raise RowError(f"{where} must be an object {shape}, found {type_name(turn)}")
        for key in (role_key, content_key):
            if turn.get(key) is None:
                raise RowError(f"{where} has no '{key}'")
        role = roles.get(turn[role_key]) if isinstance(turn[role_key], str) else None
        if role is None:
            raise RowError(f"{where} has {role_key} {turn[role_key]!r}; expected one of {', '.join(roles)}")
        content = turn[content_key]
        if not isinstance(content, str):
            raise RowError(f"{where}: '{content_key}' must be a string, found {type_name(content)}")
        if role == "assistant" and not content.strip():
            raise RowError(f"{where} is an assistant turn with an empty '{content_key}'")
        messages.append({"role": role, "content": content})
    if not any(m["role"] == "assistant" for m in messages):
        assistant_names = [name for name, role in roles.items() if role == "assistant"]
        raise RowError(f"'{field}' has no assistant message ({role_key} {' or '.join(assistant_names)}), "
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



def _unknown_schema(name: str, columns: Iterable[str]) -> DatasetError:
    found = list(columns)
    partial = [f"it has {quoted(c for c in s.required if c in found)} but not "
               f"{quoted(c for c in s.required if c not in found)}"
               for s in _SCHEMAS if any(c in found for c in s.required)]
    hint = f" ({'; '.join(partial)})" if partial else ""
    return DatasetError(f"{name}: no recognised format: found columns {quoted(found)}{hint}; "
                        f"expected {EXPECTED_COLUMNS}")



def _preview_value(value: Any, depth: int = 0) -> Any:
    """A copy small enough to store and show: long strings cut, deep nesting elided."""
    if isinstance(value, str):
        return value if len(value) <= PREVIEW_CHARS else value[:PREVIEW_CHARS] + "…"
    if depth >= PREVIEW_DEPTH and isinstance(value, (list, dict)):
        return "…"
    if isinstance(value, list):
        return [_preview_value(item, depth + 1) for item in value[:PREVIEW_ITEMS]]
    if isinstance(value, dict):
        return {key: _preview_value(item, depth + 1) for key, item in islice(value.items(), PREVIEW_ITEMS)}
    return value


class DatasetStream:
    """One pass over a dataset file: validated examples one at a time, and what was seen so far for `DatasetInfo`.

    Nothing holds more than one row (or one small Parquet batch) of the file, so validating a file of any size
    takes the memory of its largest row. Every failure is a `DatasetError`: even a row nested too deeply for the
    parser, or an integer too long to convert, is a property of the file the user can fix.
    """

    def __init__(self, path: Union[str, Path], limits: Optional[Limits] = None) -> None:
        self.path = Path(path)
        self.file_format = file_format(self.path)
        self.budget = Budget(self.path.name, limits or Limits.from_settings())
        self.columns: dict[str, None] = {}
        self.preview_rows: list[dict[str, Any]] = []
        self.schema: Optional[_Schema] = None
        self.rows = 0

    def examples(self) -> Iterator[Example]:
        first_row = 0
        try:
            for name, number, row in read_rows(self.path, self.file_format, self.budget):
                self.budget.row(number)
                if not isinstance(row, dict):
                    raise DatasetError(f"{name}, row {number}: each row must be an object with named fields, "
                                       f"found {type_name(row)}")
                self.columns.update(dict.fromkeys(row))
                row_schema = _detect(row)
                if self.schema is None:
                    if row_schema is None:
                        raise _unknown_schema(name, row)
                    self.schema, first_row = row_schema, number
                elif row_schema is None:
                    missing = [c for c in self.schema.required if c not in row]
                    raise DatasetError(f"{name}, row {number}: no {quoted(missing)} (found {quoted(row)}); every "
                                       f"row of this {self.schema.name} file needs {quoted(self.schema.required)}")
                elif row_schema is not self.schema:
                    raise DatasetError(f"{name}, row {number}: the row is {row_schema.name} "
                                       f"({quoted(row_schema.required)}) but row {first_row} is {self.schema.name} "
                                       f"({quoted(self.schema.required)}); use one format per file")
                try:
                    example = Example(number, self.schema.convert(row))
                except RowError as error:
                    raise DatasetError(f"{name}, row {number}: {error}") from None
                if len(self.preview_rows) < PREVIEW_ROWS:
                    self.preview_rows.append(_preview_value(row))
                self.rows += 1
                yield example
        except OSError as error:
            raise DatasetError(f"{self.path.name}: cannot read the file ({error.strerror or error})") from None
        if not self.rows:
            raise DatasetError(f"{self.path.name}: the file has no rows")

    def info(self) -> DatasetInfo:
        assert self.schema is not None, "info() after examples() was read to the end"
        return DatasetInfo(path=self.path, file_format=self.file_format, schema=self.schema.name, rows=self.rows,
                           columns=list(self.columns), preview_rows=self.preview_rows)


def inspect_dataset(path: Union[str, Path]) -> DatasetInfo:
    """Validate a dataset file and describe it (format, schema, row count, columns, first rows) for the Data tab,
    streaming: it keeps no example, so the web process's memory does not grow with the file."""
    stream = DatasetStream(path)
    for _ in stream.examples():
        pass
    return stream.info()

