"""An evaluation through the queue: the service records it and sends it to a real chat worker process (embedded
Redis, Celery, the tiny model), the worker answers with every row in batched passes and publishes on the
evaluation's stream, and the collector writes examples, answers and scores into the SQLite store. The judge is a real
HTTP server in this process (tests/workers/fake_judge.py) that the worker process calls."""
import json
from datetime import datetime, timezone

import pytest

from app.service import ServiceError, StudioService
from tests.workers.fake_judge import FakeJudge, pointwise_score
from tests.workers.queue_harness import make_world, wait_for
from tests.workers.sample_data import write_dataset
from tests.workers.test_export import adapter_runs
from workers import api
from workers.eval_metrics import METRICS


@pytest.fixture(scope="module")
def world(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("eval-world")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MORA_DATA_DIR", str(root / "data"))
        patch.setenv("MORA_MODELS_DIR", str(tiny_model_dir.parent))
        world = make_world(root, tiny_model_dir)
        world.runs, _ = adapter_runs(world.store, root / "data" / "runs", tiny_model_dir, ("sharing", "lora"))
        world.data = write_dataset(root, "chat")
        world.start_worker("chat")
        world.start_collector()
        yield world
        world.close()


def _finished(world, evaluation):
    return wait_for(lambda: (e := world.store.get_evaluation(evaluation.id)).status in ("succeeded", "failed") and e,
                    180, "the evaluation to finish", every=0.2)


def test_runs_and_the_base_answer_side_by_side_and_every_score_is_stored(world):
    service = StudioService(world.store)
    runs = [world.runs["sharing"], world.runs["lora"]]
    evaluation = service.start_evaluation([r.id for r in runs], include_base=True, prompts="file",
                                          data=str(world.data), limit=5, max_new_tokens=6)
    assert evaluation.status == "queued"
    assert evaluation.rows == [{"label": "base model", "run_id": None}, {"label": "sharing run", "run_id": runs[0].id},
                               {"label": "lora run", "run_id": runs[1].id}]
    done = _finished(world, evaluation)
    assert done.status == "succeeded", done.status_message
    assert done.examples_total == done.examples_done == 5 and done.worker.startswith("chat-test")
    scores, examples, answers = service.evaluation_results(evaluation.id)
    assert [e.source_row for e in examples] == sorted(e.source_row for e in examples) and len(examples) == 5
    assert sorted((a.example, a.row) for a in answers) == [(e, r) for e in range(5) for r in range(3)]
    assert {(s.row, s.metric) for s in scores} == {(r, m) for r in range(3) for m in METRICS}
    by_row = {(s.row, s.metric): s for s in scores}
    assert by_row[(1, "exact_match")].run_id == runs[0].id and by_row[(0, "exact_match")].run_id is None
    for row in range(3):  # each stored aggregate is the mean of that row's stored answers
        values = [a.scores["token_f1"] for a in answers if a.row == row]
        assert by_row[(row, "token_f1")].value == pytest.approx(sum(values) / len(values))
    losses = {by_row[(row, "answer_loss")].value for row in range(3)}
    assert len(losses) == 3  # each adapter changes the reference's likelihood


def test_the_judge_scores_every_answer_through_its_http_endpoint(world):
    service = StudioService(world.store)
    with FakeJudge(prefer="first") as judge:
        evaluation = service.start_evaluation(
            [world.runs["sharing"].id], include_base=True, prompts="file", data=str(world.data), limit=2,
            max_new_tokens=4, judge={"url": judge.url, "model": "judge", "api_key": "sk-secret", "mode": "both"})
        done = _finished(world, evaluation)
    assert done.status == "succeeded", done.status_message
    assert done.settings["judge"] == {"url": judge.url, "model": "judge", "mode": "both",
                                      "rubric": done.settings["judge"]["rubric"], "max_examples": 50,
                                      "timeout_s": 60.0}  # never the key
    assert len(judge.requests) == 2 * 2 + 2 * 1 * 2 and set(judge.keys) == {"Bearer sk-secret"}
    scores, examples, answers = service.evaluation_results(evaluation.id)
    for answer in answers:
        assert answer.judge_score == pointwise_score(answer.answer)
        assert answer.judge_reason == f"length {len(answer.answer)}"
    assert all(j["winner"] is None for e in examples for j in e.judgements)  # a position-biased judge only ties
    rates = {s.row: s.value for s in scores if s.metric == "judge_win_rate"}
    assert rates == {0: 0.5, 1: 0.5}


def test_refusals_are_messages_and_nothing_is_recorded(world):
    service = StudioService(world.store)
    before = len(service.evaluations())
    with pytest.raises(ServiceError, match="kept no eval split"):
        service.start_evaluation([world.runs["sharing"].id], prompts="eval split")
    with pytest.raises(ServiceError, match="choose the runs to evaluate"):
        service.start_evaluation([], prompts="file", data=str(world.data))
    with pytest.raises(ServiceError, match="judge url"):
        service.start_evaluation([world.runs["sharing"].id], prompts="file", data=str(world.data),
                                 judge={"url": "nowhere", "model": "m"})
    assert len(service.evaluations()) == before
    bad = service.start_evaluation([world.runs["sharing"].id], prompts="file", data=str(world.root / "none.jsonl"))
    failed = _finished(world, bad)
    assert failed.status == "failed" and failed.error.startswith("data: ") and "does not exist" in failed.error


def test_a_chat_sent_during_an_evaluation_is_answered_before_it_ends(world):
    """The chat worker runs two jobs that take turns on its models, first come first served (workers.chat.ModelTurns):
    a chat waits for the evaluation's current batch, not for the whole evaluation."""
    data = world.root / "many-prompts.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say the number {i}."},
                                                     {"role": "assistant", "content": f"{i}"}]}) + "\n"
                            for i in range(80)))
    service = StudioService(world.store)
    runs = [world.runs["sharing"]]
    source = {"data": str(data), "split": "all", "limit": 80}
    request = {"base_model": runs[0].model, "max_new_tokens": 12, "batch_rows": 2, "source": source,
               "rows": [{"label": "base model"}, {"label": "sharing run", "run_id": runs[0].id,
                                                  "adapter_path": runs[0].output_dir}]}  # one prompt a batch
    evaluation = world.store.create_evaluation(name="long", base_model=runs[0].model, rows=[
        {"label": "base model", "run_id": None}, {"label": "sharing run", "run_id": runs[0].id}], source=source,
        settings={})
    api.submit_evaluation(evaluation.id, request)
    wait_for(lambda: world.store.get_evaluation(evaluation.id).examples_done > 0, 120, "the evaluation to answer")
    chat = api.start_chat({"base_model": runs[0].model, "rows": [{"label": "base"}],
                           "messages": [{"role": "user", "content": "Hello"}],
                           "settings": {"max_new_tokens": 4, "temperature": 0}})
    final = list(api.chat_updates(chat, timeout_s=120))[-1]
    chat_done = datetime.now(timezone.utc)
    assert final["done"] and final["error"] is None, final
    done = _finished(world, evaluation)
    assert done.status == "succeeded", done.status_message
    assert done.examples_done == 80
    assert chat_done < done.finished_at.replace(tzinfo=done.finished_at.tzinfo or timezone.utc), \
        "the chat waited for the whole evaluation"
    assert service.evaluation_results(evaluation.id)[2]  # and the evaluation lost nothing to the chat
