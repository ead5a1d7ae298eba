"""The answer metrics on examples worked out by hand."""
import math

import pytest

from workers import eval_metrics as m
from workers.memorize import char_accuracy as paper_char_accuracy


def test_normalisation_ignores_case_punctuation_articles_and_spacing():
    assert m.normalize_answer("  The  Part-Number is: A7!  ") == "part number is a7"
    assert m.normalize_answer("«Zürich», an ÉTÉ") == "zürich été"
    assert m.exact_match("The answer: 42.", "answer 42") == 1.0
    assert m.exact_match("42", "43") == 0.0


def test_char_accuracy_is_the_papers_function_on_stripped_texts():
    # 3 of the reference's 4 positions match; the extra character of the answer is cut
    assert m.char_accuracy(" abxd9 ", "abcd") == paper_char_accuracy("abxd9", "abcd") == 0.75
    assert m.char_accuracy("ab", "abcd") == 0.5  # missing positions are wrong
    with pytest.raises(ValueError):
        m.char_accuracy("x", "  ")


def test_token_f1_counts_shared_tokens_with_their_multiplicity():
    # answer: cat sat on mat (4 tokens once "the" goes); reference: cat sat sat (3); shared: cat, sat → 2
    # precision 2/4, recall 2/3, F1 = 2·(1/2)(2/3)/(1/2 + 2/3) = 4/7
    assert m.token_f1("The cat sat on the mat", "cat sat sat") == pytest.approx(4 / 7)
    assert m.token_f1("", "") == 1.0 and m.token_f1("x", "") == 0.0 and m.token_f1("a b", "c") == 0.0


def test_rouge_l_is_the_longest_common_subsequence_f_measure():
    # answer tokens: police killed gunman; reference: police kill gunman → LCS "police gunman" = 2
    # precision 2/3, recall 2/3 → F 2/3
    assert m.rouge_l("The police killed the gunman", "police kill the gunman") == pytest.approx(2 / 3)
    # a b c d vs a c e: LCS a c = 2, P 2/4, R 2/3 → F = 4/7; non-ASCII words count (rouge-score's own tokenizer
    # would drop them)
    assert m.rouge_l("α b γ d", "α γ e") == pytest.approx(4 / 7)
    assert m.rouge_l("", "") == 1.0 and m.rouge_l("x", "") == 0.0


def test_score_answer_has_every_text_metric():
    scores = m.score_answer("Paris", "paris.")
    # char accuracy is case- and punctuation-sensitive: a, r, i, s of "paris." match, P and the dot do not → 4/6
    assert scores == {"exact_match": 1.0, "char_accuracy": 4 / 6, "token_f1": 1.0, "rouge_l": 1.0}
    assert set(m.METRICS) == {*scores, "answer_loss", "perplexity"} and not math.isnan(scores["rouge_l"])
