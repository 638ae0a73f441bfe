"""Ranking metrics for one relevant item per user (LlamaRec's definitions) and paired comparisons."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

__all__ = [
    "ALL_USERS",
    "AMONG_CANDIDATES",
    "DEFAULT_KS",
    "METRIC_NAMES",
    "POPULATIONS",
    "CandidateRecall",
    "PairedDifference",
    "candidate_recall",
    "excludes_zero",
    "metrics_at",
    "paired_bootstrap",
    "rank_of_truth",
    "summarize",
]

DEFAULT_KS = (1, 5, 10)
# Grouped by metric, then by K: the order tables and reports show them in.
METRIC_NAMES = tuple(f"{metric}@{k}" for metric in ("Recall", "NDCG", "MRR") for k in DEFAULT_KS)
_METRIC_PATTERN = re.compile(r"^(Recall|NDCG|MRR)@\d+$")
# The two populations a mean is taken over, so no one mixes them (LlamaRec, trainer/llm.py): "all users" counts a
# target the candidates miss as a miss (LlamaRec's "overall" at K <= 20, where the retriever's own rank of such a
# target is past 20); "target among candidates" keeps only the users whose target is among them (its "subset").
ALL_USERS, AMONG_CANDIDATES = "all users", "target among candidates"
POPULATIONS = (ALL_USERS, AMONG_CANDIDATES)
# Resamples per vectorised block: bounds memory to about 32 MB of indices for any user count.
_BLOCK_CELLS = 4_000_000
# Per-user differences that cancel (0.63 - 0.5 - 0.13) leave a mean of ~1e-17, not 0: a bound this close is 0.
_ZERO_BOUND = 1e-12


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
class CandidateRecall:
    """How many evaluated users have their target among the candidates: the ceiling of every reranker's metrics,
    which an evaluation on retriever candidates must show beside them or the reranker takes the retriever's blame."""

    found: int
    users: int
    source: str = ""
    count: int = 0

    @property
    def share(self) -> float:
        """found / users (NaN for no users)."""
        return self.found / self.users if self.users else math.nan

    @property
    def complete(self) -> bool:
        """Every user's target is among the candidates: the two populations are the same users."""
        return self.found == self.users

    def describe(self) -> str:
        """One line for tables and notes: the share, both counts, and what it means for the two populations."""
        where = f"the {self.count} {self.source} candidates" if self.source else "the candidates"
        if self.complete:
            return (f"Candidate recall 1.000: the target is among {where} for all {self.users} users, so "
                    f"'{ALL_USERS}' and '{AMONG_CANDIDATES}' are the same users (one population shown)")
        return (f"Candidate recall {self.share:.3f}: the target is among {where} for {self.found} of "
                f"{self.users} users; '{ALL_USERS}' counts the other {self.users - self.found} as misses, "
                f"'{AMONG_CANDIDATES}' is over the {self.found} (LlamaRec's subset)")

    def to_json(self) -> dict[str, object]:
        """Plain values for summary.json and bench tables."""
        return {"source": self.source, "candidates": self.count, "users": self.users,
                "target_among_candidates": self.found, "recall": None if not self.users else self.share,
                "populations_coincide": self.complete}


def candidate_recall(per_user: pd.DataFrame, source: str = "", count: int = 0) -> CandidateRecall:
    """The recall over the users of a per-user frame (column target_in_candidates; one row per user and run, the
    runs of one comparison sharing their candidates): a user counts once, found only if found in every run."""
    if "target_in_candidates" not in per_user.columns:
        raise ValueError("the per-user frame has no target_in_candidates column: build it with Inspector.evaluate "
                         "or baselines.evaluate_baseline")
    found = per_user.groupby("user_id", sort=False)["target_in_candidates"].all()
    return CandidateRecall(found=int(found.sum()), users=len(found), source=source, count=count)


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


def excludes_zero(low: float, high: float) -> bool:
    """Whether a confidence interval lies wholly above or wholly below zero (NaN bounds, no interval: no)."""
    return low > _ZERO_BOUND or high < -_ZERO_BOUND


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
