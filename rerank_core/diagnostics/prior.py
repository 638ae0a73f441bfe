"""Letter prior: every candidate text blanked or replaced by one word; what the model believes about letters alone."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from rerank_core.diagnostics.common import CancelCheck, ProgressCallback, letter_probs, score_in_chunks
from rerank_core.inspector import BASE, Inspector, InspectSettings, ResolvedSystem
from rerank_core.limits import check_limit

__all__ = ["PRIOR_MODES", "LetterPrior", "letter_prior"]

PRIOR_MODES = ("blank", "placeholder")


@dataclass(frozen=True, eq=False)
class LetterPrior:
    """Letter probabilities with the candidate texts hidden: what the model believes before reading items."""

    system: str
    preset: str
    mode: str
    placeholder: str
    letters: tuple[str, ...]
    user_ids: tuple[str, ...]
    probs: np.ndarray  # [user, letter]
    letter_mass: np.ndarray  # [user]

    @property
    def uniform(self) -> float:
        return 1.0 / len(self.letters)

    @property
    def mean(self) -> np.ndarray:
        return self.probs.mean(axis=0)

    @property
    def top_letter_share(self) -> np.ndarray:
        """Share of users whose blanked prompt puts the top-1 on each letter."""
        return np.bincount(self.probs.argmax(axis=1), minlength=len(self.letters)) / len(self.probs)

    @property
    def normalized_entropy(self) -> float:
        """Entropy of the mean prior over ln N: 1 = no letter preferred, 0 = one letter takes it all."""
        if len(self.letters) == 1:
            return 1.0
        mean = self.mean[self.mean > 0]
        return float(-(mean * np.log(mean)).sum() / math.log(len(self.letters)))

    def to_json(self) -> dict[str, Any]:
        return {
            "system": self.system, "preset": self.preset, "mode": self.mode, "placeholder": self.placeholder,
            "letters": list(self.letters), "uniform": self.uniform, "mean": self.mean.tolist(),
            "std": self.probs.std(axis=0).tolist(), "top_letter_share": self.top_letter_share.tolist(),
            "normalized_entropy": self.normalized_entropy,
            "letter_mass_mean": float(self.letter_mass.mean()),
            "per_user": [{"user_id": user, "probs": row.tolist(), "letter_mass": float(mass)}
                         for user, row, mass in zip(self.user_ids, self.probs, self.letter_mass,
                                                    strict=True)],
        }


def letter_prior(inspector: Inspector, users: Sequence[str], settings: InspectSettings,
                 system: str | ResolvedSystem = BASE,
                 mode: str = "placeholder", *, placeholder: str = "item",
                 progress: ProgressCallback | None = None, cancel: CancelCheck = None,
                 batch_size: int | None = None) -> LetterPrior:
    """Each user's real history, every candidate text blanked ("") or the same placeholder word; `cancel` is
    checked between chunks of `batch_size` prompts (score_in_chunks)."""
    if mode not in PRIOR_MODES:
        raise ValueError(f"letter prior mode {mode!r} is not one of {', '.join(PRIOR_MODES)}")
    if not users:
        raise ValueError("no users to diagnose: pass at least one user id")
    check_limit("diagnostic_users", len(users))
    if not isinstance(placeholder, str):
        raise ValueError(f"placeholder must be a word (text), got {type(placeholder).__name__} {placeholder!r:.60}")
    check_limit("placeholder_chars", len(placeholder))
    resolved = inspector.resolve(system, settings)
    effective = resolved.settings
    text = "" if mode == "blank" else placeholder
    variants = []
    for user_id in users:
        prepared = inspector.prepare(user_id, effective)
        variants.append(inspector.variant(prepared, effective, candidate_texts=[text] * len(prepared.candidate_texts)))
    scores = score_in_chunks(inspector, resolved, variants, "letter prior", batch_size=batch_size, cancel=cancel,
                             progress=progress)
    return LetterPrior(system=resolved.name, preset=variants[0].prompt.preset, mode=mode, placeholder=text,
                       letters=variants[0].prompt.letters, user_ids=tuple(users), probs=letter_probs(scores),
                       letter_mass=np.array([score.letter_mass for score in scores]))
