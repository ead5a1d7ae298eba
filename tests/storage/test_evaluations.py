"""Evaluations in the store, on SQLite and PostgreSQL: rows, examples, answers, scores and judge verdicts; replays
add nothing twice; the status is final once terminal; a database made before evaluations existed migrates."""
from __future__ import annotations

import pytest
from alembic import command
from sqlalchemy import inspect

from storage.db import alembic_config, create_store_engine
from storage.repo import InvalidTransition, NotFound, StorageError, Store

PROMPT = [{"role": "user", "content": "What is part 7?"}]


@pytest.fixture
def evaluation(store, run):
    return store.create_evaluation(name="eval 1", base_model="tiny-llama",
                                   rows=[{"label": "base model", "run_id": None}, {"label": run.name, "run_id": run.id}],
                                   source={"data": "/data/x.jsonl", "split": "all", "limit": 2},
                                   settings={"max_new_tokens": 16})


def test_an_evaluation_keeps_its_examples_answers_and_scores(store, run, evaluation):
    assert evaluation.status == "queued" and evaluation.rows[1] == {"label": "mora r8", "run_id": run.id}
    store.set_evaluation_status(evaluation.id, "running", "answering", worker="chat@host", examples_total=2)
    examples = [{"example": i, "source_row": i + 1, "prompt": PROMPT, "reference": f"answer {i}"} for i in range(2)]
    assert store.add_evaluation_examples(evaluation.id, examples) == 2
    assert store.add_evaluation_examples(evaluation.id, examples) == 0  # a replayed stream
    answers = [{"example": 0, "row": row, "answer": f"text {row}", "scores": {"exact_match": float(row),
                                                                             "answer_loss": float("nan")}}
               for row in (0, 1)]
    assert store.add_evaluation_answers(evaluation.id, answers, examples_done=1) == 2
    assert store.add_evaluation_answers(evaluation.id, answers, examples_done=0) == 0
    store.put_evaluation_scores(evaluation.id, [{"row": 1, "run_id": run.id, "step": 20, "metric": "exact_match",
                                                 "value": 0.5}])
    store.put_evaluation_scores(evaluation.id, [{"row": 1, "run_id": run.id, "step": 20, "metric": "exact_match",
                                                 "value": 1.0}, {"row": 0, "metric": "exact_match", "value": 0.0}])
    store.judge_evaluation(evaluation.id, answers=[{"example": 0, "row": 1, "score": 4, "reason": "close"}],
                           examples=[{"example": 0, "judgements": [{"a": 0, "b": 1, "winner": 1, "reasons": ["x"]}]}])
    done = store.set_evaluation_status(evaluation.id, "succeeded", "done")

    assert done.examples_total == 2 and done.examples_done == 1 and done.finished_at is not None
    assert done.worker == "chat@host" and done.started_at <= done.finished_at
    stored = store.evaluation_answers(evaluation.id)
    assert [(a.example, a.row, a.answer) for a in stored] == [(0, 0, "text 0"), (0, 1, "text 1")]
    assert stored[1].scores == {"exact_match": 1.0, "answer_loss": None}  # NaN is a gap, not an error
    assert (stored[1].judge_score, stored[1].judge_reason) == (4.0, "close")
    assert [e.reference for e in store.evaluation_examples(evaluation.id)] == ["answer 0", "answer 1"]
    assert store.evaluation_examples(evaluation.id)[0].judgements[0]["winner"] == 1
    assert [(s.row, s.run_id, s.step, s.value) for s in store.evaluation_scores(evaluation.id)] == [
        (0, None, None, 0.0), (1, run.id, 20, 1.0)]
    assert [e.id for e in store.list_evaluations()] == [evaluation.id]

    with pytest.raises(InvalidTransition):
        store.set_evaluation_status(evaluation.id, "running")
    assert store.set_evaluation_status(evaluation.id, "succeeded").status == "succeeded"  # replayed: no-op


def test_deleting_a_run_keeps_the_evaluation_and_deleting_the_evaluation_removes_everything(store, run, evaluation):
    store.put_evaluation_scores(evaluation.id, [{"row": 1, "run_id": run.id, "metric": "token_f1", "value": 0.3}])
    store.add_evaluation_examples(evaluation.id, [{"example": 0, "source_row": 1, "prompt": PROMPT,
                                                   "reference": "r"}])
    store.set_status(run.id, "running")
    store.set_status(run.id, "failed")
    store.delete_run(run.id)
    assert store.evaluation_scores(evaluation.id)[0].run_id is None
    store.delete_evaluation(evaluation.id)
    assert store.evaluation_examples(evaluation.id) == [] and store.list_evaluations() == []
    with pytest.raises(NotFound):
        store.get_evaluation(evaluation.id)


def test_bad_input_names_the_field(store, run):
    with pytest.raises(StorageError, match="at least one row"):
        store.create_evaluation(name="e", base_model="", rows=[], source={})
    with pytest.raises(NotFound, match="run 'nope'"):
        store.create_evaluation(name="e", base_model="", rows=[{"label": "x", "run_id": "nope"}], source={})
    evaluation = store.create_evaluation(name="e", base_model="", rows=[{"label": "b", "run_id": None}], source={})
    with pytest.raises(StorageError, match=r"answers\[0\] must be a mapping with example, row and an answer"):
        store.add_evaluation_answers(evaluation.id, [{"example": 0, "row": 0, "answer": None}])
    with pytest.raises(StorageError, match=r"answers\[0\].scores.exact_match must be a number"):
        store.add_evaluation_answers(evaluation.id, [{"example": 0, "row": 0, "answer": "a",
                                                      "scores": {"exact_match": "yes"}}])
    with pytest.raises(NotFound, match="no answer of row 0 to example 3"):
        store.judge_evaluation(evaluation.id, answers=[{"example": 3, "row": 0, "score": 1}])
    with pytest.raises(NotFound):
        store.add_evaluation_examples("missing", [])


def test_a_database_from_before_evaluations_migrates_and_keeps_its_runs(store_url):
    engine = create_store_engine(store_url)  # creates the SQLite file's folder
    command.upgrade(alembic_config(store_url), "0001")
    try:
        assert "evaluations" not in inspect(engine).get_table_names()
    finally:
        engine.dispose()
    with Store(store_url) as store:  # opening migrates to the head
        run = store.create_run({}, name="old", model="m", adapter="lora", r=4)
        store.create_evaluation(name="e", base_model="m", rows=[{"label": "old", "run_id": run.id}], source={})
    command.downgrade(alembic_config(store_url), "0001")
    with Store(store_url) as store:
        assert [r.name for r in store.list_runs()] == ["old"] and store.list_evaluations() == []


def test_run_scores_are_every_evaluations_score_of_a_run_by_step(store, run, evaluation):
    later = store.create_evaluation(name="eval 2", base_model="tiny-llama", rows=[{"label": "r", "run_id": run.id}],
                                    source={})
    store.put_evaluation_scores(later.id, [{"row": 0, "run_id": run.id, "step": 50, "metric": "rouge_l", "value": 0.7}])
    store.put_evaluation_scores(evaluation.id, [{"row": 1, "run_id": run.id, "step": 20, "metric": "rouge_l",
                                                 "value": 0.2}, {"row": 1, "run_id": run.id, "step": 20,
                                                                  "metric": "token_f1", "value": 0.9}])
    assert [(s.step, s.value) for s in store.run_scores([run.id], "rouge_l")] == [(20, 0.2), (50, 0.7)]
    assert store.run_scores([], "rouge_l") == []
