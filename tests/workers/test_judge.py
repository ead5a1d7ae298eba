"""The LLM judge against a real HTTP server speaking OpenAI's chat completions (tests/workers/fake_judge.py):
pointwise scores and reasons, pairwise with both orders asked and a position-biased judge cancelled to ties, the
bounds, and an endpoint that is not there."""
import pytest

from tests.workers.fake_judge import FakeJudge, pointwise_score
from workers.evaluation import Answer, EvalExample, EvalResult
from workers.judge import JudgeError, JudgeSettings, combine_orders, judge_evaluation, parse_verdict

EXAMPLES = [EvalExample(i, i + 1, [{"role": "user", "content": f"Question {i}?"}], f"Reference {i}.")
            for i in range(3)]
ANSWERS = ["short", "a much longer answer", "mid length"]  # row 1 is always the longest


def _result():
    return EvalResult(EXAMPLES, [Answer(e.example, row, text * (e.example + 1), {}) for e in EXAMPLES
                                 for row, text in enumerate(ANSWERS)])


def test_pointwise_scores_each_answer_and_keeps_the_reason():
    with FakeJudge() as judge:
        out = judge_evaluation(JudgeSettings(judge.url, "judge-model", api_key="sk-test", mode="pointwise"), _result(),
                               ["a", "b", "c"])
    assert len(judge.requests) == 9 and set(judge.keys) == {"Bearer sk-test"}
    assert judge.requests[0]["model"] == "judge-model" and judge.requests[0]["temperature"] == 0
    by_key = {(v["example"], v["row"]): v for v in out["answers"]}
    for (example, row), verdict in by_key.items():
        answer = ANSWERS[row] * (example + 1)
        assert verdict["score"] == pointwise_score(answer) and verdict["reason"] == f"length {len(answer)}"
    expected = sum(pointwise_score(ANSWERS[1] * (e + 1)) for e in range(3)) / 3
    assert out["scores"][1]["judge_score"] == pytest.approx(expected)


def test_pairwise_asks_both_orders_so_a_position_biased_judge_only_ties():
    with FakeJudge(prefer="first") as judge:
        out = judge_evaluation(JudgeSettings(judge.url, "m", mode="pairwise"), _result(), ["a", "b", "c"])
    assert len(judge.requests) == 3 * 3 * 2  # 3 examples × 3 pairs × 2 orders
    judgements = out["examples"][0]["judgements"]
    assert [(j["a"], j["b"]) for j in judgements] == [(0, 1), (0, 2), (1, 2)]
    assert all(j["winner"] is None and j["verdicts"] == ["A", "A"] for e in out["examples"] for j in e["judgements"])
    assert all(out["scores"][row]["judge_win_rate"] == 0.5 for row in range(3))


def test_pairwise_with_a_consistent_judge_ranks_the_rows():
    with FakeJudge(prefer="longer") as judge:
        out = judge_evaluation(JudgeSettings(judge.url, "m", mode="both"), _result(), ["a", "b", "c"])
    rates = {row: out["scores"][row]["judge_win_rate"] for row in range(3)}
    assert rates == {0: 0.0, 1: 1.0, 2: 0.5}  # longest wins both its pairs, shortest loses both
    first = out["examples"][0]["judgements"][0]
    assert first["winner"] == 1 and first["reasons"] == ["A has 5, B has 20", "A has 20, B has 5"]
    assert "judge_score" in out["scores"][0]


def test_combining_the_two_orders():
    assert combine_orders(0, 1, "A", "B") == 0
    assert combine_orders(0, 1, "B", "A") == 1
    assert combine_orders(0, 1, "A", "A") is None and combine_orders(0, 1, "TIE", "B") is None
    assert combine_orders(0, 1, None, "B") is None
    assert parse_verdict('Sure. {"score": 3} done') == {"score": 3}
    with pytest.raises(ValueError, match="no JSON object"):
        parse_verdict("I think A")


def test_bad_settings_and_an_absent_endpoint_say_what_is_wrong():
    with pytest.raises(JudgeError, match="judge url: an http"):
        JudgeSettings.from_dict({"url": "ftp://x", "model": "m"})
    with pytest.raises(JudgeError, match="judge mode: one of pointwise, pairwise, both"):
        JudgeSettings.from_dict({"url": "http://127.0.0.1:1/v1", "model": "m", "mode": "best"})
    with pytest.raises(JudgeError, match="unknown setting 'temperature'"):
        JudgeSettings.from_dict({"url": "http://127.0.0.1:1/v1", "model": "m", "temperature": 1})
    with pytest.raises(JudgeError, match="cannot reach the judge at http://127.0.0.1:1/v1"):
        judge_evaluation(JudgeSettings("http://127.0.0.1:1/v1", "m", timeout_s=2), _result(), ["a", "b", "c"])
    many = JudgeSettings("http://127.0.0.1:1/v1", "m", mode="both", max_examples=500)
    assert many.calls(500, 8) == 500 * 8 + 500 * 8 * 7
    big = EvalResult([EvalExample(i, i, [{"role": "user", "content": "q"}], "r") for i in range(500)], [])
    with pytest.raises(JudgeError, match="would make 32,000 calls; at most 5,000"):
        judge_evaluation(many, big, [str(i) for i in range(8)])
