"""The real-text statistics of benchmarks/realtext.py: the block bootstrap keeps each text apart (a
block never straddles two texts, every text keeps its weight) and the paired comparison's interval and
p-value behave as a paired test must, checked on constructed cases whose answer is known exactly."""

import os
import random
import sys

import pytest

torch = pytest.importorskip("torch")
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
import realtext  # noqa: E402


def test_bootstrap_never_mixes_texts():
    # text 1 differs by +1 everywhere, text 2 by -1: stratified by text, every resample has mean exactly 0;
    # a bootstrap pooling both texts would draw unequal numbers of their blocks and spread around 0
    rows = [[1.0] * 320, [-1.0] * 320]
    lo, hi = realtext.bootstrap_mean_interval(rows, block=32, rounds=500)
    assert lo == 0.0 and hi == 0.0


def test_bootstrap_interval_covers_mean_of_noisy_texts():
    rng = random.Random(1)
    rows = [[rng.gauss(0.5, 1.0) for _ in range(640)] for _ in range(3)]
    lo, hi = realtext.bootstrap_mean_interval(rows, rounds=1000)
    mean = sum(map(sum, rows)) / sum(map(len, rows))
    assert lo < mean < hi and hi - lo < 0.3


def test_paired_difference_identical_policies():
    rng = random.Random(2)
    nll = [[rng.uniform(0, 5) for _ in range(400)] for _ in range(2)]
    d = realtext.paired_difference(nll, nll, first_step=100, rounds=400)
    assert d["mean_diff"] == 0.0 and d["ci95"] == [0.0, 0.0] and d["p_bootstrap"] == 1.0
    assert d["tokens"] == 600 and d["texts"] == 2


def test_paired_difference_is_paired_and_floored():
    # a per-token NLL that varies a lot between tokens, and policy B exactly 0.05 worse on every token:
    # an unpaired comparison would drown 0.05 in the token-to-token spread, the paired one sees it exactly
    rng = random.Random(3)
    a = [[rng.uniform(0, 10) for _ in range(300)] for _ in range(2)]
    b = [[x + 0.05 for x in r] for r in a]
    d = realtext.paired_difference(a, b, first_step=44, rounds=999)
    assert d["mean_diff"] == pytest.approx(-0.05)
    assert d["ci95"][0] == pytest.approx(-0.05) and d["ci95"][1] == pytest.approx(-0.05)
    # no resample reaches 0: the p-value is the test's resolution, 2 / (rounds + 1), never 0
    assert d["p_bootstrap"] == pytest.approx(2 / 1000)
    assert d["tokens"] == 2 * 256
