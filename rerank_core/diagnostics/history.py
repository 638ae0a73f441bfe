"""History influence: leave one history item out and re-score; which items the ranking leans on."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from rerank_core.diagnostics.common import CancelCheck, ProgressCallback, letter_probs, score_in_chunks
from rerank_core.inspector import BASE, Inspector, InspectSettings, ResolvedSystem
from rerank_core.limits import check_limit

__all__ = ["INFLUENCE_FLOOR", "HistoryInfluence", "history_influence"]

# A probability shift below this is rounding, not influence: the same prompt padded into batches of other
# shapes moves by ~1e-7 in fp32 (5e-8 seen on an AVX2 CPU, 0 on an AVX-512 one), and tables show four decimals.
INFLUENCE_FLOOR = 1e-4

@dataclass(frozen=True, eq=False)
class HistoryInfluence:
    """Leave-one-out over the history the prompt shows: which items move the ground truth and the top-1."""

    system: str
    user_id: str
    preset: str
    letters: tuple[str, ...]
    candidate_ids: tuple[str, ...]
    target_index: int | None
    positions: tuple[int, ...]  # 1-based positions in the full history (as Inspect's history table)
    history_ids: tuple[str, ...]
    history_texts: tuple[str, ...]
    full_probs: np.ndarray  # [letter]
    without_probs: np.ndarray  # [history item, letter]

    @property
    def top1(self) -> int:
        return int(self.full_probs.argmax())

    @property
    def top1_without(self) -> np.ndarray:
        return self.without_probs.argmax(axis=1)

    @property
    def top1_changed(self) -> np.ndarray:
        return self.top1_without != self.top1

    @property
    def truth_probability(self) -> float | None:
        return None if self.target_index is None else float(self.full_probs[self.target_index])

    @property
    def truth_delta(self) -> np.ndarray | None:
        """Truth probability without the item minus with it: negative = the item supported the truth."""
        if self.target_index is None:
            return None
        return self.without_probs[:, self.target_index] - self.full_probs[self.target_index]

    @property
    def total_variation(self) -> np.ndarray:
        """How far removing the item moves the whole letter distribution (0 = not at all, 1 = entirely)."""
        return 0.5 * np.abs(self.without_probs - self.full_probs[None, :]).sum(axis=1)

    def most_influential(self, count: int = 3) -> list[int]:
        """Row indices of the items whose removal moves the truth most (the distribution, without truth).

        Only shifts of at least INFLUENCE_FLOOR count: below it, a model blind to its history would show
        "influence" made of rounding noise.
        """
        delta = self.truth_delta
        strength = self.total_variation if delta is None else np.abs(delta)
        order = sorted(range(len(strength)), key=lambda row: (-strength[row], -self.total_variation[row]))
        return [row for row in order[:count] if strength[row] >= INFLUENCE_FLOOR]

    def to_json(self) -> dict[str, Any]:
        delta = self.truth_delta
        top = set(self.most_influential())
        return {
            "system": self.system, "user_id": self.user_id, "preset": self.preset,
            "letters": list(self.letters), "target_index": self.target_index,
            "truth_probability": self.truth_probability,
            "top1_letter": self.letters[self.top1], "top1_item": self.candidate_ids[self.top1],
            "history": [{
                "position": position, "item_id": item_id, "text": text,
                "truth_probability_without": None if delta is None
                else float(self.without_probs[row, self.target_index]),
                "truth_delta": None if delta is None else float(delta[row]),
                "top1_letter_without": self.letters[int(self.top1_without[row])],
                "top1_changed": bool(self.top1_changed[row]),
                "total_variation": float(self.total_variation[row]), "influential": row in top}
                for row, (position, item_id, text) in enumerate(
                    zip(self.positions, self.history_ids, self.history_texts, strict=True))],
        }


def history_influence(inspector: Inspector, user_id: str, settings: InspectSettings,
                      system: str | ResolvedSystem = BASE, *,
                      batch_size: int | None = None, progress: ProgressCallback | None = None,
                      cancel: CancelCheck = None) -> HistoryInfluence:
    """Remove each shown history item in turn and re-score, in chunks with a stop check between them."""
    resolved = inspector.resolve(system, settings)
    effective = resolved.settings
    prepared = inspector.prepare(user_id, effective)
    kept = prepared.shown_history
    if not kept:
        raise ValueError(f"user {user_id!r}: the prompt shows no history item (all dropped to fit "
                         f"max_prompt_tokens={effective.max_prompt_tokens}); raise the limit or use fewer "
                         "candidates")
    check_limit("history_items", len(kept))
    variants = [prepared]
    variants += [inspector.variant(prepared, effective, history_ids=kept[:row] + kept[row + 1:])
                 for row in range(len(kept))]
    probs = letter_probs(score_in_chunks(inspector, resolved, variants, f"history influence of user {user_id}",
                                         batch_size=batch_size, cancel=cancel, progress=progress))
    dropped = prepared.prompt.dropped_history
    return HistoryInfluence(
        system=resolved.name, user_id=user_id, preset=prepared.prompt.preset, letters=prepared.prompt.letters,
        candidate_ids=prepared.candidates.item_ids, target_index=prepared.candidates.target_index,
        positions=tuple(range(dropped + 1, dropped + len(kept) + 1)), history_ids=kept,
        history_texts=tuple(inspector.dataset.text(item, effective.text_field) for item in kept),
        full_probs=probs[0], without_probs=probs[1:])
