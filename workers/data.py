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

Folders, for `mora-studio train --data FOLDER` (an upload is one file): one written by `Dataset.save_to_disk` (read
memory-mapped with `datasets.load_from_disk`; a `DatasetDict` gives its `train` split), or a folder of `.parquet` or
`.jsonl` shards, read in name order as one dataset.

Memory does not grow with the file: every reader streams (a line, a CSV record, a paragraph, a small Parquet batch
at a time) and `inspect_dataset` keeps no row. Limits on rows, decoded size and one row's size (`Limits`, from
MORA_MAX_ROWS, MORA_MAX_DECODED_MB, MORA_MAX_ROW_MB) are checked while reading, and for Parquet from the footer
and the dictionaries before any value is expanded. JSONL, CSV and text are parsed here line by line in plain Python
rather than with `datasets.load_dataset`, whose errors name neither the line nor the field, and whose CSV reader
turns an empty cell into a float NaN. Parquet is read with pyarrow, the reader `datasets` uses underneath, called
directly so that the user's file is not copied into a cache. A `.json` list is one value and is parsed whole, so it
is held to the one-row limit; JSONL is the format for big files. Tokenized training examples go to Arrow through
`datasets` (`workers.data_render.write_examples`).

Every problem with the user's file becomes a `DatasetError` naming the file, the row and the field. Row numbers are
what the user sees in an editor: the line for JSONL, CSV and text, the 1-based position for JSON lists, Parquet and
saved datasets; in a folder of shards, within the shard named.

This module holds the public API (`inspect_dataset`, `build_datasets`, `collate`, `preview`); the work that needs a
tokenizer is in `workers.data_render`. Importing it loads neither torch nor transformers: the web process calls
`inspect_dataset` on upload and never loads a model.
"""
from __future__ import annotations

import csv
import json
import math
import random
import sys
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Mapping, Optional, Union

import pyarrow
import pyarrow.compute
import pyarrow.parquet

from workers import settings

from workers.data_render import (IGNORE_INDEX, Conversation, DataReport, Example, Features, TokenizedExamples,
                                 chat_renderer, document_tokens, encode_conversations, pack, prepare, write_examples)

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
           ".txt": "text"}
CHAT_ROLES = {"system": "system", "user": "user", "assistant": "assistant"}
SHAREGPT_ROLES = {"human": "user", "gpt": "assistant", "system": "system", "user": "user", "assistant": "assistant"}
PREVIEW_ROWS = 5
# What of a first row is kept for the Data tab and the store: enough to recognise it, never a whole long document.
PREVIEW_CHARS, PREVIEW_ITEMS, PREVIEW_DEPTH = 2000, 50, 8
EXPECTED_COLUMNS = ("'messages' (chat), 'conversations' (ShareGPT), 'instruction' + 'output' with an optional "
                    "'input' (alpaca), 'prompt' + 'completion', or 'text' (raw text for continual pretraining)")

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
    """One of `jsonl`, `json`, `csv`, `parquet`, `text`, or `arrow` for a `Dataset.save_to_disk` folder (a folder of
    shards has its shards' format)."""
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


@dataclass(frozen=True)
class Limits:
    """How much a dataset may hold; each limit is a setting the refusal names, so the user knows what to raise."""

    rows: int
    decoded_bytes: int
    row_bytes: int

    @classmethod
    def from_settings(cls) -> "Limits":
        return cls(settings.max_rows(), settings.max_decoded_mb() * 2**20, settings.max_row_mb() * 2**20)


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


class _Budget:
    """Counts rows and decoded bytes while a file streams, and refuses the row that crosses a limit."""

    def __init__(self, name: str, limits: Limits) -> None:
        self.name, self.limits, self.rows, self.decoded = name, limits, 0, 0

    def decoded_bytes(self, size: int, where: str) -> None:
        self.decoded += size
        if self.decoded > self.limits.decoded_bytes:
            raise DatasetError(f"{self.name}, {where}: the data decodes to {_mib(self.decoded)} or more, over "
                               f"the {_mib(self.limits.decoded_bytes)} limit on a dataset's decoded size; "
                               "raise MORA_MAX_DECODED_MB to accept it")

    def row(self, number: int) -> None:
        self.rows += 1
        if self.rows > self.limits.rows:
            raise DatasetError(f"{self.name}, row {number}: more than {self.limits.rows:,} rows, the limit on a "
                               "dataset's rows; raise MORA_MAX_ROWS or split the file")

    def row_too_big(self, where: str, size: str) -> DatasetError:
        return DatasetError(f"{self.name}, {where}: {size} (the limit on one row is {_mib(self.limits.row_bytes)}); "
                            "raise MORA_MAX_ROW_MB or split the row")


_BOM = b"\xef\xbb\xbf"


def _lines(path: Path, budget: _Budget) -> Iterator[tuple[int, str]]:
    """Each line of a UTF-8 text file with its line ending, numbered from 1, read one at a time.

    Split at b"\\n" only, not as `splitlines()` would: that also splits at U+2028 and U+0085, which JSON strings may
    contain unescaped. A line is read at most one byte past the per-row limit, so a file that is one huge line is
    refused without being read whole.
    """
    name, limit = path.name, budget.limits.row_bytes
    if path.stat().st_size == 0:
        raise DatasetError(f"{name}: the file is empty")
    seen_text = False
    with open(path, "rb") as handle:
        for number, raw in enumerate(iter(lambda: handle.readline(limit + 1), b""), start=1):
            if len(raw) > limit and not raw.endswith(b"\n"):
                raise budget.row_too_big(f"line {number}", f"a line of more than {_mib(limit)}")
            budget.decoded_bytes(len(raw), f"line {number}")
            if number == 1:
                raw = raw.removeprefix(_BOM)
            nul = raw.find(b"\x00")
            if nul >= 0:
                raise DatasetError(f"{name}, line {number}: a NUL byte (0x00) at column {nul + 1}; this is a binary "
                                   "file or a damaged one (or UTF-16): save it as UTF-8 text")
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DatasetError(f"{name}, line {number}: not UTF-8 text (byte 0x{raw[error.start]:02x}); "
                                   "save the file as UTF-8") from None
            seen_text = seen_text or bool(text.strip())
            yield number, text
    if not seen_text:
        raise DatasetError(f"{name}: the file contains only whitespace")


def _no_constant(constant: str) -> Any:
    raise _RowError(f"{constant} is not a JSON value (JSON has no NaN or Infinity); write null, a number or a string")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _RowError(f"the number {text[:40]} is too large for a float (it reads as Infinity); write it as a "
                        "string")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > sys.get_int_max_str_digits():
        raise _RowError(f"an integer of {digits:,} digits (more than the {sys.get_int_max_str_digits():,} that can be "
                        "read); write it as a string")
    return int(text)


_DECODER = json.JSONDecoder(parse_constant=_no_constant, parse_float=_finite_float, parse_int=_bounded_int)


def _parse_json(text: str, where: str, on_syntax_error: Callable[[json.JSONDecodeError], DatasetError]) -> Any:
    """One JSON value; every way it can fail becomes a DatasetError saying where."""
    try:
        return _DECODER.decode(text)
    except json.JSONDecodeError as error:
        raise on_syntax_error(error) from None
    except RecursionError:
        raise DatasetError(f"{where}: nested too deeply to read (lists or objects inside each other hundreds of "
                           "levels deep); flatten the row") from None
    except _RowError as error:
        raise DatasetError(f"{where}: {error}") from None


def _jsonl_rows(path: Path, budget: _Budget) -> Iterator[Row]:
    for number, line in _lines(path, budget):
        if not line.strip():
            continue
        where = f"{path.name}, row {number}"
        yield number, _parse_json(line, where, lambda error: DatasetError(
            f"{where}: not valid JSON ({error.msg} at column {error.colno})"))


def _json_rows(path: Path, budget: _Budget) -> Iterator[Row]:
    """A JSON list is one value, so it is parsed whole: its size on disk is bounded by the per-row limit
    (MORA_MAX_ROW_MB) as well as the decoded one; for a bigger file, JSONL reads one row at a time."""
    size = path.stat().st_size
    if size > budget.limits.row_bytes:
        raise budget.row_too_big("the whole file", f"a JSON list of {_mib(size)}, which is read whole; save it as "
                                 "JSONL (one object per line, read a row at a time)")
    text = "".join(line for _, line in _lines(path, budget))

    def syntax_error(error: json.JSONDecodeError) -> DatasetError:
        hint = "; one object per line is JSONL: name the file .jsonl" if error.msg == "Extra data" else ""
        return DatasetError(f"{path.name}: not valid JSON ({error.msg} at line {error.lineno}, "
                            f"column {error.colno}){hint}")

    value = _parse_json(text, path.name, syntax_error)
    del text
    if not isinstance(value, list):
        raise DatasetError(f"{path.name}: the top level must be a list of rows [{{...}}, ...], "
                           f"found {_type_name(value)}")
    yield from enumerate(value, start=1)


def _csv_rows(path: Path, budget: _Budget) -> Iterator[Row]:
    csv.field_size_limit(budget.limits.row_bytes)
    reader = csv.reader((line for _, line in _lines(path, budget)))
    header: Optional[list[str]] = None
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
            yield line, dict(zip(header, record))
    except csv.Error as error:
        if "field larger than field limit" in str(error):
            raise budget.row_too_big(f"row {last_line + 1}", f"a cell of more than {_mib(budget.limits.row_bytes)}"
                                     ) from None
        raise DatasetError(f"{path.name}, row {reader.line_num}: not valid CSV ({error})") from None


def _text_rows(path: Path, budget: _Budget) -> Iterator[Row]:
    paragraph: list[str] = []
    start = size = 0
    for number, line in _lines(path, budget):
        if line.strip():
            if not paragraph:
                start, size = number, 0
            size += len(line)
            if size > budget.limits.row_bytes:
                raise budget.row_too_big(f"line {start}", f"a paragraph of more than {_mib(budget.limits.row_bytes)}")
            paragraph.append(line.rstrip("\n").rstrip("\r"))
        elif paragraph:
            yield start, {"text": "\n".join(paragraph)}
            paragraph = []
    if paragraph:
        yield start, {"text": "\n".join(paragraph)}


def _parquet_error(path: Path, error: Exception) -> DatasetError:
    return DatasetError(f"{path.name}: not a Parquet file, or a damaged one ({error})")


def _decoded_size(array: Union[pyarrow.Array, pyarrow.ChunkedArray]) -> int:
    """The bytes an Arrow array holds once its dictionaries are expanded, computed without expanding them."""
    if isinstance(array, pyarrow.ChunkedArray):
        return sum(_decoded_size(chunk) for chunk in array.chunks)
    kind = array.type
    if pyarrow.types.is_dictionary(kind):
        if pyarrow.types.is_binary(kind.value_type) or pyarrow.types.is_string(kind.value_type) \
                or pyarrow.types.is_large_string(kind.value_type) or pyarrow.types.is_large_binary(kind.value_type):
            lengths = pyarrow.compute.take(pyarrow.compute.binary_length(array.dictionary), array.indices)
            return int(pyarrow.compute.sum(lengths).as_py() or 0) + 4 * len(array)
        return array.dictionary.take(array.indices).nbytes
    if pyarrow.types.is_list(kind) or pyarrow.types.is_large_list(kind) or pyarrow.types.is_map(kind):
        return _decoded_size(array.flatten()) + 4 * len(array)
    if pyarrow.types.is_struct(kind):
        return sum(_decoded_size(child) for child in array.flatten())
    return array.nbytes


def _check_parquet_footer(path: Path, parquet: pyarrow.parquet.ParquetFile, budget: _Budget) -> None:
    """Refuse a file whose rows or decoded size are over the limits from its footer and its dictionaries alone.

    A dictionary-encoded column stores each distinct value once: 490 bytes on disk can expand to gigabytes. Its
    decoded size is computed from the dictionary and the indices, read as they are stored, never expanded. Every
    other column's decoded size is in the footer (its pages' uncompressed size), which also catches a page that a
    compressor would inflate from kilobytes to gigabytes.
    """
    metadata = parquet.metadata
    if metadata.num_rows > budget.limits.rows:
        raise DatasetError(f"{path.name}: {metadata.num_rows:,} rows, more than {budget.limits.rows:,}, the limit on "
                           "a dataset's rows; raise MORA_MAX_ROWS or split the file")
    schema = parquet.schema
    leaves = [schema.column(i) for i in range(metadata.num_columns)]
    chunks = [(metadata.row_group(g).column(i), leaf) for g in range(metadata.num_row_groups)
              for i, leaf in enumerate(leaves)]
    dictionary_paths = sorted({leaf.path for chunk, leaf in chunks
                               if chunk.has_dictionary_page and leaf.physical_type == "BYTE_ARRAY"})
    top_columns = sorted({path.split(".")[0] for path in dictionary_paths})
    plain = 0
    first_row = 1
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        group_plain = sum(row_group.column(i).total_uncompressed_size for i, leaf in enumerate(leaves)
                          if leaf.path.split(".")[0] not in top_columns)
        if row_group.num_rows and group_plain > budget.limits.row_bytes * row_group.num_rows:
            rows = f"row {first_row}" if row_group.num_rows == 1 else \
                f"rows {first_row}-{first_row + row_group.num_rows - 1}"
            found = f"{_mib(group_plain)} decoded" if row_group.num_rows == 1 else \
                f"{_mib(group_plain)} decoded in {row_group.num_rows:,} rows, so at least one row is over the limit"
            raise budget.row_too_big(rows, found)
        plain += group_plain
        first_row += row_group.num_rows
    budget.decoded_bytes(plain, "from its footer")
    if not top_columns:
        return
    dictionary_file = pyarrow.parquet.ParquetFile(path, read_dictionary=dictionary_paths)
    for batch in dictionary_file.iter_batches(batch_size=4096, columns=top_columns):
        budget.decoded_bytes(sum(_decoded_size(column) for column in batch.columns),
                             f"dictionary-encoded column(s) {_quoted(top_columns)}")


PARQUET_BATCH_ROWS = 64


def _parquet_rows(path: Path, budget: _Budget) -> Iterator[Row]:
    """Rows a small batch at a time, after the footer check; a batch over the per-row limit is read a row at a
    time, so one row over the limit is refused before it becomes Python objects."""
    try:
        parquet = pyarrow.parquet.ParquetFile(path)
        _check_parquet_footer(path, parquet, budget)
        number = 0
        for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS):
            rows = [batch] if batch.nbytes <= budget.limits.row_bytes else \
                [batch.slice(i, 1) for i in range(batch.num_rows)]
            for part in rows:
                if part.num_rows == 1 and part.nbytes > budget.limits.row_bytes:
                    raise budget.row_too_big(f"row {number + 1}", f"{_mib(part.nbytes)} decoded")
                for row in part.to_pylist():
                    number += 1
                    yield number, row
    except (pyarrow.ArrowException, OSError) as error:
        raise _parquet_error(path, error) from None


_READERS: dict[str, Callable[[Path, _Budget], Iterator[Row]]] = {
    "jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows, "text": _text_rows,
}


SHARD_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in SHARD_FORMATS)


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def _file_format(path: Path) -> str:
    if not path.exists():
        raise DatasetError(f"{path.name}: no such file ({path})")
    if path.is_dir():
        if _is_saved_dataset(path):
            return "arrow"
        formats = {SHARD_FORMATS[shard.suffix.lower()] for shard in _shards(path)}
        if not formats:
            raise DatasetError(f"{path.name}: not a file, and not a dataset folder: it has neither the files of "
                               f"Dataset.save_to_disk nor .parquet or .jsonl shards ({path})")
        if len(formats) > 1:
            raise DatasetError(f"{path.name}: the folder mixes {' and '.join(sorted(formats))} shards; keep one "
                               "format per folder")
        return formats.pop()
    if not path.is_file():
        raise DatasetError(f"{path.name}: not a file ({path})")
    file_format = FORMATS.get(path.suffix.lower())
    if file_format is None:
        raise DatasetError(f"{path.name}: unsupported file type '{path.suffix}'; expected one of "
                           f"{', '.join(FORMATS)}")
    return file_format


ARROW_BATCH_ROWS = 64


def _saved_dataset_rows(folder: Path, budget: _Budget) -> Iterator[Row]:
    """Rows of a `save_to_disk` folder, memory-mapped by `datasets`, a small batch at a time; its row count and
    decoded size (the Arrow tables' size) are checked before any row is read."""
    import datasets

    try:
        dataset = datasets.load_from_disk(str(folder))
    except (OSError, ValueError, pyarrow.ArrowException) as error:
        raise DatasetError(f"{folder.name}: not a readable Dataset.save_to_disk folder ({error})") from None
    if isinstance(dataset, datasets.DatasetDict):
        if "train" not in dataset:
            raise DatasetError(f"{folder.name}: a DatasetDict without a 'train' split (it has "
                               f"{_quoted(dataset)}); save the split to train on with Dataset.save_to_disk")
        dataset = dataset["train"]
    if dataset.num_rows > budget.limits.rows:
        raise DatasetError(f"{folder.name}: {dataset.num_rows:,} rows, more than {budget.limits.rows:,}, the limit on "
                           "a dataset's rows; raise MORA_MAX_ROWS or select fewer rows")
    budget.decoded_bytes(dataset.data.nbytes, "its Arrow tables")
    number = 0
    for batch in dataset.iter(batch_size=ARROW_BATCH_ROWS):
        for values in zip(*batch.values()):
            number += 1
            yield number, dict(zip(batch, values))


def _rows(path: Path, file_format: str, budget: _Budget) -> Iterator[tuple[str, int, Any]]:
    """The raw rows of a file, a saved dataset or a folder of shards; a shard's problems are named by the folder
    and the shard (`folder/part-0001.jsonl, row 3: ...`), so each row comes with the name its messages use."""
    if file_format == "arrow":
        yield from ((path.name, number, row) for number, row in _saved_dataset_rows(path, budget))
    elif path.is_dir():
        for shard in _shards(path):
            name = f"{path.name}/{shard.name}"
            try:
                yield from ((name, number, row) for number, row in _READERS[file_format](shard, budget))
            except DatasetError as error:
                raise DatasetError(f"{path.name}/{error}") from None
    else:
        yield from ((path.name, number, row) for number, row in _READERS[file_format](path, budget))


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


class _DatasetStream:
    """One pass over a dataset file: validated examples one at a time, and what was seen so far for `DatasetInfo`.

    Nothing holds more than one row (or one small Parquet batch) of the file, so validating a file of any size
    takes the memory of its largest row. Every failure is a `DatasetError`: even a row nested too deeply for the
    parser, or an integer too long to convert, is a property of the file the user can fix.
    """

    def __init__(self, path: Union[str, Path], limits: Optional[Limits] = None) -> None:
        self.path = Path(path)
        self.file_format = _file_format(self.path)
        self.budget = _Budget(self.path.name, limits or Limits.from_settings())
        self.columns: dict[str, None] = {}
        self.preview_rows: list[dict[str, Any]] = []
        self.schema: Optional[_Schema] = None
        self.rows = 0

    def examples(self) -> Iterator[Example]:
        first_row = 0
        try:
            for name, number, row in _rows(self.path, self.file_format, self.budget):
                self.budget.row(number)
                if not isinstance(row, dict):
                    raise DatasetError(f"{name}, row {number}: each row must be an object with named fields, "
                                       f"found {_type_name(row)}")
                self.columns.update(dict.fromkeys(row))
                row_schema = _detect(row)
                if self.schema is None:
                    if row_schema is None:
                        raise _unknown_schema(name, row)
                    self.schema, first_row = row_schema, number
                elif row_schema is None:
                    missing = [c for c in self.schema.required if c not in row]
                    raise DatasetError(f"{name}, row {number}: no {_quoted(missing)} (found {_quoted(row)}); every "
                                       f"row of this {self.schema.name} file needs {_quoted(self.schema.required)}")
                elif row_schema is not self.schema:
                    raise DatasetError(f"{name}, row {number}: the row is {row_schema.name} "
                                       f"({_quoted(row_schema.required)}) but row {first_row} is {self.schema.name} "
                                       f"({_quoted(self.schema.required)}); use one format per file")
                try:
                    example = Example(number, self.schema.convert(row))
                except _RowError as error:
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
    stream = _DatasetStream(path)
    for _ in stream.examples():
        pass
    return stream.info()


@dataclass
class PreparedData:
    """Train and eval examples, each {input_ids, labels, attention_mask}, memory-mapped, ready for `collate`."""

    train: TokenizedExamples
    eval: TokenizedExamples
    report: DataReport
    info: DatasetInfo


def _held_out(rows: int, fraction: float, seed: int, name: str) -> set[int]:
    """Positions of the rows held out at random, the same rows for the same seed."""
    count = max(1, round(rows * fraction))
    if count >= rows:
        raise DatasetError(f"{name}: eval_fraction={fraction} of {rows} rows leaves no row to train on")
    return set(random.Random(seed).sample(range(rows), count))


def _examples(path: Union[str, Path], keep: Callable[[int], bool] = lambda position: True) -> Iterator[Example]:
    """The file's examples again, streaming, those whose 0-based position `keep` accepts."""
    return (example for position, example in enumerate(_DatasetStream(path).examples()) if keep(position))


def _nothing_left(name: str, split: str, report: DataReport, max_length: int) -> DatasetError:
    reasons = [f"row {row}: {reason}" for row, reason in report.dropped[:3]]
    if len(report.dropped) > 3:
        reasons.append(f"{len(report.dropped) - 3} more rows dropped")
    return DatasetError(f"{name}: no {split} example left with max_length={max_length}: "
                        + "; ".join(reasons + report.notes))


def build_datasets(path: Union[str, Path], tokenizer: PreTrainedTokenizerBase, max_length: int,
                   eval_path: Union[str, Path, None] = None, eval_fraction: float = 0.0,
                   seed: int = 0, pack_text: bool = True, cache_dir: Optional[Path] = None) -> PreparedData:
    """Validate, render, tokenize and split a dataset file for training.

    Eval comes from `eval_path`, or from `eval_fraction` of the rows chosen with `seed`. Rows are split before
    rendering and packing, so no eval row reaches a training example. A dropped row of the eval file is reported
    with the eval file's name before its reason, since its row number is that file's. With `pack_text=False` each raw
    text document is an example of its own instead of being packed into blocks with others.

    The file is read in streaming passes (validate and count, then train rows, then eval rows), and tokenized
    examples go to Arrow files under `cache_dir` (default: the data folder's `cache`) as they are made, so memory
    does not grow with the file.
    """
    if max_length < 1:
        raise ValueError(f"max_length must be positive, got {max_length}")
    info = inspect_dataset(path)
    name = info.path.name
    if not 0.0 <= eval_fraction < 1.0:
        raise DatasetError(f"{name}: eval_fraction must be in [0, 1), got {eval_fraction}")
    report = DataReport(rows_in=info.rows)
    eval_name = None
    train_examples: Iterable[Example] = _examples(path)
    eval_examples: Iterable[Example] = []
    if eval_path is not None:
        if eval_fraction:
            raise DatasetError(f"{name}: give an eval file or an eval fraction, not both")
        eval_info = inspect_dataset(eval_path)
        eval_name = eval_info.path.name
        if (eval_info.schema == "text") != (info.schema == "text"):
            raise DatasetError(f"{eval_name}: the eval file is {eval_info.schema} but the training file {name} is "
                               f"{info.schema}; both must be conversations, or both raw text")
        report.rows_in += eval_info.rows
        eval_examples = _examples(eval_path)
    elif eval_fraction:
        held_out = _held_out(info.rows, eval_fraction, seed, name)
        train_examples = _examples(path, lambda position: position not in held_out)
        eval_examples = _examples(path, held_out.__contains__)
        report.notes.append(f"eval: {len(held_out)} of {info.rows} rows, chosen with seed {seed}")
    renderer = None if info.schema == "text" else chat_renderer(tokenizer, report)
    cache = cache_dir or settings.data_dir() / "cache"
    train = write_examples(prepare(train_examples, tokenizer, renderer, max_length, report, "train", pack_text),
                           cache, report)
    if not train:
        raise _nothing_left(name, "training", report, max_length)
    train_drops = len(report.dropped)
    evaluation = write_examples(prepare(eval_examples, tokenizer, renderer, max_length, report, "eval", pack_text),
                                cache, report)
    if eval_name:
        report.dropped[train_drops:] = [(row, f"{eval_name}: {reason}") for row, reason in report.dropped[train_drops:]]
    if (eval_path is not None or eval_fraction) and not evaluation:
        raise _nothing_left(eval_name or name, "eval", report, max_length)
    report.examples_out = len(train) + len(evaluation)
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
    can check before launching that the loss falls on the answers. Only the rows it shows are read and checked (a
    batch of n at a time), not the whole file: the file was validated when it was uploaded.

    A conversation's segments join to its rendered text (cut where truncation cuts it), which is what decoding its
    input_ids gives; a packed `text` block is one trained segment, its decoded tokens.
    """
    source = _DatasetStream(path)
    examples = source.examples()
    first = next(examples)
    examples = chain([first], examples)
    report = DataReport(rows_in=0)
    if source.schema is not None and source.schema.name == "text":
        stream: list[int] = []
        for _, tokens in document_tokens(examples, tokenizer, report, batch_size=n):
            stream.extend(tokens)
            if len(stream) >= n * max_length:
                break
        blocks = list(islice(pack([stream], max_length, report, "preview"), n))
        return [[(tokenizer.decode(block["input_ids"]), True)] for block in blocks]
    encoded = encode_conversations(examples, chat_renderer(tokenizer, report), max_length, report, batch_size=n)
    return [example.segments() for example in islice(encoded, n)]
