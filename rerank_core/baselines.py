"""Trivial rankers on the very candidates the LLM sees: random, popularity and the retriever's own order."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import replace

import numpy as np
import pandas as pd

from rerank_core.candidates import CandidateConfig, CandidateSampler
from rerank_core.compare import PAIRED, REFERENCE, summary_rows
from rerank_core.data.dataset import Dataset
from rerank_core.inspector import PER_USER_COLUMNS, Inspector, InspectSettings
from rerank_core.metrics import METRIC_NAMES, metrics_at, rank_of_truth

__all__ = [
    "BASELINES",
    "BASELINE_PRESET",
    "evaluate_baseline",
    "paired_rows",
    "random_expected_metrics",
    "with_baselines",
]

# random: the expected metrics of a uniformly random order (exact, no seed); popularity: interaction counts
# in the training part of the split; retriever: the co-occurrence retriever's score (LlamaRec's first stage).
BASELINES = ("random", "popularity", "retriever")
# What the per-user and summary frames show in the preset column for a baseline: it reads no prompt.
BASELINE_PRESET = "baseline"


def random_expected_metrics(count: int) -> dict[str, float]:
    """Each metric averaged over the truth's equally likely ranks 1..count: a random order's expected value."""
    if count < 1:
        raise ValueError(f"a random order needs at least one candidate, got {count}")
    per_rank = [metrics_at(rank) for rank in range(1, count + 1)]
    return {name: float(np.mean([row[name] for row in per_rank])) for name in METRIC_NAMES}


def evaluate_baseline(dataset: Dataset, users: Iterable[str], split: str, config: CandidateConfig, name: str,
                      sampler_for: Callable[[CandidateConfig], CandidateSampler] | None = None) -> pd.DataFrame:
    """Per-user rows in Inspector.evaluate's columns; ties count against the truth, as for the LLM.

    sampler_for builds (or fetches cached) samplers; Inspector.sampler shares the LLM's, so both see the
    same candidates and the retriever's tables are built once.
    """
    if name not in BASELINES:
        raise ValueError(f"baseline {name!r} is not one of {', '.join(BASELINES)}")
    make = sampler_for or (lambda wanted: CandidateSampler(dataset, wanted))
    sampler = make(config)
    # The retriever baseline scores with the retriever's tables whatever source drew the candidates.
    scorer = make(replace(config, source="retriever", order="shuffled")) \
        if name == "retriever" and config.source != "retriever" else sampler
    rows = []
    for user in users:
        user_split = dataset.split_user(user, split)
        candidates = sampler.for_split(user_split)
        present = candidates.target_index is not None
        row = {"user_id": user, "system": name, "preset": BASELINE_PRESET, "target_in_candidates": present,
               "truth_probability": None, "letter_mass": None, "top1_letter": None, "prompt_tokens": None}
        if name == "random":
            expected = random_expected_metrics(len(candidates.item_ids)) if present else metrics_at(None)
            rows.append({**row, "rank": (len(candidates.item_ids) + 1) / 2 if present else None, **expected})
            continue
        scores = _scores(scorer, name, user_split.history, candidates.item_ids)
        rank = rank_of_truth(scores, candidates.target_index)
        rows.append({**row, "rank": rank, **metrics_at(rank)})
    return pd.DataFrame(rows, columns=list(PER_USER_COLUMNS))


def _scores(sampler: CandidateSampler, name: str, history: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
    if name == "popularity":
        return sampler.popularity(item_ids)
    return sampler.retriever_scores(history, item_ids)


def with_baselines(inspector: Inspector, per_user: pd.DataFrame, summary: pd.DataFrame, users: Sequence[str],
                   settings: InspectSettings, baselines: Sequence[str], *, reference: str | None = None,
                   bootstrap_samples: int = 2000, seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """compare_systems' frames plus each baseline on the same users and candidates, paired with the reference.

    reference None keeps compare_systems' reference (its first system); naming another run (an adapter, a
    baseline) pairs every run against that one instead, e.g. "popularity": does anything beat it?
    """
    if len(set(baselines)) != len(baselines):
        raise ValueError(f"baselines {list(baselines)} repeat a name: list each once")
    taken = set(per_user["system"])
    clash = sorted(taken.intersection(baselines))
    if clash:
        raise ValueError(f"{', '.join(clash)} is both a system and a baseline name: rename the adapter")
    frames = [evaluate_baseline(inspector.dataset, users, settings.split, settings.candidates, name,
                                inspector.sampler) for name in baselines]
    per_user = pd.concat([per_user, *frames], ignore_index=True)
    current = str(summary["reference"].iloc[0])
    labels = list(dict.fromkeys(per_user["system"]))
    if reference is not None and reference not in labels:
        raise ValueError(f"reference {reference!r} is not one of the runs: {', '.join(labels)}")
    if reference is None or reference == current:
        extra = [row for name in baselines
                 for row in paired_rows(per_user, users, name, current, summary.columns, bootstrap_samples, seed)]
        return per_user, pd.concat([summary, pd.DataFrame(extra, columns=summary.columns)], ignore_index=True)
    rows = [row for label in labels
            for row in paired_rows(per_user, users, label, reference, summary.columns, bootstrap_samples, seed)]
    return per_user, pd.DataFrame(rows, columns=summary.columns)


def paired_rows(per_user: pd.DataFrame, users: Sequence[str], label: str, reference: str, columns: Iterable[str],
                bootstrap_samples: int, seed: int) -> list[dict[str, object]]:
    """One summary row per (population, metric): the run's mean and its paired bootstrap difference to the
    reference run (compare.summary_rows), keeping the given columns."""
    frame = per_user[per_user["system"] == label].set_index("user_id").loc[list(users)]
    reference_frame = per_user[per_user["system"] == reference].set_index("user_id").loc[list(users)]
    kept = set(columns)
    return [{key: value for key, value in row.items() if key in kept}
            for row in summary_rows(frame, label, REFERENCE if label == reference else PAIRED, reference_frame,
                                    reference, bootstrap_samples=bootstrap_samples, seed=seed)]
