"""Base versus adapters on the same users: per-user metrics and paired differences with confidence intervals."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

import pandas as pd

from rerank_core.inspector import Inspector, InspectSettings, ResolvedSystem
from rerank_core.limits import check_limit
from rerank_core.metrics import ALL_USERS, AMONG_CANDIDATES, METRIC_NAMES, paired_bootstrap
from rerank_core.progress import CancelCheck, ProgressCallback
from rerank_core.prompts import PromptPreset

__all__ = ["MOVER_COLUMNS", "SUMMARY_COLUMNS", "adapter_notes", "compare_systems", "comparison_table", "movers",
           "paired_runs", "run_label", "summary_rows", "system_of"]

# population: metrics.ALL_USERS, or metrics.AMONG_CANDIDATES (rows only when some target is not among the
# candidates: otherwise the two are the same users, and the candidate recall says so).
SUMMARY_COLUMNS = ("system", "preset", "comparison", "population", "metric", "mean", "reference",
                   "reference_mean", "difference", "ci_low", "ci_high", "n", "improved", "unchanged", "worsened")
# What each summary row's difference measures.
REFERENCE, SAME_PRESET, PRESET_EFFECT = "reference", "vs reference, same preset", "preset effect"
PAIRED = "vs reference"  # a baseline, or any run paired with a reference chosen by name
MOVER_COLUMNS = ("user_id", "system", "reference", "change", "reference_rank", "rank",
                 "reference_truth_probability", "truth_probability", "difference")


def run_label(system: str, preset: PromptPreset, reference_preset: PromptPreset) -> str:
    """The reference system's name in tables, plus the preset when it is re-scored with an adapter's."""
    return system if preset == reference_preset else f"{system} @ {preset.name}"


def adapter_notes(systems: Sequence[ResolvedSystem]) -> list[str]:
    """What each system is scored with unlike the settings asked for (ResolvedSystem.note): a table of means
    cannot show that an adapter ran on its own preset or on another item text than it learnt."""
    return [system.note for system in systems if system.note]


def compare_systems(
    inspector: Inspector,
    users: Iterable[str],
    settings: InspectSettings,
    systems: Sequence[str | ResolvedSystem],
    *,
    progress: ProgressCallback | None = None,
    cancel: CancelCheck = None,
    chunk_size: int | None = None,
    bootstrap_samples: int = 2000,
    seed: int = 0,
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Evaluate every system on the same users, each later system paired like for like with the first.

    Each system is resolved once (Inspector.resolve; resolved ones are used as they are). An adapter is scored
    with the preset it was trained with unless settings.use_adapter_preset is off.
    When that preset differs from the reference's, the reference is scored with it too ("base @ preset"):
    the adapter's difference is then the fine-tune's alone, and the preset's own effect is a separate row
    ("base @ preset" vs "base", comparison "preset effect").

    Returns the per-user frame (Inspector.evaluate's columns; `system` holds the run label) and a summary
    with one row per (run, population, metric): its mean and, for runs other than the reference, the paired
    difference to its reference with a bootstrap CI and how many users improved or worsened (summary_rows).
    `cancel` is checked between chunks of `chunk_size` users (Inspector.evaluate; progress.Cancelled is raised
    there).
    """
    users = list(users)
    names = [system.name if isinstance(system, ResolvedSystem) else system for system in systems]
    if not systems:
        raise ValueError("no system to evaluate: pass at least one, e.g. ['base', 'my-adapter']")
    if len(set(names)) != len(names):
        raise ValueError(f"systems {names} repeat a name: list each system once")
    if not users:
        raise ValueError("no users to evaluate: pass at least one user id")
    check_limit("compare_users", len(users))
    check_limit("compare_systems", len(systems))
    check_limit("bootstrap_samples", bootstrap_samples)
    check_limit("bootstrap_seed", seed)

    resolved = [inspector.resolve(system, settings) for system in systems]
    reference = resolved[0]
    base_preset = reference.settings.preset
    # (label, resolved system, reference label, comparison)
    runs = [(reference.name, reference, reference.name, REFERENCE)]
    extra: list[tuple[str, ResolvedSystem, str, str]] = []
    for system in resolved[1:]:
        preset = system.settings.preset
        reference_label = run_label(reference.name, preset, base_preset)
        runs.append((system.name, system, reference_label, SAME_PRESET))
        if preset != base_preset and all(item[0] != reference_label for item in extra):
            extra.append((reference_label, reference.on_preset(preset), reference.name, PRESET_EFFECT))
    runs = runs[:1] + extra + runs[1:]

    total = len(users) * len(runs)
    frames: dict[str, pd.DataFrame] = {}
    for number, (label, system, _, _) in enumerate(runs):
        offset = number * len(users)

        def report(done: int, _: int, offset: int = offset) -> None:
            if progress is not None:
                progress(offset + done, total)

        frame = inspector.evaluate(users, system.requested, system, progress=report, cancel=cancel,
                                   chunk_size=chunk_size)
        frames[label] = frame.assign(system=label)
    per_user = pd.concat(frames.values(), ignore_index=True)

    rows = [row for label, _, reference_label, comparison in runs
            for row in summary_rows(frames[label].set_index("user_id").loc[users], label, comparison,
                                    frames[reference_label].set_index("user_id").loc[users], reference_label,
                                    bootstrap_samples=bootstrap_samples, seed=seed)]
    return per_user, pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))


def summary_rows(frame: pd.DataFrame, label: str, comparison: str, reference_frame: pd.DataFrame,
                 reference_label: str, *, bootstrap_samples: int = 2000, seed: int = 0) -> list[dict[str, object]]:
    """One summary row per (population, metric) for a run against its reference, both frames indexed by user in the
    same order: the mean and, unless the run is its own reference, the paired bootstrap difference.

    "target among candidates" pairs the same users on both sides, those whose target is among the candidates in
    both runs (one candidate set for every run of a comparison); its rows exist only when some user's target is
    missing, and with no such user left their means and differences are NaN (n 0).
    """
    present = (frame["target_in_candidates"].astype(bool).to_numpy()
               & reference_frame["target_in_candidates"].astype(bool).to_numpy())
    populations = [(ALL_USERS, slice(None))] + ([] if present.all() else [(AMONG_CANDIDATES, present)])
    preset = str(frame["preset"].iloc[0])
    rows = []
    for population, chosen in populations:
        run, reference = frame[chosen], reference_frame[chosen]
        n = len(run)
        for metric in METRIC_NAMES:
            row = {"system": label, "preset": preset, "comparison": comparison, "population": population,
                   "metric": metric, "mean": float(run[metric].astype(float).mean()) if n else math.nan,
                   "reference": reference_label,
                   "reference_mean": float(reference[metric].astype(float).mean()) if n else math.nan,
                   "difference": math.nan, "ci_low": math.nan, "ci_high": math.nan, "n": n, "improved": 0,
                   "unchanged": n, "worsened": 0}
            if comparison != REFERENCE and n:
                paired = paired_bootstrap(reference[metric].to_numpy(float), run[metric].to_numpy(float),
                                          samples=bootstrap_samples, seed=seed)
                row.update(difference=paired.difference, ci_low=paired.low, ci_high=paired.high,
                           improved=paired.improved, unchanged=paired.unchanged, worsened=paired.worsened)
            rows.append(row)
    return rows


def paired_runs(per_user: pd.DataFrame, summary: pd.DataFrame,
                metric: str = "NDCG@10") -> Iterator[tuple[str, str, pd.DataFrame]]:
    """Each compared run with a ground-truth probability (the LLM runs; baselines have none), its reference and
    their users joined side by side (the reference's columns suffixed "_reference"): what the movers and the
    scatter both read, so the page and the report pick the same runs and the same users."""
    by_label = {label: frame.set_index("user_id") for label, frame in per_user.groupby("system", sort=False)}
    compared = summary[(summary["comparison"] != REFERENCE) & (summary["metric"] == metric)
                       & (summary["population"] == ALL_USERS)]
    for item in compared.itertuples():
        joined = by_label[item.reference].merge(by_label[item.system], left_index=True, right_index=True,
                                                suffixes=("_reference", ""))
        if joined["truth_probability"].notna().any():
            yield item.system, item.reference, joined


def movers(per_user: pd.DataFrame, summary: pd.DataFrame, *, count: int = 5,
           metric: str = "NDCG@10") -> pd.DataFrame:
    """The most improved and most worsened users of each compared run against its own reference: a change in
    the metric first, then in the ground truth's probability (ties kept in user order)."""
    count = check_limit("movers", count)
    rows = []
    for system, reference, joined in paired_runs(per_user, summary, metric):
        joined = joined.assign(delta=joined[metric] - joined[f"{metric}_reference"],
                               delta_p=(joined["truth_probability"].astype(float)
                                        - joined["truth_probability_reference"].astype(float)).fillna(0.0))
        ordered = joined.sort_values(["delta", "delta_p"], ascending=False, kind="stable")
        for change, part, sign in (("improved", ordered.head(count), 1), ("worsened", ordered.tail(count)[::-1], -1)):
            for user_id, row in part.iterrows():
                if not (sign * row["delta"] > 0 or (row["delta"] == 0 and sign * row["delta_p"] > 0)):
                    continue
                rows.append({"user_id": user_id, "system": system, "reference": reference,
                             "change": change, "reference_rank": row["rank_reference"], "rank": row["rank"],
                             "reference_truth_probability": row["truth_probability_reference"],
                             "truth_probability": row["truth_probability"], "difference": float(row["delta"])})
    return pd.DataFrame(rows, columns=list(MOVER_COLUMNS))


def system_of(label: str) -> str:
    """The system behind a run label: "base @ seed_after" (run_label) is the base scored on another preset."""
    return label.split(" @ ", 1)[0]


def comparison_table(summary: pd.DataFrame, metrics: Sequence[str] = ("NDCG@10", "Recall@10", "MRR@10")) -> str:
    """A markdown table: each run's metrics, and its paired difference to its reference with the 95% CI; with a
    population column (and a row per population) when some target is not among the candidates."""
    both = bool((summary["population"] != ALL_USERS).any())
    lines = ["| system | preset | compared with | " + ("population | users | " if both else "")
             + " | ".join(metrics) + " |", "|---|---|---|" + ("---|---|" if both else "") + "---|" * len(metrics)]
    for (system, population), group in summary.groupby(["system", "population"], sort=False):
        by_metric = group.set_index("metric")
        first = group.iloc[0]
        against = "-" if first["comparison"] == REFERENCE else f"{first['reference']} ({first['comparison']})"
        cells = []
        for metric in metrics:
            row = by_metric.loc[metric]
            cell = "-" if math.isnan(row["mean"]) else f"{row['mean']:.4f}"
            if not math.isnan(row["difference"]):
                cell += f" ({row['difference']:+.4f} [{row['ci_low']:+.4f}, {row['ci_high']:+.4f}])"
            cells.append(cell)
        shown = f"{population} | {int(first['n'])} | " if both else ""
        lines.append(f"| {system} | {first['preset']} | {against} | {shown}" + " | ".join(cells) + " |")
    return "\n".join(lines)
