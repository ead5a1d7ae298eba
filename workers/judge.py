"""An LLM judge over an evaluation's answers, through any OpenAI-compatible endpoint (`POST {url}/chat/completions`):
a hosted model, a local server, or the studio's own `/v1` API.

- **pointwise**: each answer alone, with the question, the reference and a rubric; the judge replies
  `{"score": 1-5, "reason": "..."}`. A row's `judge_score` is the mean of its answers' scores (1–5).
- **pairwise**: for each example, each pair of rows is judged twice, the two answers shown in one order and then in
  the other (`{"winner": "A" | "B" | "tie", "reason": "..."}`). A row wins the pair only if it wins in both orders;
  a split verdict is a tie, so a judge that prefers whatever comes first scores every pair a tie. A row's
  `judge_win_rate` is (wins + ties / 2) / pairs.

Every call's reason is kept (stored with the answer or the example). Calls are bounded (`MAX_CALLS`, the first
`max_examples` examples) and each has a timeout; a call that fails or replies in another shape is a verdict of None
with the reason why, and an endpoint that cannot be reached at all raises `JudgeError` at once. The key travels
with the job only; the store keeps the URL, model and mode. Importing this module loads no torch.
"""
from __future__ import annotations

import json
import re
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from itertools import combinations
from typing import Any, Optional, Sequence

MODES = ("pointwise", "pairwise", "both")
MAX_CALLS = 5000
MAX_JUDGE_EXAMPLES = 500
PARALLEL_CALLS = 4
DEFAULT_RUBRIC = ("5: correct and complete, as the reference; 4: correct with a small omission; 3: partly correct; "
                  "2: mostly wrong but related; 1: wrong or off-topic.")
POINTWISE_PROMPT = """You grade an assistant's answer against a reference answer.
Question:
{question}

Reference answer:
{reference}

Assistant's answer:
{answer}

Rubric: {rubric}
Reply with JSON only: {{"score": <1-5>, "reason": "<one sentence>"}}"""
PAIRWISE_PROMPT = """You compare two assistants' answers to a question, given a reference answer.
Question:
{question}

Reference answer:
{reference}

Answer A:
{first}

Answer B:
{second}

Which answer is better (closer to the reference, correct, complete)? Reply with JSON only:
{{"winner": "A" or "B" or "tie", "reason": "<one sentence>"}}"""
_JSON_OBJECT = re.compile(r"\{.*\}", re.DOTALL)


class JudgeError(ValueError):
    """Judge settings that cannot work, or an endpoint that cannot be reached; the message says which."""


@dataclass
class JudgeSettings:
    url: str
    """The endpoint's base URL, ending in /v1 (…/chat/completions is added)."""
    model: str
    api_key: str = ""
    mode: str = "pointwise"
    rubric: str = DEFAULT_RUBRIC
    max_examples: int = 50
    timeout_s: float = 60.0

    @classmethod
    def from_dict(cls, values: Any) -> "JudgeSettings":
        if not isinstance(values, dict):
            raise JudgeError(f"judge: expected an object with url, model, api_key, mode, got {values!r}")
        unknown = set(values) - set(cls.__dataclass_fields__)
        if unknown:
            raise JudgeError(f"judge: unknown setting {sorted(unknown)[0]!r}")
        settings = cls(**values)
        settings.validate()
        return settings

    def validate(self) -> None:
        if not isinstance(self.url, str) or not re.match(r"https?://[^\s/]+", self.url) or len(self.url) > 2000:
            raise JudgeError(f"judge url: an http(s) address such as http://127.0.0.1:7860/v1, got {self.url!r}")
        if not isinstance(self.model, str) or not self.model.strip() or len(self.model) > 200:
            raise JudgeError("judge model: the endpoint's model name (at most 200 characters)")
        if not isinstance(self.api_key, str) or len(self.api_key) > 500:
            raise JudgeError("judge api_key: text of at most 500 characters")
        if self.mode not in MODES:
            raise JudgeError(f"judge mode: one of {', '.join(MODES)}, got {self.mode!r}")
        if not isinstance(self.rubric, str) or len(self.rubric) > 4000:
            raise JudgeError("judge rubric: text of at most 4,000 characters")
        if isinstance(self.max_examples, bool) or not isinstance(self.max_examples, int) or not (
                1 <= self.max_examples <= MAX_JUDGE_EXAMPLES):
            raise JudgeError(f"judge max_examples: between 1 and {MAX_JUDGE_EXAMPLES}, got {self.max_examples!r}")
        if not isinstance(self.timeout_s, (int, float)) or not 1 <= self.timeout_s <= 600:
            raise JudgeError(f"judge timeout_s: between 1 and 600 seconds, got {self.timeout_s!r}")

    def calls(self, examples: int, rows: int) -> int:
        """How many calls judging `examples` answered by `rows` rows makes."""
        examples = min(examples, self.max_examples)
        pointwise = examples * rows if self.mode in ("pointwise", "both") else 0
        pairwise = examples * rows * (rows - 1) if self.mode in ("pairwise", "both") else 0
        return pointwise + pairwise


def ask(settings: JudgeSettings, prompt: str) -> str:
    """The judge's reply text to one user message (temperature 0); `JudgeError` when the endpoint cannot be
    reached or answers with an HTTP error."""
    body = json.dumps({"model": settings.model, "temperature": 0, "max_tokens": 256,
                       "messages": [{"role": "user", "content": prompt}]}).encode()
    headers = {"Content-Type": "application/json"}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    request = urllib.request.Request(settings.url.rstrip("/") + "/chat/completions", body, headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=settings.timeout_s) as response:  # noqa: S310 (the user's URL)
            reply = json.loads(response.read(1 << 20))
    except urllib.error.HTTPError as error:
        detail = error.read(500).decode("utf-8", "replace")
        raise JudgeError(f"the judge at {settings.url} answered HTTP {error.code}: {detail}") from None
    except (urllib.error.URLError, OSError, ValueError) as error:
        raise JudgeError(f"cannot reach the judge at {settings.url}: {error}") from None
    try:
        return str(reply["choices"][0]["message"]["content"])
    except (KeyError, IndexError, TypeError):
        raise JudgeError(f"the judge at {settings.url} replied without choices[0].message.content") from None


def parse_verdict(text: str) -> dict[str, Any]:
    """The JSON object in a reply (the first {...}, so a judge that adds words around it still counts)."""
    found = _JSON_OBJECT.search(text or "")
    if found is None:
        raise ValueError(f"no JSON object in the judge's reply {text[:200]!r}")
    verdict = json.loads(found.group(0))
    if not isinstance(verdict, dict):
        raise ValueError(f"the judge's reply is not a JSON object: {text[:200]!r}")
    return verdict


def _question(prompt: Sequence[dict[str, str]]) -> str:
    return "\n".join(f"{m['role']}: {m['content']}" for m in prompt) if len(prompt) > 1 else prompt[-1]["content"]


def _pointwise(settings: JudgeSettings, question: str, reference: str, answer: str) -> tuple[Optional[float], str]:
    try:
        verdict = parse_verdict(ask(settings, POINTWISE_PROMPT.format(question=question, reference=reference,
                                                                      answer=answer, rubric=settings.rubric)))
        score = float(verdict["score"])
        if not 1 <= score <= 5:
            raise ValueError(f"score {score:g} is outside 1-5")
        return score, str(verdict.get("reason", ""))
    except JudgeError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        return None, f"unreadable verdict: {error}"


def _one_order(settings: JudgeSettings, question: str, reference: str, first: str, second: str
               ) -> tuple[Optional[str], str]:
    try:
        verdict = parse_verdict(ask(settings, PAIRWISE_PROMPT.format(question=question, reference=reference,
                                                                     first=first, second=second)))
        winner = str(verdict.get("winner", "")).strip().upper()
        if winner not in ("A", "B", "TIE"):
            raise ValueError(f"winner {verdict.get('winner')!r} is not A, B or tie")
        return winner, str(verdict.get("reason", ""))
    except JudgeError:
        raise
    except (ValueError, KeyError, TypeError) as error:
        return None, f"unreadable verdict: {error}"


def combine_orders(a: int, b: int, first: Optional[str], second: Optional[str]) -> Optional[int]:
    """The winner of a pair judged as (A=a, B=b) then (A=b, B=a): a row that wins both orders, else None (a tie,
    a split verdict or an unreadable one)."""
    a_wins = first == "A" and second == "B"
    b_wins = first == "B" and second == "A"
    return a if a_wins else b if b_wins else None


def judge_evaluation(settings: JudgeSettings, result, labels: Sequence[str]) -> dict[str, Any]:
    """Judge an `EvalResult` (`workers.evaluation`): {"answers": [{example, row, score, reason}], "examples":
    [{example, judgements}], "scores": {row: {"judge_score"?, "judge_win_rate"?}}}."""
    settings.validate()
    rows = len(labels)
    calls = settings.calls(len(result.examples), rows)
    if calls > MAX_CALLS:
        raise JudgeError(f"judging {min(len(result.examples), settings.max_examples)} examples × {rows} rows would "
                         f"make {calls:,} calls; at most {MAX_CALLS:,}: lower the judge's max examples")
    examples = result.examples[:settings.max_examples]
    answers = {(a.example, a.row): a.answer for a in result.answers}
    out: dict[str, Any] = {"answers": [], "examples": [], "scores": {row: {} for row in range(rows)}}
    with ThreadPoolExecutor(PARALLEL_CALLS) as pool:
        if settings.mode in ("pointwise", "both"):
            jobs = [(e, row, pool.submit(_pointwise, settings, _question(e.prompt), e.reference,
                                         answers.get((e.example, row), ""))) for e in examples for row in range(rows)]
            per_row: dict[int, list[float]] = {row: [] for row in range(rows)}
            for example, row, job in jobs:
                score, reason = job.result()
                out["answers"].append({"example": example.example, "row": row, "score": score, "reason": reason})
                if score is not None:
                    per_row[row].append(score)
            for row, scores in per_row.items():
                out["scores"][row]["judge_score"] = sum(scores) / len(scores) if scores else None
        if settings.mode in ("pairwise", "both"):
            points = {row: [0.0, 0] for row in range(rows)}
            for example in examples:
                question = _question(example.prompt)
                judged = []
                for a, b in combinations(range(rows), 2):
                    first, second = answers.get((example.example, a), ""), answers.get((example.example, b), "")
                    ab = pool.submit(_one_order, settings, question, example.reference, first, second)
                    ba = pool.submit(_one_order, settings, question, example.reference, second, first)
                    judged.append((a, b, ab, ba))
                judgements = []
                for a, b, ab, ba in judged:
                    (v1, r1), (v2, r2) = ab.result(), ba.result()
                    winner = combine_orders(a, b, v1, v2)
                    judgements.append({"a": a, "b": b, "winner": winner, "verdicts": [v1, v2], "reasons": [r1, r2]})
                    for row in (a, b):
                        points[row][0] += 1.0 if winner == row else 0.5 if winner is None else 0.0
                        points[row][1] += 1
                out["examples"].append({"example": example.example, "judgements": judgements})
            for row, (won, played) in points.items():
                out["scores"][row]["judge_win_rate"] = won / played if played else None
    return out


__all__ = ["JudgeSettings", "JudgeError", "judge_evaluation", "combine_orders", "parse_verdict", "MODES"]
