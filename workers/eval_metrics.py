"""The scores of one generated answer against its reference: small pure functions, each in [0, 1] (higher is better).

- `exact_match`: the answers are equal once normalised (`normalize_answer`: case, punctuation, the articles a/an/the
  and runs of whitespace ignored, as SQuAD's official script does).
- `char_accuracy`: the paper's character accuracy (MORA_SPEC.md §6), `workers.memorize.char_accuracy`, the function
  `bench memorize` scores UUIDs with: matching characters position by position over the reference's length, on the
  answer and reference as they are (stripped of surrounding whitespace).
- `token_f1`: the harmonic mean of precision and recall of the normalised tokens shared by answer and reference
  (each token counted as often as it appears in both), SQuAD's F1.
- `rouge_l`: ROUGE-L F-measure (longest common subsequence of tokens) from Google's `rouge-score` package, fed the
  same normalised tokens as `token_f1` (its own tokenizer keeps only ASCII letters and digits, so it would score any
  other script as empty).

The answer's loss and perplexity under teacher forcing need the model: `workers.evaluation.answer_losses`. Importing
this module loads no torch.
"""
from __future__ import annotations

import re
import string
import unicodedata
from collections import Counter
from typing import Callable

from workers.memorize import char_accuracy as _paper_char_accuracy

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, punctuation removed (ASCII and Unicode), the articles a/an/the removed, whitespace collapsed."""
    text = text.lower()
    text = "".join(" " if ch in _PUNCTUATION or unicodedata.category(ch).startswith("P") else ch for ch in text)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def answer_tokens(text: str) -> list[str]:
    return normalize_answer(text).split()


def exact_match(answer: str, reference: str) -> float:
    """1.0 when the normalised answer equals the normalised reference, else 0.0."""
    return float(normalize_answer(answer) == normalize_answer(reference))


def char_accuracy(answer: str, reference: str) -> float:
    """The paper's character accuracy of the stripped answer against the stripped reference (an empty reference
    is refused: it has no characters to score)."""
    return _paper_char_accuracy(answer.strip(), reference.strip())


def token_f1(answer: str, reference: str) -> float:
    """Token F1 of the normalised texts; two empty texts agree (1.0), one empty text scores 0.0."""
    predicted, expected = answer_tokens(answer), answer_tokens(reference)
    if not predicted or not expected:
        return float(predicted == expected)
    shared = sum((Counter(predicted) & Counter(expected)).values())
    if shared == 0:
        return 0.0
    precision, recall = shared / len(predicted), shared / len(expected)
    return 2 * precision * recall / (precision + recall)


class _NormalisedTokens:
    """The tokenizer `rouge_score` is given: the same tokens as `token_f1`."""

    def tokenize(self, text: str) -> list[str]:
        return answer_tokens(text)


_rouge = None


def rouge_l(answer: str, reference: str) -> float:
    """ROUGE-L F-measure from `rouge_score` on the normalised tokens; two empty texts agree (1.0)."""
    global _rouge
    if not answer_tokens(answer) and not answer_tokens(reference):
        return 1.0
    if _rouge is None:
        from rouge_score import rouge_scorer

        _rouge = rouge_scorer.RougeScorer(["rougeL"], tokenizer=_NormalisedTokens())
    return float(_rouge.score(reference, answer)["rougeL"].fmeasure)


TEXT_METRICS: dict[str, Callable[[str, str], float]] = {
    "exact_match": exact_match,
    "char_accuracy": char_accuracy,
    "token_f1": token_f1,
    "rouge_l": rouge_l,
}
"""The metrics computed from the answer text alone, by name (the names the store and the UI use)."""
MODEL_METRICS = ("answer_loss", "perplexity")
"""The metrics computed by the model: the reference's mean loss per token under teacher forcing, and exp of it."""
METRICS = (*TEXT_METRICS, *MODEL_METRICS)
LOWER_IS_BETTER = frozenset(MODEL_METRICS)


def curve_name(metric: str) -> str:
    """The metric point a generation eval during training stores (`eval_generate_steps`): "gen_exact_match", ...,
    beside the loss curves (the memorisation probe's own exact_match and char_accuracy keep their names)."""
    return f"gen_{metric}"


def score_answer(answer: str, reference: str) -> dict[str, float]:
    """Every text metric of one answer."""
    return {name: metric(answer, reference) for name, metric in TEXT_METRICS.items()}
