"""workers.data: every format and schema read, every kind of bad file named precisely (file, row, field), labels
on assistant tokens only, packing, deterministic splits, truncation reports, collate and the trained-token preview."""
import json
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoTokenizer

from workers.data import build_datasets, collate, preview
from workers.data_readers import DatasetError
from workers.data_schemas import inspect_dataset

BAD_DATASETS = Path(__file__).parent / "bad_datasets"
IM_END = "<|im_end|>"


@pytest.fixture(scope="module")
def tokenizer(tiny_model_dir):
    return AutoTokenizer.from_pretrained(tiny_model_dir)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def chat(*turns: str, system: str = "") -> dict:
    """A chat row from alternating user/assistant contents."""
    messages = [{"role": "system", "content": system}] if system else []
    messages += [{"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(turns)]
    return {"messages": messages}


def trained_runs(tokenizer, example: dict) -> list[str]:
    """The decoded text of each run of consecutive labelled tokens."""
    runs, current = [], []
    for token, label in zip(example["input_ids"], example["labels"]):
        if label != -100:
            assert label == token
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokenizer.decode(run) for run in runs]


# --- reading good files --------------------------------------------------------------------------------------------

CHAT_ROWS = [chat("Capital of France?", "Paris."), chat("Capital of Italy?", "Rome.", system="Be brief."),
             chat("Hi", "Hello!", "Bye", "Goodbye!")]
SHAREGPT_ROWS = [{"conversations": [{"from": "human", "value": "Capital of Spain?"}, {"from": "gpt", "value": "Madrid."}]},
                 {"conversations": [{"from": "system", "value": "Be kind."}, {"from": "user", "value": "Hi"},
                                    {"from": "assistant", "value": "Hello."}]}]
ALPACA_ROWS = [{"instruction": "Translate to French.", "input": "cat", "output": "chat"},
               {"instruction": "Say hello.", "output": "hello"},
               {"instruction": "Add.", "input": None, "output": "3"}]


def _write_good(path: Path) -> Path:
    name = path.name
    if name == "chat.jsonl":
        # A blank line in the middle is skipped, and row numbers stay line numbers.
        path.write_text(json.dumps(CHAT_ROWS[0]) + "\n\n" + "".join(json.dumps(r) + "\n" for r in CHAT_ROWS[1:]))
    elif name == "sharegpt.ndjson":
        write_jsonl(path, SHAREGPT_ROWS)
    elif name == "alpaca.json":
        path.write_text(json.dumps(ALPACA_ROWS, indent=2))
    elif name == "prompts.csv":
        path.write_text('id,prompt,completion\n1,"Capital of France?",Paris.\n2,"A poem, please:\nshort",'
                        '"Roses are red,\nviolets are blue."\n', encoding="utf-8")
    elif name == "alpaca.csv":
        path.write_text("\ufeffinstruction,input,output\nSay hi.,,hi\nTranslate.,cat,chat\n", encoding="utf-8")
    elif name == "chat.parquet":
        pd.DataFrame({"messages": [r["messages"] for r in CHAT_ROWS], "source": ["a", "b", "c"]}).to_parquet(path)
    elif name == "text.parquet":
        pd.DataFrame({"text": [f"Document {i}." for i in range(7)]}).to_parquet(path)
    elif name == "notes.txt":
        path.write_text("First paragraph,\nwrapped.\n\n\nSecond one.\n  \nThird.\n")
    elif name == "one_document.txt":
        path.write_text("One document\nover three\nlines.")
    return path


@pytest.mark.parametrize("name, file_format, schema, rows, columns", [
    ("chat.jsonl", "jsonl", "chat", 3, ["messages"]),
    ("sharegpt.ndjson", "jsonl", "sharegpt", 2, ["conversations"]),
    ("alpaca.json", "json", "alpaca", 3, ["instruction", "input", "output"]),
    ("prompts.csv", "csv", "prompt_completion", 2, ["id", "prompt", "completion"]),
    ("alpaca.csv", "csv", "alpaca", 2, ["instruction", "input", "output"]),
    ("chat.parquet", "parquet", "chat", 3, ["messages", "source"]),
    ("text.parquet", "parquet", "text", 7, ["text"]),
    ("notes.txt", "text", "text", 3, ["text"]),
    ("one_document.txt", "text", "text", 1, ["text"]),
])
def test_good_files_are_detected(tmp_path, name, file_format, schema, rows, columns):
    info = inspect_dataset(_write_good(tmp_path / name))
    assert (info.file_format, info.schema, info.rows, info.columns) == (file_format, schema, rows, columns)
    assert len(info.preview_rows) == min(rows, 5)


def test_preview_rows_are_the_raw_rows(tmp_path):
    assert inspect_dataset(_write_good(tmp_path / "chat.jsonl")).preview_rows == CHAT_ROWS
    assert inspect_dataset(_write_good(tmp_path / "alpaca.json")).preview_rows == ALPACA_ROWS
    assert inspect_dataset(_write_good(tmp_path / "notes.txt")).preview_rows == [
        {"text": "First paragraph,\nwrapped."}, {"text": "Second one."}, {"text": "Third."}]
    assert inspect_dataset(_write_good(tmp_path / "prompts.csv")).preview_rows[1] == {
        "id": "2", "prompt": "A poem, please:\nshort", "completion": "Roses are red,\nviolets are blue."}
    assert inspect_dataset(_write_good(tmp_path / "one_document.txt")).preview_rows == [
        {"text": "One document\nover three\nlines."}]


def test_fifty_thousand_rows_validate_in_seconds(tmp_path):
    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(50_000)]
    rows[49_999] = {"messages": "oops"}
    path = write_jsonl(tmp_path / "big.jsonl", rows)
    start = time.perf_counter()
    with pytest.raises(DatasetError, match=r"^big\.jsonl, row 50000: 'messages' must be a list"):
        inspect_dataset(path)
    assert time.perf_counter() - start < 10


# --- bad files -----------------------------------------------------------------------------------------------------

BAD_FILES = {
    "empty.jsonl": r"empty\.jsonl: the file is empty",
    "empty.txt": r"empty\.txt: the file is empty",
    "whitespace_only.jsonl": r"whitespace_only\.jsonl: the file contains only whitespace",
    "latin1.jsonl": r"latin1\.jsonl, line 2: not UTF-8 text \(byte 0xe9\)",
    "malformed_line.jsonl": r"malformed_line\.jsonl, row 3: not valid JSON \(Expecting ',' delimiter at column 49\)",
    "invalid.json": r"invalid\.json: not valid JSON \(Expecting ',' delimiter at line 3, column 19\)",
    "jsonl_named_json.json": r"jsonl_named_json\.json: not valid JSON \(Extra data .*name the file \.jsonl",
    "top_level_object.json": r"top_level_object\.json: the top level must be a list of rows .*found object",
    "empty_list.json": r"empty_list\.json: the file has no rows",
    "row_not_object.jsonl": r"row_not_object\.jsonl, row 2: each row must be an object .*found list",
    "unknown_columns.jsonl": r"unknown_columns\.jsonl: no recognised format: found columns 'question', 'answer'; "
                             r"expected 'messages' \(chat\)",
    "messages_is_string.jsonl": r"messages_is_string\.jsonl, row 2: 'messages' must be a list of \{role, content\}, "
                                r"found str",
    "empty_messages.jsonl": r"empty_messages\.jsonl, row 4: 'messages' is an empty list",
    "message_missing_content.jsonl": r"message_missing_content\.jsonl, row 1: message 2 in 'messages' has no "
                                     r"'content'",
    "content_not_string.jsonl": r"content_not_string\.jsonl, row 1: message 1 in 'messages': 'content' must be a "
                                r"string, found list",
    "unknown_role.jsonl": r"unknown_role\.jsonl, row 2: message 1 in 'messages' has role 'bot'; expected one of "
                          r"system, user, assistant",
    "sharegpt_unknown_from.jsonl": r"sharegpt_unknown_from\.jsonl, row 1: message 2 in 'conversations' has from "
                                   r"'bot'; expected one of human, gpt",
    "no_assistant.jsonl": r"no_assistant\.jsonl, row 1: 'messages' has no assistant message",
    "empty_assistant.jsonl": r"empty_assistant\.jsonl, row 1: message 2 in 'messages' is an assistant turn with an "
                             r"empty 'content'",
    "empty_output.json": r"empty_output\.json, row 3: 'output' is empty",
    "empty_completion.csv": r"empty_completion\.csv, row 3: 'completion' is empty",
    "text_not_string.jsonl": r"text_not_string\.jsonl, row 2: 'text' must be a string, found int",
    "ragged_rows.csv": r"ragged_rows\.csv, row 4: 4 fields, but the header has 3",
    "missing_output_column.csv": r"missing_output_column\.csv: no recognised format: found columns 'instruction', "
                                 r"'input' \(it has 'instruction' but not 'output'\)",
    "duplicate_header.csv": r"duplicate_header\.csv, row 1: the header repeats 'prompt'",
    "header_only.csv": r"header_only\.csv: the file has no rows",
    "not_parquet.parquet": r"not_parquet\.parquet: not a Parquet file",
    "mixed_schemas.jsonl": r"mixed_schemas\.jsonl, row 3: the row is alpaca \('instruction', 'output'\) but row 1 "
                           r"is chat \('messages'\); use one format per file",
    "spreadsheet.xlsx": r"spreadsheet\.xlsx: unsupported file type '\.xlsx'; expected one of \.jsonl",
    "nan_value.jsonl": r"nan_value\.jsonl, row 2: NaN is not a JSON value \(JSON has no NaN or Infinity\)",
    "infinity.jsonl": r"infinity\.jsonl, row 2: -Infinity is not a JSON value",
    "deep_nesting.jsonl": r"deep_nesting\.jsonl, row 2: nested too deeply to read .*; flatten the row",
    "huge_integer.jsonl": r"huge_integer\.jsonl, row 3: an integer of 5,000 digits .*write it as a string",
    "nul_byte.jsonl": r"nul_byte\.jsonl, line 2: a NUL byte \(0x00\) at column 36; this is a binary file",
    # 519 bytes: one string of 1 MB, dictionary-encoded, repeated 10,000 times (10 GB decoded).
    "dictionary_bomb.parquet": r"dictionary_bomb\.parquet, dictionary-encoded column\(s\) 'text': the data decodes "
                               r"to [\d,.]+ MiB or more, over the 4,096\.0 MiB limit .*raise MORA_MAX_DECODED_MB",
    # 6.5 KB: one zstd page that inflates to a 200 MB cell.
    "compressed_page_bomb.parquet": r"compressed_page_bomb\.parquet, row 1: 190\.7 MiB decoded \(the limit on one "
                                    r"row is 16\.0 MiB\); raise MORA_MAX_ROW_MB",
}


@pytest.mark.parametrize("name", sorted(BAD_FILES))
def test_bad_file_is_named_precisely(name):
    with pytest.raises(DatasetError, match="^" + BAD_FILES[name]):
        inspect_dataset(BAD_DATASETS / name)


def test_every_bad_file_has_an_expected_message():
    assert sorted(p.name for p in BAD_DATASETS.iterdir()) == sorted(BAD_FILES)


def test_missing_file_and_folder(tmp_path):
    with pytest.raises(DatasetError, match=r"^nowhere\.jsonl: no such file"):
        inspect_dataset(tmp_path / "nowhere.jsonl")
    (tmp_path / "folder.jsonl").mkdir()
    with pytest.raises(DatasetError, match=r"^folder\.jsonl: not a file"):
        inspect_dataset(tmp_path / "folder.jsonl")


def test_rows_of_other_formats_are_numbered_as_the_user_sees_them(tmp_path):
    rows = ALPACA_ROWS + [{"instruction": "Say nothing.", "output": ""}]
    pd.DataFrame(rows).to_parquet(tmp_path / "a.parquet")
    with pytest.raises(DatasetError, match=r"^a\.parquet, row 4: 'output' is empty"):
        inspect_dataset(tmp_path / "a.parquet")
    # A quoted cell spanning two lines: the bad row is reported at the line where it starts.
    (tmp_path / "a.csv").write_text('prompt,completion\n"two\nlines",ok\n"x",\n')
    with pytest.raises(DatasetError, match=r"^a\.csv, row 4: 'completion' is empty"):
        inspect_dataset(tmp_path / "a.csv")
    write_jsonl(tmp_path / "b.jsonl", [chat("a", "b"), {"prompt": "a", "completion": "b"}])
    with pytest.raises(DatasetError, match=r"^b\.jsonl, row 2: the row is prompt_completion"):
        inspect_dataset(tmp_path / "b.jsonl")
    write_jsonl(tmp_path / "c.jsonl", [{"text": "a"}, {"body": "b"}])
    with pytest.raises(DatasetError, match=r"^c\.jsonl, row 2: no 'text' \(found 'body'\)"):
        inspect_dataset(tmp_path / "c.jsonl")


# --- rendering and labels ------------------------------------------------------------------------------------------

def test_chat_labels_are_the_assistant_contents_and_their_end_of_turn(tmp_path, tokenizer):
    row = chat("Capital of France? é", "Paris. é 😀", "And Italy?", "Rome.", system="Be brief.")
    data = build_datasets(write_jsonl(tmp_path / "c.jsonl", [row]), tokenizer, max_length=256)
    [example] = data.train
    assert tokenizer.decode(example["input_ids"]) == tokenizer.apply_chat_template(row["messages"], tokenize=False)
    assert trained_runs(tokenizer, example) == [f"Paris. é 😀{IM_END}", f"Rome.{IM_END}"]
    untrained = tokenizer.decode([t for t, label in zip(example["input_ids"], example["labels"]) if label == -100])
    assert "Be brief." in untrained and "Capital of France? é" in untrained and "And Italy?" in untrained
    assert example["attention_mask"] == [1] * len(example["input_ids"])
    assert data.report.trained_tokens == sum(label != -100 for label in example["labels"])
    assert data.report.total_tokens == len(example["input_ids"])


def test_an_answer_that_repeats_the_prompt_or_the_header_is_found_in_the_answer(tmp_path, tokenizer):
    rows = [chat("assistant", "assistant"), chat("Paris.", "Paris.")]
    data = build_datasets(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, max_length=256)
    assert [trained_runs(tokenizer, e) for e in data.train] == [[f"assistant{IM_END}"], [f"Paris.{IM_END}"]]
    # The trained run is at the end, right before the final newline, not inside the user turn or the header.
    for example in data.train:
        assert example["labels"][-1] == -100 and example["labels"][-2] == tokenizer.convert_tokens_to_ids(IM_END)


@pytest.mark.parametrize("name, row, user, answer", [
    ("alpaca.jsonl", {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
     "Translate to French.\n\ncat", "chat"),
    ("alpaca_no_input.jsonl", {"instruction": "Say hi.", "input": " ", "output": "hi"}, "Say hi.", "hi"),
    ("prompts.jsonl", {"prompt": "Capital of Peru?", "completion": "Lima."}, "Capital of Peru?", "Lima."),
    ("sharegpt.jsonl", {"conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Hello."}]},
     "Hi", "Hello."),
])
def test_other_schemas_render_as_a_user_and_an_assistant_turn(tmp_path, tokenizer, name, row, user, answer):
    [example] = build_datasets(write_jsonl(tmp_path / name, [row]), tokenizer, max_length=256).train
    expected = tokenizer.apply_chat_template([{"role": "user", "content": user},
                                              {"role": "assistant", "content": answer}], tokenize=False)
    assert tokenizer.decode(example["input_ids"]) == expected
    assert trained_runs(tokenizer, example) == [answer + IM_END]


def test_without_a_chat_template_a_plain_format_is_used_and_reported(tmp_path, tiny_model_dir):
    plain = AutoTokenizer.from_pretrained(tiny_model_dir)
    plain.chat_template = None
    data = build_datasets(write_jsonl(tmp_path / "c.jsonl", [chat("Hi", "Hello.")]), plain, max_length=256)
    [example] = data.train
    assert plain.decode(example["input_ids"]) == f"User: Hi\nAssistant: Hello.{IM_END}\n"
    assert trained_runs(plain, example) == [f"Hello.{IM_END}"]
    assert any("no chat template" in note for note in data.report.notes)


def test_a_row_the_template_rejects_is_dropped_with_the_reason(tmp_path, tiny_model_dir):
    strict = AutoTokenizer.from_pretrained(tiny_model_dir)
    strict.chat_template = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported')"
                            " }}{% endif %}" + strict.chat_template)
    path = write_jsonl(tmp_path / "c.jsonl", [chat("Hi", "Hello."), chat("Hi", "Hey.", system="Be kind.")])
    data = build_datasets(path, strict, max_length=256)
    assert len(data.train) == 1
    assert data.report.dropped == [(2, "the model's chat template rejects it: System role not supported")]


def test_long_examples_are_truncated_or_dropped_and_reported(tmp_path, tokenizer):
    long_prompt = "The capital of France is Paris. " * 20
    rows = [chat("Hi", "Hello."), chat(long_prompt, "Yes."), chat("Tell me.", long_prompt)]
    data = build_datasets(write_jsonl(tmp_path / "c.jsonl", rows), tokenizer, max_length=48)
    assert data.report.rows_in == 3 and data.report.examples_out == 2
    assert [row for row, _ in data.report.dropped] == [2]
    assert "every trained token lies beyond max_length=48" in data.report.dropped[0][1]
    assert data.report.truncated == [3]
    short, truncated = data.train
    assert len(truncated["input_ids"]) == 48 and truncated["labels"][-1] != -100
    assert trained_runs(tokenizer, short) == [f"Hello.{IM_END}"]


def test_nothing_left_to_train_on_is_an_error(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [chat("A long question about France and Italy?", "Paris.")])
    with pytest.raises(DatasetError, match=r"^c\.jsonl: no training example left with max_length=4: row 1: every "
                                           r"trained token lies beyond"):
        build_datasets(path, tokenizer, max_length=4)


# --- raw text packing ----------------------------------------------------------------------------------------------

DOCUMENTS = [f"Document {i}: the capital of France is Paris." for i in range(12)]


def _stream_length(tokenizer, documents) -> int:
    return sum(len(tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in documents)


def test_text_is_packed_into_full_blocks_with_eos_between_documents(tmp_path, tokenizer):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(DOCUMENTS) + "\n")
    total = _stream_length(tokenizer, DOCUMENTS)
    kept = next(m for m in range(8, 64) if total % m >= m / 2)
    dropped = next(m for m in range(8, 64) if 0 < total % m < m / 2)

    data = build_datasets(path, tokenizer, max_length=kept)
    assert [len(b["input_ids"]) for b in data.train] == [kept] * (total // kept) + [total % kept]
    assert all(b["labels"] == b["input_ids"] and b["attention_mask"] == [1] * len(b["input_ids"]) for b in data.train)
    text = "".join(tokenizer.decode(b["input_ids"]) for b in data.train)
    assert text == "".join(d + IM_END for d in DOCUMENTS)
    assert any("kept the last block" in note for note in data.report.notes)
    assert data.report.trained_tokens == data.report.total_tokens == total

    data = build_datasets(path, tokenizer, max_length=dropped)
    assert [len(b["input_ids"]) for b in data.train] == [dropped] * (total // dropped)
    assert any(f"dropped the last {total % dropped} tokens" in note for note in data.report.notes)


def test_empty_documents_are_dropped_and_reported(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": DOCUMENTS[0]}, {"text": "  "}, {"text": DOCUMENTS[1]}])
    data = build_datasets(path, tokenizer, max_length=8)
    assert data.report.dropped == [(2, "empty text")]


# --- splits --------------------------------------------------------------------------------------------------------

def _answers(tokenizer, examples) -> list[str]:
    return [trained_runs(tokenizer, e)[0] for e in examples]


def test_fraction_split_is_deterministic_and_disjoint(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", [chat(f"Question {i}?", f"Answer {i}.") for i in range(20)])
    first = build_datasets(path, tokenizer, max_length=64, eval_fraction=0.25, seed=0)
    again = build_datasets(path, tokenizer, max_length=64, eval_fraction=0.25, seed=0)
    other = build_datasets(path, tokenizer, max_length=64, eval_fraction=0.25, seed=1)
    assert (len(first.train), len(first.eval)) == (15, 5)
    assert list(first.train) == list(again.train) and list(first.eval) == list(again.eval)
    assert _answers(tokenizer, first.eval) != _answers(tokenizer, other.eval)
    answers = _answers(tokenizer, first.train) + _answers(tokenizer, first.eval)
    assert sorted(answers) == sorted(f"Answer {i}.{IM_END}" for i in range(20))


def test_text_is_split_by_document_before_packing(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": f"Document number {i:02d} ends here."} for i in range(20)])
    data = build_datasets(path, tokenizer, max_length=16, eval_fraction=0.2, seed=3)
    train_text = "".join(tokenizer.decode(b["input_ids"]) for b in data.train)
    eval_text = "".join(tokenizer.decode(b["input_ids"]) for b in data.eval)
    eval_numbers = {i for i in range(20) if f"number {i:02d}" in eval_text}
    assert len(eval_numbers) >= 3
    assert not any(f"{i:02d}" in train_text for i in eval_numbers)


def test_separate_eval_file(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", [chat("Hi", "Hello."), chat("Bye", "Goodbye.")])
    evaluation = write_jsonl(tmp_path / "eval.jsonl", [{"prompt": "Yo", "completion": "Hey."},
                                                       {"prompt": "x " * 100, "completion": "y"}])
    data = build_datasets(train, tokenizer, max_length=64, eval_path=evaluation)
    assert _answers(tokenizer, data.eval) == [f"Hey.{IM_END}"]
    assert data.report.rows_in == 4 and data.report.examples_out == 3
    assert data.report.dropped[0][0] == 2 and data.report.dropped[0][1].startswith("eval.jsonl: every trained")
    with pytest.raises(DatasetError, match="not both"):
        build_datasets(train, tokenizer, max_length=64, eval_path=evaluation, eval_fraction=0.1)
    text = write_jsonl(tmp_path / "text.jsonl", [{"text": "A document."}])
    with pytest.raises(DatasetError, match=r"^text\.jsonl: the eval file is text but the training file train\.jsonl "
                                           r"is chat"):
        build_datasets(train, tokenizer, max_length=64, eval_path=text)
    with pytest.raises(DatasetError, match=r"eval_fraction=0\.9 of 2 rows leaves no row to train on"):
        build_datasets(train, tokenizer, max_length=64, eval_fraction=0.9)


# --- collate and preview -------------------------------------------------------------------------------------------

def test_collate_right_pads_each_field_with_its_own_value():
    batch = [{"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "attention_mask": [1, 1, 1]},
             {"input_ids": [8], "labels": [8], "attention_mask": [1]}]
    out = collate(batch, pad_token_id=0)
    assert all(t.dtype == torch.long for t in out.values())
    assert out["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert out["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_preview_marks_exactly_the_trained_text(tmp_path, tokenizer):
    rows = [chat("Capital of France?", "Paris. é 😀", system="Be brief."), chat("Hi", "Hello.", "Bye", "Bye!"),
            chat("Capital of Italy?", "Rome. " * 40), chat("Not shown", "No.")]
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    shown = preview(path, tokenizer, max_length=64, n=3)
    data = build_datasets(path, tokenizer, max_length=64)
    assert len(shown) == 3
    for segments, example in zip(shown, data.train):
        assert "".join(text for text, _ in segments) == tokenizer.decode(example["input_ids"])
        assert [text for text, trained in segments if trained] == trained_runs(tokenizer, example)
    assert shown[0][1] == (f"Paris. é 😀{IM_END}", True)
    assert [trained for _, trained in shown[1]] == [False, True, False, True, False]
    assert data.report.truncated == [3] and shown[2][-1][1] is True  # cut inside the answer


def test_preview_of_text_is_the_packed_blocks(tmp_path, tokenizer):
    path = tmp_path / "docs.txt"
    path.write_text("\n\n".join(DOCUMENTS))
    shown = preview(path, tokenizer, max_length=16, n=2)
    blocks = build_datasets(path, tokenizer, max_length=16).train[:2]
    assert shown == [[(tokenizer.decode(b["input_ids"]), True)] for b in blocks]


# --- limits --------------------------------------------------------------------------------------------------------

def test_row_count_limit_is_checked_while_reading(tmp_path, monkeypatch):
    monkeypatch.setenv("MORA_MAX_ROWS", "3")
    path = write_jsonl(tmp_path / "four.jsonl", CHAT_ROWS + CHAT_ROWS[:1])
    with pytest.raises(DatasetError, match=r"^four\.jsonl, row 4: more than 3 rows.*raise MORA_MAX_ROWS"):
        inspect_dataset(path)
    pd.DataFrame({"text": ["a", "b", "c", "d"]}).to_parquet(tmp_path / "four.parquet")
    with pytest.raises(DatasetError, match=r"^four\.parquet: 4 rows, more than 3.*raise MORA_MAX_ROWS"):
        inspect_dataset(tmp_path / "four.parquet")


@pytest.mark.parametrize("name, content, where", [
    ("long.jsonl", json.dumps({"text": "x" * 2**20}) + "\n", r"line 1: a line of more than 1\.0 MiB"),
    ("long.txt", "short\n\n" + ("y" * 1000 + "\n") * 1100, r"line 3: a paragraph of more than 1\.0 MiB"),
    ("long.csv", 'text\n"' + ("z" * 1000 + "\n") * 1100 + '"\n', r"row 2: a cell of more than 1\.0 MiB"),
    ("long.json", json.dumps([{"text": "x" * 2**20}]), r"the whole file: a JSON list of 1\.0 MiB"),
])
def test_one_row_over_the_row_limit_is_refused(tmp_path, monkeypatch, name, content, where):
    monkeypatch.setenv("MORA_MAX_ROW_MB", "1")
    (tmp_path / name).write_text(content)
    with pytest.raises(DatasetError, match=rf"^{name.replace('.', '[.]')}, {where}.*raise MORA_MAX_ROW_MB"):
        inspect_dataset(tmp_path / name)


def test_decoded_size_limit_counts_text_and_parquet(tmp_path, monkeypatch):
    monkeypatch.setenv("MORA_MAX_DECODED_MB", "1")
    path = write_jsonl(tmp_path / "many.jsonl", [{"text": "w" * 1000}] * 1100)
    with pytest.raises(DatasetError, match=r"^many\.jsonl, line 10\d\d: the data decodes to 1\.0 MiB or more, over "
                                           r"the 1\.0 MiB limit"):
        inspect_dataset(path)
    pd.DataFrame({"text": [f"{i:04d}" + "v" * 2000 for i in range(1000)]}).to_parquet(tmp_path / "wide.parquet")
    with pytest.raises(DatasetError, match=r"^wide\.parquet, .*over the 1\.0 MiB limit.*MORA_MAX_DECODED_MB"):
        inspect_dataset(tmp_path / "wide.parquet")


def test_a_bad_limit_setting_is_named(tmp_path, monkeypatch):
    monkeypatch.setenv("MORA_MAX_ROWS", "lots")
    with pytest.raises(ValueError, match="MORA_MAX_ROWS must be a positive whole number, found 'lots'"):
        inspect_dataset(write_jsonl(tmp_path / "c.jsonl", CHAT_ROWS))


def test_preview_rows_keep_long_values_short(tmp_path):
    path = write_jsonl(tmp_path / "t.jsonl", [{"text": "q" * 10_000, "tags": [[[[[[[[[["deep"]]]]]]]]]]}])
    [row] = inspect_dataset(path).preview_rows
    assert row["text"] == "q" * 2000 + "…" and "deep" not in json.dumps(row)


def test_preview_reads_only_the_rows_it_shows(tmp_path, tokenizer):
    rows = [chat(f"Question {i}?", f"Answer {i}.") for i in range(2000)]
    rows[1999] = {"messages": "oops"}
    path = write_jsonl(tmp_path / "c.jsonl", rows)
    with pytest.raises(DatasetError, match="row 2000"):
        inspect_dataset(path)
    assert len(preview(path, tokenizer, max_length=64, n=3)) == 3


# --- folders -------------------------------------------------------------------------------------------------------

def test_a_save_to_disk_folder_is_read_and_trained(tmp_path, tokenizer):
    import datasets

    datasets.Dataset.from_list(CHAT_ROWS).save_to_disk(str(tmp_path / "saved"))
    info = inspect_dataset(tmp_path / "saved")
    assert (info.file_format, info.schema, info.rows, info.preview_rows) == ("arrow", "chat", 3, CHAT_ROWS)
    data = build_datasets(tmp_path / "saved", tokenizer, max_length=256)
    assert [trained_runs(tokenizer, e) for e in data.train][0] == [f"Paris.{IM_END}"]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(CHAT_ROWS)}).save_to_disk(str(tmp_path / "splits"))
    with pytest.raises(DatasetError, match=r"^splits: a DatasetDict without a 'train' split \(it has 'test'\)"):
        inspect_dataset(tmp_path / "splits")


def test_a_folder_of_shards_is_one_dataset_and_names_the_shard(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    write_jsonl(shards / "part-0.jsonl", CHAT_ROWS)
    write_jsonl(shards / "part-1.jsonl", CHAT_ROWS[:2])
    assert inspect_dataset(shards).rows == 5
    write_jsonl(shards / "part-2.jsonl", [CHAT_ROWS[0], {"messages": "oops"}])
    with pytest.raises(DatasetError, match=r"^shards/part-2\.jsonl, row 2: 'messages' must be a list"):
        inspect_dataset(shards)
    pd.DataFrame({"messages": [r["messages"] for r in CHAT_ROWS]}).to_parquet(shards / "part-3.parquet")
    with pytest.raises(DatasetError, match=r"^shards: the folder mixes jsonl and parquet shards"):
        inspect_dataset(shards)


def test_a_dictionary_bomb_inside_messages_is_refused_before_expanding(tmp_path, monkeypatch):
    import pyarrow as pa
    import pyarrow.parquet as pq

    monkeypatch.setenv("MORA_MAX_DECODED_MB", "1")
    rows = 2000
    content = pa.DictionaryArray.from_arrays(pa.array([0] * (2 * rows), pa.int32()), pa.array(["c" * 100_000]))
    roles = pa.array(["user", "assistant"] * rows)
    turns = pa.StructArray.from_arrays([roles, content], names=["role", "content"])
    messages = pa.ListArray.from_arrays(pa.array(range(0, 2 * rows + 1, 2), pa.int32()), turns)
    pq.write_table(pa.table({"messages": messages}), tmp_path / "nested.parquet", compression="zstd")
    assert (tmp_path / "nested.parquet").stat().st_size < 20_000
    with pytest.raises(DatasetError, match=r"^nested\.parquet, dictionary-encoded column\(s\) 'messages': the data "
                                           r"decodes to [\d,.]+ MiB or more"):
        inspect_dataset(tmp_path / "nested.parquet")
