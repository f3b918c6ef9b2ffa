"""Metrics on hand-computed cases; bootstrap intervals; refusals."""

from __future__ import annotations

import math

import pytest

from logit2prompt.errors import Logit2PromptError
from logit2prompt.evaluation.metrics import (
    bootstrap_ci,
    exact_match,
    score,
    sentence_bleu,
    token_f1,
)


def test_token_f1_is_set_based():
    assert token_f1("the cat sat", "the cat ran") == pytest.approx(2 / 3)
    # Sets, not bags: the repeated "a" counts once (precision 1/2, recall 1).
    assert token_f1("a a b", "a") == pytest.approx(2 * 0.5 * 1 / 1.5)
    assert token_f1("Hello, world!", "hello world") == pytest.approx(2 * (1 / 4) * (1 / 2) / 0.75)
    assert token_f1("x", "y") == 0.0
    assert token_f1("", "") == 1.0


def test_exact_match_normalises_whitespace_only():
    assert exact_match("  What is\n2+2? ", "What is 2+2?") == 1.0
    assert exact_match("what is 2+2?", "What is 2+2?") == 0.0


def test_sentence_bleu_hand_computed():
    ref = "the cat sat on the mat"
    assert sentence_bleu(ref, ref) == pytest.approx(100.0)
    # Precisions 5/6, 3/5, 2/4, 1/3, same length so no brevity penalty.
    expected = 100 * math.exp(sum(math.log(p) for p in (5 / 6, 3 / 5, 2 / 4, 1 / 3)) / 4)
    assert sentence_bleu("the cat sat on a mat", ref) == pytest.approx(expected, abs=1e-6)
    # No 4-gram match: sacrebleu's exp smoothing keeps the score positive but small.
    smoothed = sentence_bleu("the cat sat under a mat", ref)
    assert 0 < smoothed < expected


def test_bootstrap_contains_mean_and_narrows():
    small = [0.0, 1.0] * 10
    big = [0.0, 1.0] * 500
    lo_s, hi_s = bootstrap_ci(small)
    lo_b, hi_b = bootstrap_ci(big)
    assert lo_s <= 0.5 <= hi_s and lo_b <= 0.5 <= hi_b
    assert (hi_b - lo_b) < (hi_s - lo_s) / 3


def test_score_table_and_refusals():
    out = score(["a b c", "x"], ["a b c", "y"])
    assert out["exact"]["mean"] == pytest.approx(50.0)
    assert out["token_f1"]["mean"] == pytest.approx(50.0)
    lo, hi = out["exact"]["ci95"]
    assert lo <= 50.0 <= hi
    with pytest.raises(Logit2PromptError, match="2 predictions but 1 references"):
        score(["a", "b"], ["a"])
    with pytest.raises(Logit2PromptError, match="empty"):
        score([], [])


def test_format_gain_one_line_per_metric():
    from logit2prompt.evaluation.metrics import format_gain

    gain = {"bleu": {"mean": 1.234, "ci95": [0.5, 2.0]}, "exact": {"mean": -0.1, "ci95": [-1, 0.8]}}
    assert format_gain(gain) == "bleu +1.23 [+0.50, +2.00], exact -0.10 [-1.00, +0.80]"
