"""A dataset file made ready for training: validated, rendered, tokenized, split into train and eval, and batched;
and the preview of the first examples as the model will see them.

Four modules, one job each: `workers.data_readers` reads a file's raw rows (formats, folders, limits; every problem
a `DatasetError` naming the file and row), `workers.data_schemas` checks what each row holds and describes the file
(`inspect_dataset`), `workers.data_render` renders and tokenizes (the work that needs a tokenizer), and this module
joins them for a training run (`build_datasets`, `collate`) and for the Data tab's preview (`preview`). Tokenized training examples go
to Arrow through `datasets` (`workers.data_render.write_examples`). Importing it loads neither torch nor
transformers.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from itertools import chain, islice
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Iterator, Optional, Union

from workers import settings
from workers.data_render import (IGNORE_INDEX, DataReport, Example, Features, TokenizedExamples, chat_renderer,
                                 document_tokens, encode_conversations, pack, prepare, write_examples)
from workers.data_readers import DatasetError
from workers.data_schemas import DatasetInfo, DatasetStream, inspect_dataset

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedTokenizerBase


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
    return (example for position, example in enumerate(DatasetStream(path).examples()) if keep(position))


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
    source = DatasetStream(path)
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
