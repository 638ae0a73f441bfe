"""Letter mass over users: the letters' share of the full next-token distribution, per system."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from rerank_core.diagnostics.common import CancelCheck, ProgressCallback
from rerank_core.inspector import BASE, Inspector, InspectSettings, ResolvedSystem
from rerank_core.limits import check_limit

__all__ = ["LetterMass", "letter_mass"]

@dataclass(frozen=True, eq=False)
class LetterMass:
    """The letters' share of the full-vocabulary probability per user and system: low = format not learnt."""

    frame: pd.DataFrame  # one row per (user, system), from Inspector.evaluate

    @property
    def systems(self) -> list[str]:
        return list(dict.fromkeys(self.frame["system"]))

    def summary(self) -> pd.DataFrame:
        """Per system: users, mean, median, 10th and 90th percentile, share of users below one half."""
        rows = []
        for system, group in self.frame.groupby("system", sort=False):
            mass = group["letter_mass"].astype(float)
            rows.append({"system": system, "users": len(mass), "mean": mass.mean(), "median": mass.median(),
                         "p10": mass.quantile(0.1), "p90": mass.quantile(0.9),
                         "below_half": float((mass < 0.5).mean())})
        return pd.DataFrame(rows, columns=["system", "users", "mean", "median", "p10", "p90", "below_half"])

    def to_json(self) -> dict[str, Any]:
        return {"summary": self.summary().to_dict(orient="records"),
                "per_user": self.frame[["user_id", "system", "preset", "letter_mass"]].to_dict(
                    orient="records")}


def letter_mass(inspector: Inspector, users: Sequence[str], settings: InspectSettings,
                systems: Sequence[str | ResolvedSystem] = (BASE,), *, progress: ProgressCallback | None = None,
                cancel: CancelCheck = None, chunk_size: int | None = None) -> LetterMass:
    """Evaluate every user with every system and keep the letter mass (each adapter with its own preset);
    `cancel` is checked between chunks of `chunk_size` users (Inspector.evaluate)."""
    if not users:
        raise ValueError("no users to diagnose: pass at least one user id")
    check_limit("diagnostic_users", len(users))
    check_limit("compare_systems", len(systems))
    frames = []
    for index, system in enumerate(systems):
        report = None if progress is None else (
            lambda done, total, index=index: progress(index * total + done, total * len(systems)))
        frames.append(inspector.evaluate(users, settings, system, progress=report, cancel=cancel,
                                         chunk_size=chunk_size))
    return LetterMass(pd.concat(frames, ignore_index=True))
