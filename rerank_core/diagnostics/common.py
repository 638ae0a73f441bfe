"""What every diagnostic shares: progress and stop checks, chunked scoring, scores stacked into arrays."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from rerank_core.inspector import Inspector, PreparedUser, ResolvedSystem
from rerank_core.metrics import METRIC_NAMES, metrics_at, summarize
from rerank_core.progress import CancelCheck, ProgressCallback, checkpoint

__all__ = ["CancelCheck", "ProgressCallback", "letter_probs", "mean_metrics", "score_in_chunks"]

# Prompts scored per forward pass in diagnostics: a rotation set of 20 candidates is one chunk.
CHUNK = 20


def score_in_chunks(inspector: Inspector, system: ResolvedSystem, variants: Sequence[PreparedUser], what: str, *,
                    batch_size: int | None = None, cancel: CancelCheck = None,
                    progress: ProgressCallback | None = None) -> list[Any]:
    """Score variants a chunk at a time: memory stays bounded and a stop request is honoured between chunks."""
    chunk = batch_size or CHUNK
    scores: list[Any] = []
    for start in range(0, len(variants), chunk):
        checkpoint(what, start, len(variants), cancel=cancel)
        scores.extend(inspector.score_prepared(system, variants[start:start + chunk], batch_size=chunk))
        if progress is not None:
            progress(len(scores), len(variants))
    return scores


def letter_probs(scores: Sequence[Any]) -> np.ndarray:
    """One row of letter probabilities per scored prompt."""
    return np.array([score.letter_probs for score in scores], dtype=np.float64)


def mean_metrics(ranks: Sequence[int | None]) -> dict[str, float]:
    """Every metric averaged over the given ranks of the ground truth."""
    summary = summarize([metrics_at(rank) for rank in ranks])
    return {name: summary[name] for name in METRIC_NAMES}
