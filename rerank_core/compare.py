"""Base versus adapters on the same users: per-user metrics and paired differences with confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import replace

import pandas as pd

from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.limits import check_limit
from rerank_core.metrics import METRIC_NAMES, paired_bootstrap
from rerank_core.progress import CancelCheck, ProgressCallback
from rerank_core.prompts import PromptPreset

__all__ = ["SUMMARY_COLUMNS", "adapter_notes", "compare_systems", "comparison_table", "movers", "run_label"]

SUMMARY_COLUMNS = ("system", "preset", "comparison", "metric", "mean", "reference", "reference_mean",
                   "difference", "ci_low", "ci_high", "n", "improved", "unchanged", "worsened")
# What each summary row's difference measures.
REFERENCE, SAME_PRESET, PRESET_EFFECT = "reference", "vs reference, same preset", "preset effect"
PAIRED = "vs reference"  # a baseline, or any run paired with a reference chosen by name
MOVER_COLUMNS = ("user_id", "system", "reference", "change", "reference_rank", "rank",
                 "reference_truth_probability", "truth_probability", "difference")


def run_label(system: str, preset: PromptPreset, reference_preset: PromptPreset) -> str:
    """The reference system's name in tables, plus the preset when it is re-scored with an adapter's."""
    return system if preset == reference_preset else f"{system} @ {preset.name}"


def adapter_notes(inspector: Inspector, settings: InspectSettings, systems: Sequence[str]) -> list[str]:
    """What each system is scored with unlike the settings asked for (Inspector.settings_for's notes): a table
    of means cannot show that an adapter ran on its own preset or on another item text than it learnt."""
    return [note for system in systems if (note := inspector.settings_for(system, settings)[1])]


def compare_systems(
    inspector: Inspector,
    users: Iterable[str],
    settings: InspectSettings,
    systems: Sequence[str],
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck = None,
    chunk_size: int | None = None,
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate every system on the same users, each later system paired like for like with the first.

    An adapter is scored with the preset it was trained with unless settings.use_adapter_preset is off.
    When that preset differs from the reference's, the reference is scored with it too ("base @ preset"):
    the adapter's difference is then the fine-tune's alone, and the preset's own effect is a separate row
    ("base @ preset" vs "base", comparison "preset effect").

    Returns the per-user frame (Inspector.evaluate's columns; `system` holds the run label) and a summary
    with one row per (run, metric): its mean and, for runs other than the reference, the paired
    difference to its reference with a bootstrap CI and how many users improved or worsened.
    `cancel` is checked between chunks of `chunk_size` users (Inspector.evaluate; progress.Cancelled is raised
    there).
    """
    users = list(users)
    if not systems:
        raise ValueError("no system to evaluate: pass at least one, e.g. ['base', 'my-adapter']")
    if len(set(systems)) != len(systems):
        raise ValueError(f"systems {list(systems)} repeat a name: list each system once")
    if not users:
        raise ValueError("no users to evaluate: pass at least one user id")
    check_limit("compare_users", len(users))
    check_limit("compare_systems", len(systems))
    check_limit("bootstrap_samples", bootstrap_samples)
    check_limit("bootstrap_seed", seed)

    reference = systems[0]
    reference_settings, _ = inspector.settings_for(reference, settings)
    base_preset = reference_settings.preset
    # (label, system, settings passed to evaluate, reference label, comparison)
    runs = [(reference, reference, settings, reference, REFERENCE)]
    extra: list[tuple[str, str, InspectSettings, str, str]] = []
    for system in systems[1:]:
        preset = inspector.settings_for(system, settings)[0].preset
        reference_label = run_label(reference, preset, base_preset)
        runs.append((system, system, settings, reference_label, SAME_PRESET))
        if preset != base_preset and all(item[0] != reference_label for item in extra):
            fixed = replace(reference_settings, preset=preset, use_adapter_preset=False)
            extra.append((reference_label, reference, fixed, reference, PRESET_EFFECT))
    runs = runs[:1] + extra + runs[1:]

    total = len(users) * len(runs)
    frames: dict[str, pd.DataFrame] = {}
    for number, (label, system, run_settings, _, _) in enumerate(runs):
        offset = number * len(users)

        def report(done: int, _: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + done, total)

        frame = inspector.evaluate(users, run_settings, system, progress=report, cancel=cancel,
                                   chunk_size=chunk_size)
        frames[label] = frame.assign(system=label)
    per_user = pd.concat(frames.values(), ignore_index=True)

    rows = []
    for label, _, _, reference_label, comparison in runs:
        frame = frames[label].set_index("user_id").loc[users]
        reference_frame = frames[reference_label].set_index("user_id").loc[users]
        preset = str(frame["preset"].iloc[0])
        for metric in METRIC_NAMES:
            row = {"system": label, "preset": preset, "comparison": comparison, "metric": metric,
                   "mean": float(frame[metric].mean()), "reference": reference_label,
                   "reference_mean": float(reference_frame[metric].mean()), "difference": math.nan,
                   "ci_low": math.nan, "ci_high": math.nan, "n": len(users), "improved": 0,
                   "unchanged": len(users), "worsened": 0}
            if comparison != REFERENCE:
                paired = paired_bootstrap(reference_frame[metric].to_numpy(), frame[metric].to_numpy(),
                                          samples=bootstrap_samples, seed=seed)
                row.update(difference=paired.difference, ci_low=paired.low, ci_high=paired.high,
                           improved=paired.improved, unchanged=paired.unchanged, worsened=paired.worsened)
            rows.append(row)
    return per_user, pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def movers(per_user: pd.DataFrame, summary: pd.DataFrame, *, count: int = 5,
           metric: str = "NDCG@10") -> pd.DataFrame:
    """The most improved and most worsened users of each compared run against its own reference."""
    count = check_limit("movers", count)
    rows = []
    by_label = {label: frame.set_index("user_id") for label, frame in per_user.groupby("system", sort=False)}
    compared = summary[(summary["comparison"] != REFERENCE) & (summary["metric"] == metric)]
    for item in compared.itertuples():
        joined = by_label[item.reference].merge(by_label[item.system], left_index=True, right_index=True,
                                                suffixes=("_reference", ""))
        joined = joined.assign(delta=joined[metric] - joined[f"{metric}_reference"],
                               delta_p=(joined["truth_probability"].astype(float)
                                        - joined["truth_probability_reference"].astype(float)).fillna(0.0))
        ordered = joined.sort_values(["delta", "delta_p"], ascending=False, kind="stable")
        for change, part, sign in (("improved", ordered.head(count), 1), ("worsened", ordered.tail(count)[::-1], -1)):
            for user_id, row in part.iterrows():
                if not (sign * row["delta"] > 0 or (row["delta"] == 0 and sign * row["delta_p"] > 0)):
                    continue
                rows.append({"user_id": user_id, "system": item.system, "reference": item.reference,
                             "change": change, "reference_rank": row["rank_reference"], "rank": row["rank"],
                             "reference_truth_probability": row["truth_probability_reference"],
                             "truth_probability": row["truth_probability"], "difference": float(row["delta"])})
    return pd.DataFrame(rows, columns=list(MOVER_COLUMNS))


def comparison_table(summary: pd.DataFrame, metrics: Sequence[str] = ("NDCG@10", "Recall@10", "MRR@10")) -> str:
    """A markdown table: each run's metrics, and its paired difference to its reference with the 95% CI."""
    lines = ["| system | preset | compared with | " + " | ".join(metrics) + " |",
             "|---|---|---|" + "---|" * len(metrics)]
    for system, group in summary.groupby("system", sort=False):
        by_metric = group.set_index("metric")
        first = group.iloc[0]
        against = "-" if first["comparison"] == REFERENCE else f"{first['reference']} ({first['comparison']})"
        cells = []
        for metric in metrics:
            row = by_metric.loc[metric]
            cell = f"{row['mean']:.4f}"
            if not math.isnan(row["difference"]):
                cell += f" ({row['difference']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}])"
            cells.append(cell)
        lines.append(f"| {system} | {first['preset']} | {against} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
