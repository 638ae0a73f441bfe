"""Base versus adapters on the same users: per-user metrics and paired differences with confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence

import pandas as pd

from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.metrics import METRIC_NAMES, paired_bootstrap

__all__ = ["SUMMARY_COLUMNS", "compare_systems", "comparison_table"]

SUMMARY_COLUMNS = ("system", "preset", "metric", "mean", "reference", "reference_mean", "difference",
                   "ci_low", "ci_high", "n", "improved", "unchanged", "worsened")


def compare_systems(
    inspector: Inspector,
    users: Iterable[str],
    settings: InspectSettings,
    systems: Sequence[str],
    *,
    progress: Callable[[int, int], None] | None = None,
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate every system on the same users; each later system is paired against the first (the reference).

    Returns the per-user frame (one row per user and system, Inspector.evaluate's columns) and a summary
    with one row per (system, metric): its mean and, for non-reference systems, the paired difference
    to the reference with its bootstrap confidence interval and how many users improved or worsened.
    An adapter is scored with the preset it was trained with unless settings.use_adapter_preset is off.
    """
    users = list(users)
    if not systems:
        raise ValueError("no system to evaluate: pass at least one, e.g. ['base', 'my-adapter']")
    if len(set(systems)) != len(systems):
        raise ValueError(f"systems {list(systems)} repeat a name: list each system once")
    if not users:
        raise ValueError("no users to evaluate: pass at least one user id")
    total = len(users) * len(systems)
    frames = []
    for number, system in enumerate(systems):
        offset = number * len(users)

        def report(done: int, _: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + done, total)

        frames.append(inspector.evaluate(users, settings, system, progress=report))
    per_user = pd.concat(frames, ignore_index=True)

    reference = systems[0]
    reference_frame = frames[0].set_index("user_id").loc[users]
    rows = []
    for system, frame in zip(systems, frames, strict=True):
        frame = frame.set_index("user_id").loc[users]
        preset = str(frame["preset"].iloc[0])
        for metric in METRIC_NAMES:
            row = {"system": system, "preset": preset, "metric": metric, "mean": float(frame[metric].mean()),
                   "reference": reference, "reference_mean": float(reference_frame[metric].mean()),
                   "difference": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": len(users),
                   "improved": 0, "unchanged": len(users), "worsened": 0}
            if system != reference:
                paired = paired_bootstrap(reference_frame[metric].to_numpy(), frame[metric].to_numpy(),
                                          samples=bootstrap_samples, seed=seed)
                row.update(difference=paired.difference, ci_low=paired.low, ci_high=paired.high,
                           improved=paired.improved, unchanged=paired.unchanged, worsened=paired.worsened)
            rows.append(row)
    return per_user, pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def comparison_table(summary: pd.DataFrame, metrics: Sequence[str] = ("NDCG@10", "Recall@10", "MRR@10")) -> str:
    """A markdown table: each system's metrics, and its paired difference to the reference with the 95% CI."""
    lines = ["| system | preset | " + " | ".join(metrics) + " |", "|---|---|" + "---|" * len(metrics)]
    for system, group in summary.groupby("system", sort=False):
        by_metric = group.set_index("metric")
        cells = []
        for metric in metrics:
            row = by_metric.loc[metric]
            cell = f"{row['mean']:.4f}"
            if not math.isnan(row["difference"]):
                cell += f" ({row['difference']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}])"
            cells.append(cell)
        lines.append(f"| {system} | {group['preset'].iloc[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
