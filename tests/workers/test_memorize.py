"""The memorisation probe: UUID pairs, their dataset, the recall metrics on hand-checked examples, the evaluator on
the tiny Llama, and the training callback that measures recall at chosen steps (events and stored metric points)."""
import json
import random
import re
import statistics

import pytest

from app.cli import build_parser
from storage.repo import Store
from workers.collector import Collector
from workers.data import build_datasets
from workers.data_schemas import inspect_dataset
from workers.events import read_events
from workers.memorize import (FORMAT_ONLY_CHAR_ACCURACY, char_accuracy, evaluate_pairs, exact_match, generate_values,
                              make_uuid_pairs, random_uuid, read_pairs, score, write_pairs_dataset)
from workers.model_loading import load_model
from workers.train_config import ConfigError, TrainConfig
from workers.training import run_training

UUID4 = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def test_pairs_are_uuid4_strings_unique_and_the_same_for_a_seed():
    pairs = make_uuid_pairs(200, seed=7)
    assert len(pairs) == 200
    strings = [s for pair in pairs for s in pair]
    assert all(UUID4.match(s) for s in strings), strings[:4]
    assert len(set(strings)) == 400
    assert make_uuid_pairs(200, seed=7) == pairs
    assert make_uuid_pairs(200, seed=8) != pairs
    assert make_uuid_pairs(3, seed=7) == pairs[:3]  # a smaller set from the same seed is a prefix
    with pytest.raises(ValueError, match="at least one pair"):
        make_uuid_pairs(0, seed=0)


def test_the_dataset_is_raw_text_with_one_key_value_string_a_row(tmp_path):
    pairs = make_uuid_pairs(5, seed=0)
    path = write_pairs_dataset(pairs, tmp_path / "pairs.jsonl")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [{"text": f"{key}:{value}"} for key, value in pairs]
    info = inspect_dataset(path)
    assert (info.schema, info.rows) == ("text", 5)
    assert read_pairs(path) == pairs


def test_format_only_accuracy_is_what_an_unrelated_uuid_scores():
    rng = random.Random(7)
    scores = [char_accuracy(random_uuid(rng), random_uuid(rng)) for _ in range(20_000)]
    assert statistics.fmean(scores) == pytest.approx(FORMAT_ONLY_CHAR_ACCURACY, abs=0.003)
    assert FORMAT_ONLY_CHAR_ACCURACY == pytest.approx(0.198, abs=0.001)


def test_character_accuracy_and_exact_match_on_hand_checked_examples():
    assert char_accuracy("abxd", "abcd") == 0.75
    assert char_accuracy("abcd", "abcd") == 1.0
    assert char_accuracy("ab", "abcd") == 0.5  # missing positions count as wrong
    assert char_accuracy("abcdef", "abcd") == 1.0  # what follows the target's length is cut
    assert char_accuracy("", "abcd") == 0.0
    assert char_accuracy("babcd", "abcd") == 0.0  # position by position: a shift loses every character
    with pytest.raises(ValueError):
        char_accuracy("a", "")
    assert exact_match("abcd", "abcd") and exact_match(" abcd\n", "abcd")
    assert not exact_match("abcde", "abcd") and not exact_match("abc", "abcd") and not exact_match("abxd", "abcd")
    assert score(["abxd", "abcd"], ["abcd", "abcd"]) == {"char_accuracy": 0.875, "exact_match": 0.5}


def test_unpacked_text_keeps_one_pair_per_example(tiny_model_dir, tmp_path):
    _, tokenizer = load_model(str(tiny_model_dir))
    pairs = make_uuid_pairs(6, seed=1)
    path = write_pairs_dataset(pairs, tmp_path / "pairs.jsonl")
    data = build_datasets(path, tokenizer, max_length=96, pack_text=False)
    assert len(data.train) == 6 and not data.report.truncated
    for example, (key, value) in zip(data.train, pairs):
        assert example["input_ids"][-1] == tokenizer.eos_token_id
        assert tokenizer.decode(example["input_ids"], skip_special_tokens=True) == f"{key}:{value}"
        assert example["labels"] == example["input_ids"]  # the loss falls on the whole string
    packed = build_datasets(path, tokenizer, max_length=96)
    assert len(packed.train) < 6 and all(len(block["input_ids"]) == 96 for block in packed.train[:-1])
    cut = build_datasets(path, tokenizer, max_length=16, pack_text=False)
    assert len(cut.train) == 6 and cut.report.truncated == [1, 2, 3, 4, 5, 6]


def test_the_evaluator_generates_every_value_and_scores_in_unit_range(tiny_model_dir):
    model, tokenizer = load_model(str(tiny_model_dir))
    model.train()
    pairs = make_uuid_pairs(5, seed=2)
    values = generate_values(model, tokenizer, [key for key, _ in pairs], max_new_tokens=6, batch_size=2)
    assert len(values) == 5 and all(isinstance(v, str) for v in values)
    scores = evaluate_pairs(model, tokenizer, pairs, batch_size=2)
    assert set(scores) == {"char_accuracy", "exact_match"}
    assert all(0.0 <= v <= 1.0 for v in scores.values())
    assert model.training and tokenizer.padding_side == "right"  # left as found


def test_the_callback_measures_recall_at_exactly_the_configured_steps(tiny_model_dir, tmp_path):
    pairs_path = write_pairs_dataset(make_uuid_pairs(8, seed=3), tmp_path / "pairs.jsonl")
    config = TrainConfig(data=str(pairs_path), model=str(tiny_model_dir), adapter="mora", r=8, max_steps=20,
                         batch_size=4, max_length=96, learning_rate=1e-2, warmup_ratio=0.0, pack_text=False,
                         memorize_pairs_file=str(pairs_path), memorize_eval_steps=[0, 5, 20])
    run_dir = tmp_path / "run"
    result = run_training(config, run_dir, run_id="mem1")
    assert result.status == "succeeded", result.message
    events = read_events(run_dir / "metrics.jsonl")
    assert next(e for e in events if e["kind"] == "data")["train_examples"] == 8  # one pair per example
    recalls = [e for e in events if e["kind"] == "eval"]
    assert [e["step"] for e in recalls] == [0, 5, 20]
    for event in recalls:
        assert 0.0 <= event["char_accuracy"] <= 1.0 and 0.0 <= event["exact_match"] <= 1.0
        assert event["pairs"] == 8 and "eval_loss" not in event
    store = Store(f"sqlite:///{tmp_path / 'studio.db'}")
    run = store.create_run(config.to_dict(), name="memorize", model="tiny", adapter="mora", r=8)
    Collector(store, None).apply([{**e, "run_id": run.id} for e in events])
    series = store.metric_series([run.id], ["char_accuracy", "exact_match", "eval_loss"])[run.id]
    assert [p.step for p in series["char_accuracy"]] == [0, 5, 20]
    assert [p.value for p in series["char_accuracy"]] == [e["char_accuracy"] for e in recalls]
    assert [p.step for p in series["exact_match"]] == [0, 5, 20] and series["eval_loss"] == []
    assert store.get_run(run.id).status == "succeeded"
    store.close()


def test_memorize_settings_are_validated(tmp_path):
    base = dict(data="pairs.jsonl", max_steps=20)
    with pytest.raises(ConfigError, match="memorize_pairs_file"):
        TrainConfig(**base, memorize_eval_steps=[5]).validate()
    with pytest.raises(ConfigError, match="memorize_eval_steps"):
        TrainConfig(**base, memorize_pairs_file="pairs.jsonl").validate()
    with pytest.raises(ConfigError, match="after max_steps"):
        TrainConfig(**base, memorize_pairs_file="p.jsonl", memorize_eval_steps=[10, 30]).validate()
    with pytest.raises(ConfigError, match="≥ 0"):
        TrainConfig(**base, memorize_pairs_file="p.jsonl", memorize_eval_steps=[-1]).validate()
    TrainConfig(**base, memorize_pairs_file="p.jsonl", memorize_eval_steps=[0, 20]).validate()
    args = build_parser().parse_args(["train", "--data", "p.jsonl", "--out", str(tmp_path), "--no-pack-text",
                                      "--memorize-pairs-file", "p.jsonl", "--memorize-eval-steps", "5", "10"])
    assert (args.memorize_eval_steps, args.pack_text, args.memorize_pairs_file) == ([5, 10], False, "p.jsonl")
