"""Token accuracy, exact match, BLEU and chrF against hand-computed values."""

import math

import pytest

from twinformer.config import EOS_ID, PAD_ID
from twinformer.errors import DataError
from twinformer.metrics import bleu, chrf, exact_match, token_accuracy


def test_token_accuracy_counts_eos():
    # Reference [5, 6] + EOS has 3 positions; [7] + EOS has 2.
    hypotheses = [[5, 9, EOS_ID], [7, EOS_ID, PAD_ID]]
    references = [[[5, 6]], [[7]]]
    assert token_accuracy(hypotheses, references) == 4 / 5


def test_token_accuracy_short_hypothesis():
    # Missing positions count as wrong: 1 of 4 reference positions.
    assert token_accuracy([[5]], [[[5, 6, 7]]]) == 1 / 4


def test_token_accuracy_best_reference():
    # Against [5, 6]: 3 of 3; against [8, 9, 10]: 0 of 4. The first is kept.
    assert token_accuracy([[5, 6, EOS_ID]], [[[8, 9, 10], [5, 6]]]) == 1.0


def test_exact_match_any_reference():
    hypotheses = ["a  b", "c", "d"]
    references = [["x", "a b"], ["C"], ["d "]]
    # Whitespace is normalised, case is not: 2 of 3.
    assert exact_match(hypotheses, references) == 2 / 3


def test_bleu_perfect_and_disjoint():
    references = [["the cat sat on the mat"], ["a dog ran in the park"]]
    assert bleu(["the cat sat on the mat", "a dog ran in the park"], references) == (
        pytest.approx(100.0)
    )
    assert bleu(["xx yy zz", "qq rr ss"], references) == pytest.approx(0.0)


def test_bleu_hand_computed():
    # 1 hypothesis of 4 tokens vs reference of 4 tokens, one wrong word at the
    # end: unigram 3/4, bigram 2/3, trigram 1/2, 4-gram 0/1. sacrebleu's
    # default "exp" smoothing turns the zero 4-gram count into 1 / (2 * 1).
    score = bleu(["w x y q"], [["w x y z"]])
    expected = 100 * math.exp(
        (math.log(3 / 4) + math.log(2 / 3) + math.log(1 / 2) + math.log(1 / 2)) / 4
    )
    # sacrebleu rounds nothing internally here; float64 sums differ by ~1e-13.
    assert score == pytest.approx(expected, rel=1e-9)


def test_bleu_uses_all_references():
    hypotheses = ["the cat sat", "a dog ran here"]
    single = bleu(hypotheses, [["the cat sat"], ["one dog ran here"]])
    multiple = bleu(
        hypotheses, [["the cat sat"], ["one dog ran here", "a dog ran here"]]
    )
    assert multiple == pytest.approx(100.0)
    assert single < multiple


def test_chrf_perfect_and_partial():
    assert chrf(["abcdef"], [["abcdef"]]) == pytest.approx(100.0)
    partial = chrf(["abcxyz"], [["abcdef"]])
    assert 0.0 < partial < 100.0


def test_metrics_length_mismatch():
    with pytest.raises(DataError, match="2 hypotheses but 1 references"):
        exact_match(["a", "b"], [["a"]])
    with pytest.raises(DataError, match="empty"):
        bleu([], [])
