"""What every diagnostic shares: the progress callback and scores stacked into arrays."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from rerank_core.metrics import METRIC_NAMES, metrics_at, summarize

__all__ = ["ProgressCallback", "letter_probs", "mean_metrics"]

ProgressCallback = Callable[[int, int], None]


def letter_probs(scores: Sequence[Any]) -> np.ndarray:
    """One row of letter probabilities per scored prompt."""
    return np.array([score.letter_probs for score in scores], dtype=np.float64)


def mean_metrics(ranks: Sequence[int | None]) -> dict[str, float]:
    """Every metric averaged over the given ranks of the ground truth."""
    summary = summarize([metrics_at(rank) for rank in ranks])
    return {name: summary[name] for name in METRIC_NAMES}
