"""The Evaluation view's functions on a real SQLite store: the score table with the base as a row and the A/B votes
as the human score, the per-example order (most disagreement first), the highlighted differences, the curves, and
the cheap tick that sends nothing while nothing moved."""
import pytest

from app import eval_view
from app.service import StudioService
from storage.repo import Store
from workers.eval_metrics import curve_name


@pytest.fixture
def world(tmp_path):
    store = Store(f"sqlite:///{tmp_path / 'studio.db'}")
    service = StudioService(store, runs_dir=tmp_path / "runs")
    run = store.create_run({}, name="mora", model="tiny-llama", adapter="mora", r=8)
    other = store.create_run({}, name="lora", model="tiny-llama", adapter="lora", r=8)
    evaluation = store.create_evaluation(name="e", base_model="tiny-llama", source={},
                                         rows=[{"label": "base model", "run_id": None},
                                               {"label": "mora", "run_id": run.id}])
    store.add_evaluation_examples(evaluation.id, [
        {"example": 0, "source_row": 1, "prompt": [{"role": "user", "content": "Q0 <b>?"}], "reference": "red cat"},
        {"example": 1, "source_row": 2, "prompt": [{"role": "user", "content": "Q1"}], "reference": "blue dog"}])
    store.add_evaluation_answers(evaluation.id, [
        {"example": 0, "row": 0, "answer": "red cat", "scores": {"token_f1": 1.0}},
        {"example": 0, "row": 1, "answer": "red cat", "scores": {"token_f1": 1.0}},
        {"example": 1, "row": 0, "answer": "green dog", "scores": {"token_f1": 0.5}},
        {"example": 1, "row": 1, "answer": "blue dog", "scores": {"token_f1": 1.0}}], examples_done=2)
    store.put_evaluation_scores(evaluation.id, [
        {"row": 0, "metric": "token_f1", "value": 0.75}, {"row": 1, "run_id": run.id, "step": 20,
                                                          "metric": "token_f1", "value": 1.0}])
    chat = store.create_chat(title="t", base_model="tiny-llama", adapters=[])
    store.add_vote(chat.id, turn=0, winner_run_id=run.id, loser_run_id=other.id)
    store.add_vote(chat.id, turn=1, winner_run_id=other.id, loser_run_id=run.id)
    store.add_vote(chat.id, turn=2, winner_run_id=run.id, loser_run_id=other.id)
    store.add_metric_points(run.id, [{"name": curve_name("token_f1"), "step": s, "value": v}
                                     for s, v in ((5, 0.2), (10, 0.6))])
    yield service, store, run, store.get_evaluation(evaluation.id)
    store.close()


def test_the_score_table_has_the_base_as_a_row_and_the_votes_as_the_human_score(world):
    service, store, run, evaluation = world
    scores, _, _ = service.evaluation_results(evaluation.id)
    columns, rows = eval_view.score_rows(evaluation, scores, service.votes([run.id]))
    assert columns == ["row", "step", "token_f1", eval_view.HUMAN]
    assert rows == [["base model", "", 0.75, ""], ["mora", 20, 1.0, "2/3"]]


def test_examples_where_the_rows_disagree_come_first_with_the_differences_marked(world):
    service, store, run, evaluation = world
    _, examples, answers = service.evaluation_results(evaluation.id)
    ordered = eval_view.ordered_examples(examples, answers, "most disagreement", "token_f1")
    assert [example.example for example, _ in ordered] == [1, 0]
    assert [e.example for e, _ in eval_view.ordered_examples(examples, answers, "file order", "token_f1")] == [0, 1]
    assert [e.example for e, _ in eval_view.ordered_examples(examples, answers, "worst mean score", "token_f1")] \
        == [1, 0]
    page = eval_view.examples_html(evaluation, examples, answers)
    assert page.index("blue dog") < page.index("red cat")  # the disagreement first
    assert "<ins>green</ins> dog" in page and "Q0 &lt;b&gt;?" in page  # marked, and escaped
    assert page.count('class="best"') == 1  # only where one row is better
    assert eval_view.highlight_differences("a <x> b", "a b") == "a <ins>&lt;x&gt;</ins> b"
    with pytest.raises(ValueError, match="sort: one of"):
        eval_view.ordered_examples(examples, answers, "random", "token_f1")


def test_the_curves_show_training_points_and_evaluations(world):
    service, store, run, evaluation = world
    figure = eval_view.curves_figure({run.id: "mora"}, service.metric_series([run.id], [curve_name("token_f1")]),
                                     service.run_scores([run.id], "token_f1"), "token_f1")
    lines = {trace.name: (list(trace.x), list(trace.y)) for trace in figure.data}
    assert lines == {"mora (during training)": ([5, 10], [0.2, 0.6]), "mora (evaluations)": ([20], [1.0])}


def test_a_tick_sends_everything_once_then_nothing_until_progress_moves(world):
    service, store, run, evaluation = world
    choice = eval_view.ViewChoice(evaluation.id, "most disagreement", "token_f1", (run.id,))
    first = eval_view.refresh(service, None, choice)
    assert first.scores["data"][1][0] == "mora" and "queued" in first.status and first.curves is not None
    quiet = eval_view.refresh(service, first.version, choice)
    assert quiet.scores is quiet.examples is quiet.curves is quiet.status is eval_view.UNCHANGED
    store.set_evaluation_status(evaluation.id, "running", examples_total=2)
    moved = eval_view.refresh(service, quiet.version, choice)
    assert moved.status.startswith("**running** · 2/2 prompts")
    resorted = eval_view.refresh(service, moved.version, eval_view.ViewChoice(evaluation.id, "file order",
                                                                              "token_f1", (run.id,)))
    assert resorted.examples is not eval_view.UNCHANGED


def test_launch_refuses_with_a_message(world):
    service, store, run, evaluation = world
    with pytest.raises(ValueError, match="prompts: a whole number"):
        eval_view.launch(service, [run.id], True, "file", None, "many", 8)
    with pytest.raises(ValueError, match="is queued and has no adapter or model to evaluate"):
        eval_view.launch(service, [run.id], True, "training rows", None, 5, 8)
