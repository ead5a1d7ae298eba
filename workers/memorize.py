"""The paper's memorisation probe (MORA_SPEC.md §6): random UUID pairs to learn by heart, and how well they are
recalled.

Training data is one `"key:value"` string per pair in the raw-`text` schema, so the loss falls on the whole string as
in the paper. Runs on it set `pack_text=False`: each pair is then one example, padded in its batch, rather than
pairs packed into blocks where one could be cut at a block boundary and its value learnt without its key.

Recall is measured by greedy generation of each value from the prompt `"key:"`: the character accuracy (matching
positions over the value's length, averaged over pairs) and the exact-match rate. The training callback that runs it
at chosen steps lives in `workers.training` (`MemorizeCallback`).

Generating and scoring pairs needs no torch, so the web process can write a pairs file; `evaluate_pairs` imports
torch when it runs.
"""
from __future__ import annotations

import json
import random
import uuid
from pathlib import Path
from statistics import fmean
from typing import TYPE_CHECKING, Sequence, Union

if TYPE_CHECKING:
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

SEPARATOR = ":"
VALUE_MARGIN_TOKENS = 4
"""Tokens generated beyond the longest value, so a value tokenized differently after the key is not cut short."""

Pair = tuple[str, str]

FORMAT_ONLY_CHAR_ACCURACY = (4 + 1 + 1 / 4 + 30 / 16) / 36
"""The character accuracy of a model that has learnt the UUID4 format and none of the values (≈ 0.198): the 4 hyphens
and the version digit are always right, the variant digit (one of 8, 9, a, b) a quarter of the time and each of the
other 30 hex digits a sixteenth. What a method scores above it is what it memorised."""


def random_uuid(rng: random.Random) -> str:
    """A UUID4-format string drawn from `rng` (uuid4() reads the OS's entropy and could not be reproduced)."""
    return str(uuid.UUID(int=rng.getrandbits(128), version=4))


def make_uuid_pairs(n: int, seed: int) -> list[Pair]:
    """n (key, value) pairs of random UUIDs, the same for the same seed; no key or value appears twice."""
    if n < 1:
        raise ValueError(f"n: need at least one pair, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    drawn: list[str] = []
    while len(drawn) < 2 * n:
        candidate = random_uuid(rng)
        if candidate not in seen:
            seen.add(candidate)
            drawn.append(candidate)
    return list(zip(drawn[0::2], drawn[1::2]))


def pair_text(key: str, value: str) -> str:
    return f"{key}{SEPARATOR}{value}"


def write_pairs_dataset(pairs: Sequence[Pair], path: Union[str, Path]) -> Path:
    """A `text`-schema JSONL file, one `{"text": "key:value"}` row per pair; train on it with `pack_text=False`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for key, _ in pairs:
        if SEPARATOR in key:
            raise ValueError(f"key {key!r} contains the separator {SEPARATOR!r}")
    path.write_text("".join(json.dumps({"text": pair_text(k, v)}) + "\n" for k, v in pairs), encoding="utf-8")
    return path


def read_pairs(path: Union[str, Path]) -> list[Pair]:
    """The pairs of a file written by `write_pairs_dataset`: each row's text split at its first separator."""
    path = Path(path)
    pairs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        text = json.loads(line).get("text", "")
        key, separator, value = text.partition(SEPARATOR)
        if not separator or not value:
            raise ValueError(f"{path.name}, row {number}: expected 'key{SEPARATOR}value', found {text!r}")
        pairs.append((key, value))
    if not pairs:
        raise ValueError(f"{path.name}: no pairs in the file")
    return pairs


def char_accuracy(predicted: str, target: str) -> float:
    """Matching characters position by position over the target's length: a longer prediction is cut, a shorter one
    counts its missing positions as wrong."""
    if not target:
        raise ValueError("target: an empty value has no characters to score")
    return sum(p == t for p, t in zip(predicted, target)) / len(target)


def exact_match(predicted: str, target: str) -> bool:
    """The prediction is the target, give or take surrounding whitespace."""
    return predicted.strip() == target


def score(predictions: Sequence[str], targets: Sequence[str]) -> dict[str, float]:
    if len(predictions) != len(targets) or not targets:
        raise ValueError(f"need one prediction per target, got {len(predictions)} for {len(targets)}")
    return {"char_accuracy": fmean(char_accuracy(p, t) for p, t in zip(predictions, targets)),
            "exact_match": fmean(float(exact_match(p, t)) for p, t in zip(predictions, targets))}


def generate_values(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, keys: Sequence[str],
                    max_new_tokens: int, batch_size: int = 32) -> list[str]:
    """Greedy continuations of `"key:"` for each key, in left-padded batches, decoded up to the end-of-sequence
    token. The model is left in the mode (train or eval) it came in."""
    import torch
    from transformers import GenerationConfig

    generation = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False,
                                  pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    device = next(model.parameters()).device
    was_training, padding_side = model.training, tokenizer.padding_side
    model.eval()
    tokenizer.padding_side = "left"  # generation continues from the last position: the prompts must end there
    values: list[str] = []
    try:
        with torch.no_grad():
            for start in range(0, len(keys), batch_size):
                prompts = [key + SEPARATOR for key in keys[start:start + batch_size]]
                # no special tokens: training examples start straight with the key, without a bos token
                batch = tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False).to(device)
                output = model.generate(**batch, generation_config=generation)
                values += tokenizer.batch_decode(output[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = padding_side
        model.train(was_training)
    return values


def evaluate_pairs(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, pairs: Sequence[Pair],
                   batch_size: int = 32) -> dict[str, float]:
    """Character accuracy and exact-match rate (both in [0, 1]) of every pair's value generated greedily from its
    key; up to the longest value's length in tokens plus a small margin is generated."""
    if not pairs:
        raise ValueError("pairs: nothing to evaluate")
    longest = max(len(ids) for ids in tokenizer([v for _, v in pairs], add_special_tokens=False)["input_ids"])
    predictions = generate_values(model, tokenizer, [k for k, _ in pairs], longest + VALUE_MARGIN_TOKENS, batch_size)
    return score(predictions, [v for _, v in pairs])
