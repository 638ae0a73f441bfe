"""Ranking metrics for one relevant item per user (LlamaRec's definitions) and paired comparisons."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "DEFAULT_KS",
    "METRIC_NAMES",
    "PairedDifference",
    "metrics_at",
    "paired_bootstrap",
    "rank_of_truth",
    "summarize",
]

DEFAULT_KS = (1, 5, 10)
# Grouped by metric, then by K: the order tables and reports show them in.
METRIC_NAMES = tuple(f"{metric}@{k}" for metric in ("Recall", "NDCG", "MRR") for k in DEFAULT_KS)
_METRIC_PATTERN = re.compile(r"^(Recall|NDCG|MRR)@\d+$")
# Resamples per vectorised block: bounds memory to about 32 MB of indices for any user count.
_BLOCK_CELLS = 4_000_000


def rank_of_truth(scores: Sequence[float], truth_index: int | None) -> int | None:
    """1-based rank of the truth; ties count against it so a constant scorer never looks good."""
    if truth_index is None:
        return None
    values = np.asarray(scores, dtype=np.float64)
    if values.ndim != 1 or not 0 <= truth_index < len(values):
        raise IndexError(f"truth index {truth_index} is outside the {values.size} candidate scores")
    if np.isnan(values).any():
        raise ValueError("candidate scores contain NaN: check the model output before ranking")
    truth = values[truth_index]
    # Every other candidate scoring at least as high as the truth ranks before it.
    return int(np.count_nonzero(values >= truth))


def metrics_at(rank: int | None, ks: Sequence[int] = DEFAULT_KS) -> dict[str, float]:
    """Recall, NDCG and MRR at each K for one user; all zero when the truth is not ranked (None)."""
    if rank is not None and rank < 1:
        raise ValueError(f"rank must be 1-based (1 or more), got {rank}")
    if rank is None:
        gains = {"Recall": 0.0, "NDCG": 0.0, "MRR": 0.0}
    else:
        gains = {"Recall": 1.0, "NDCG": 1.0 / math.log2(rank + 1), "MRR": 1.0 / rank}
    return {f"{name}@{k}": gain if rank is not None and rank <= k else 0.0
            for name, gain in gains.items() for k in ks}


def summarize(per_user: pd.DataFrame | Sequence[Mapping[str, object]]) -> dict[str, float]:
    """Mean of every metric column over users, plus "count", so reports read one dict."""
    frame = per_user if isinstance(per_user, pd.DataFrame) else pd.DataFrame(list(per_user))
    columns = [column for column in frame.columns if _METRIC_PATTERN.match(str(column))]
    summary: dict[str, float] = {"count": len(frame)}
    for column in columns:
        summary[column] = float(frame[column].astype(float).mean()) if len(frame) else math.nan
    return summary


@dataclass(frozen=True)
class PairedDifference:
    """System B minus system A over the same users, with a bootstrap confidence interval."""

    mean_a: float
    mean_b: float
    difference: float
    low: float
    high: float
    confidence: float
    n: int
    improved: int
    unchanged: int
    worsened: int


def paired_bootstrap(a: Sequence[float], b: Sequence[float], *, samples: int = 2000, seed: int = 0,
                     confidence: float = 0.95) -> PairedDifference:
    """Resample users (keeping each user's pair together) to say whether B's gain over A is noise."""
    first, second = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if first.ndim != 1 or second.ndim != 1 or len(first) != len(second):
        raise ValueError(f"paired scores need one value per user in both systems, got {first.shape} "
                         f"and {second.shape}: evaluate both on the same users")
    if len(first) == 0:
        raise ValueError("no users to compare: evaluate at least one user with both systems")
    if not (np.isfinite(first).all() and np.isfinite(second).all()):
        raise ValueError("paired scores contain NaN or infinity: fix the per-user metrics first")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be between 0 and 1 (e.g. 0.95), got {confidence}")
    if samples < 1:
        raise ValueError(f"samples must be at least 1, got {samples}")
    differences = second - first
    n = len(differences)
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    block = max(1, _BLOCK_CELLS // n)
    for start in range(0, samples, block):
        stop = min(samples, start + block)
        means[start:stop] = differences[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    tail = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [tail, 1.0 - tail])
    return PairedDifference(
        mean_a=float(first.mean()), mean_b=float(second.mean()), difference=float(differences.mean()),
        low=float(low), high=float(high), confidence=confidence, n=n,
        improved=int(np.count_nonzero(differences > 0)), unchanged=int(np.count_nonzero(differences == 0)),
        worsened=int(np.count_nonzero(differences < 0)))
