"""Hand-worked metric values, pessimistic ties and the paired bootstrap."""

from __future__ import annotations

import math
import time

import numpy as np
import pandas as pd
import pytest

from rerank_core.metrics import (
    METRIC_NAMES,
    PairedDifference,
    excludes_zero,
    metrics_at,
    paired_bootstrap,
    rank_of_truth,
    summarize,
)


def test_rank_of_truth_plain_and_pessimistic_ties() -> None:
    assert rank_of_truth([0.1, 0.7, 0.2], 1) == 1
    assert rank_of_truth([0.1, 0.7, 0.2], 0) == 3
    assert rank_of_truth([0.5, 0.5, 0.2], 0) == 2
    assert rank_of_truth([0.5, 0.5, 0.2], 1) == 2
    assert rank_of_truth([0.3, 0.3, 0.3, 0.3], 2) == 4
    assert rank_of_truth([0.5, 0.5], None) is None


def test_rank_of_truth_rejects_bad_input() -> None:
    with pytest.raises(IndexError, match="outside"):
        rank_of_truth([0.1, 0.2], 2)
    with pytest.raises(ValueError, match="NaN"):
        rank_of_truth([0.1, float("nan")], 0)


def test_metrics_at_rank_three() -> None:
    values = metrics_at(3)
    assert list(values) == list(METRIC_NAMES)
    assert values["Recall@1"] == 0.0 and values["Recall@5"] == 1.0 and values["Recall@10"] == 1.0
    assert values["NDCG@1"] == 0.0 and values["NDCG@5"] == pytest.approx(0.5)
    assert values["MRR@5"] == pytest.approx(1 / 3) and values["MRR@10"] == pytest.approx(1 / 3)


def test_metrics_at_edges() -> None:
    assert metrics_at(1) == dict.fromkeys(METRIC_NAMES, 1.0)
    assert metrics_at(None) == dict.fromkeys(METRIC_NAMES, 0.0)
    assert metrics_at(11) == dict.fromkeys(METRIC_NAMES, 0.0)
    assert metrics_at(10)["NDCG@10"] == pytest.approx(1 / math.log2(11))
    assert metrics_at(2, ks=(3,)) == {"Recall@3": 1.0, "NDCG@3": pytest.approx(1 / math.log2(3)),
                                      "MRR@3": 0.5}
    with pytest.raises(ValueError, match="1-based"):
        metrics_at(0)


def test_summarize_list_and_frame() -> None:
    rows = [{"user": "u1", **metrics_at(1)}, {"user": "u2", **metrics_at(None)}]
    summary = summarize(rows)
    assert summary["count"] == 2
    assert summary["Recall@1"] == 0.5 and summary["MRR@10"] == 0.5
    assert "user" not in summary
    assert summarize(pd.DataFrame(rows)) == summary
    empty = summarize(pd.DataFrame(columns=["user", "NDCG@10"]))
    assert empty["count"] == 0 and math.isnan(empty["NDCG@10"])


def test_bootstrap_contains_true_difference() -> None:
    rng = np.random.default_rng(1)
    a = rng.random(500)
    b = a + 0.05 + rng.normal(0, 0.1, 500)
    result = paired_bootstrap(a, b, seed=3)
    assert isinstance(result, PairedDifference)
    assert result.n == 500 and result.confidence == 0.95
    assert result.difference == pytest.approx(float(np.mean(b - a)))
    assert result.low < result.difference < result.high
    assert result.low < 0.05 < result.high
    assert result.improved + result.unchanged + result.worsened == 500
    assert paired_bootstrap(a, b, seed=3) == result


def test_bootstrap_clearly_better_and_no_change() -> None:
    a = [0.0] * 80 + [1.0] * 20
    b = [1.0] * 60 + [0.0] * 20 + [1.0] * 20
    better = paired_bootstrap(a, b)
    assert better.low > 0
    assert (better.improved, better.unchanged, better.worsened) == (60, 40, 0)
    assert (better.mean_a, better.mean_b) == (0.2, 0.8)
    same = paired_bootstrap(a, a)
    assert same.low == same.high == same.difference == 0.0


def test_bootstrap_errors() -> None:
    with pytest.raises(ValueError, match="same users"):
        paired_bootstrap([1.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="no users"):
        paired_bootstrap([], [])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0], [0.0], confidence=95)


def test_bootstrap_is_fast() -> None:
    rng = np.random.default_rng(0)
    a, b = rng.random(1000), rng.random(1000)
    start = time.perf_counter()
    paired_bootstrap(a, b, samples=2000)
    assert time.perf_counter() - start < 1.0


def test_an_interval_excludes_zero_past_the_rounding_of_cancelling_differences() -> None:
    noise = (0.1 + 0.2 - 0.3) / 3  # 1.85e-17: a mean of per-user differences that cancel
    assert noise > 0
    assert not excludes_zero(noise, 0.05) and not excludes_zero(-0.05, -noise)
    assert excludes_zero(0.001, 0.05) and excludes_zero(-0.05, -0.001)
    assert not excludes_zero(-0.01, 0.02)
    assert not excludes_zero(math.nan, math.nan)  # a population without users has no interval
