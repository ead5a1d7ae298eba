"""Reading a user's dataset file a row at a time, within limits, with every problem named by file and row.

Formats, by extension: `.jsonl`/`.ndjson` (one object per line), `.json` (a list of objects), `.csv` (a header row),
`.parquet`, `.txt`. A `.txt` file holds one document per paragraph: paragraphs are separated by blank lines
(lines with only whitespace count as blank), so a file without blank lines is one document. Paragraphs rather than
lines, because prose wraps its lines and a line is rarely a whole thought; rather than the whole file, because a
file of many short documents would otherwise become one.

Folders, for `mora-studio train --data FOLDER` (an upload is one file): one written by `Dataset.save_to_disk` (read
memory-mapped with `datasets.load_from_disk`; a `DatasetDict` gives its `train` split), or a folder of `.parquet` or
`.jsonl` shards, read in name order as one dataset.

Memory does not grow with the file: every reader streams (a line, a CSV record, a paragraph, a small Parquet batch
at a time). Limits on rows, decoded size and one row's size (`Limits`, from MORA_MAX_ROWS, MORA_MAX_DECODED_MB,
MORA_MAX_ROW_MB) are checked while reading, and for Parquet from the footer and the dictionaries before any value is
expanded. JSONL, CSV and text are parsed here line by line in plain Python rather than with `datasets.load_dataset`,
whose errors name neither the line nor the field, and whose CSV reader turns an empty cell into a float NaN. Parquet
is read with pyarrow, the reader `datasets` uses underneath, called directly so that the user's file is not copied
into a cache. A `.json` list is one value and is parsed whole, so it is held to the one-row limit; JSONL is the
format for big files.

Row numbers are what the user sees in an editor: the line for JSONL, CSV and text, the 1-based position for JSON
lists, Parquet and saved datasets; in a folder of shards, within the shard named. What a row must hold is
`workers.data_schemas`'s business; this module yields raw rows.
"""
from __future__ import annotations

import csv
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Optional, Union

import pyarrow
import pyarrow.compute
import pyarrow.parquet

from workers import settings
from workers.formatting import format_bytes

FORMATS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".parquet": "parquet",
           ".txt": "text"}

Row = tuple[int, Any]


class DatasetError(ValueError):
    """A dataset the user must fix, saying where (file, row, field) and what was expected."""


class RowError(Exception):
    """A problem inside one row; the caller adds the file name and row number."""



def type_name(value: Any) -> str:
    """The JSON name of a value's type, which is what a user editing the file knows."""
    names = {type(None): "null", dict: "object", list: "list", str: "str", bool: "bool", int: "int", float: "float"}
    return names.get(type(value), type(value).__name__)



def quoted(names: Iterable[str]) -> str:
    return ", ".join(f"'{name}'" for name in names) or "none"



def _mib(size: int) -> str:
    """A size in the unit of the MORA_MAX_*_MB settings it is compared with."""
    return format_bytes(size, "MiB")


@dataclass(frozen=True)
class Limits:
    """How much a dataset may hold; each limit is a setting the refusal names, so the user knows what to raise."""

    rows: int
    decoded_bytes: int
    row_bytes: int

    @classmethod
    def from_settings(cls) -> "Limits":
        return cls(settings.max_rows(), settings.max_decoded_mb() * 2**20, settings.max_row_mb() * 2**20)


class Budget:
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


def _lines(path: Path, budget: Budget) -> Iterator[tuple[int, str]]:
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
    raise RowError(f"{constant} is not a JSON value (JSON has no NaN or Infinity); write null, a number or a string")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise RowError(f"the number {text[:40]} is too large for a float (it reads as Infinity); write it as a "
                        "string")
    return value


def _bounded_int(text: str) -> int:
    digits = len(text.lstrip("-"))
    if digits > sys.get_int_max_str_digits():
        raise RowError(f"an integer of {digits:,} digits (more than the {sys.get_int_max_str_digits():,} that can be "
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
    except RowError as error:
        raise DatasetError(f"{where}: {error}") from None


def _jsonl_rows(path: Path, budget: Budget) -> Iterator[Row]:
    for number, line in _lines(path, budget):
        if not line.strip():
            continue
        where = f"{path.name}, row {number}"
        yield number, _parse_json(line, where, lambda error: DatasetError(
            f"{where}: not valid JSON ({error.msg} at column {error.colno})"))


def _json_rows(path: Path, budget: Budget) -> Iterator[Row]:
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
                           f"found {type_name(value)}")
    yield from enumerate(value, start=1)


def _csv_rows(path: Path, budget: Budget) -> Iterator[Row]:
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
                    raise DatasetError(f"{path.name}, row {line}: the header repeats {quoted(repeated)}")
                continue
            if len(record) != len(header):
                raise DatasetError(f"{path.name}, row {line}: {len(record)} fields, but the header has "
                                   f"{len(header)} ({quoted(header)})")
            yield line, dict(zip(header, record))
    except csv.Error as error:
        if "field larger than field limit" in str(error):
            raise budget.row_too_big(f"row {last_line + 1}", f"a cell of more than {_mib(budget.limits.row_bytes)}"
                                     ) from None
        raise DatasetError(f"{path.name}, row {reader.line_num}: not valid CSV ({error})") from None


def _text_rows(path: Path, budget: Budget) -> Iterator[Row]:
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


def _check_parquet_footer(path: Path, parquet: pyarrow.parquet.ParquetFile, budget: Budget) -> None:
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
                             f"dictionary-encoded column(s) {quoted(top_columns)}")


PARQUET_BATCH_ROWS = 64


def _parquet_rows(path: Path, budget: Budget) -> Iterator[Row]:
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


_READERS: dict[str, Callable[[Path, Budget], Iterator[Row]]] = {
    "jsonl": _jsonl_rows, "json": _json_rows, "csv": _csv_rows, "parquet": _parquet_rows, "text": _text_rows,
}


SHARD_FORMATS = {".parquet": "parquet", ".jsonl": "jsonl", ".ndjson": "jsonl"}


def _shards(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")
                  and p.suffix.lower() in SHARD_FORMATS)


def _is_saved_dataset(folder: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` (state.json) or `DatasetDict.save_to_disk` (dataset_dict.json)."""
    return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()


def file_format(path: Path) -> str:
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


def _saved_dataset_rows(folder: Path, budget: Budget) -> Iterator[Row]:
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
                               f"{quoted(dataset)}); save the split to train on with Dataset.save_to_disk")
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


def read_rows(path: Path, file_format: str, budget: Budget) -> Iterator[tuple[str, int, Any]]:
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

