"""Position bias: the same candidates in other orders; what the letter position alone does to the scores."""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from rerank_core.diagnostics.common import (
    CancelCheck,
    ProgressCallback,
    letter_probs,
    mean_metrics,
    score_in_chunks,
)
from rerank_core.inspector import BASE, Inspector, InspectSettings, PreparedUser, ResolvedSystem
from rerank_core.limits import check_limit
from rerank_core.metrics import METRIC_NAMES, PairedDifference, metrics_at, paired_bootstrap, rank_of_truth
from rerank_core.progress import checkpoint

__all__ = [
    "ORDER_MODES",
    "OrderSpec",
    "PositionBias",
    "PositionBiasSummary",
    "candidate_orders",
    "kendall_tau_b",
    "position_bias",
    "position_bias_over_users",
]

ORDER_MODES = ("rotations", "permutations")


def kendall_tau_b(first: Sequence[float], second: Sequence[float]) -> float:
    """Kendall's tau-b of two score vectors over the same items; tied pairs count neither for nor against."""
    x, y = np.asarray(first, dtype=np.float64), np.asarray(second, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"tau needs two score vectors of one length, got {x.shape} and {y.shape}")
    upper = np.triu_indices(len(x), 1)
    dx = np.sign(x[:, None] - x[None, :])[upper]
    dy = np.sign(y[:, None] - y[None, :])[upper]
    denominator = math.sqrt(float(np.count_nonzero(dx)) * float(np.count_nonzero(dy)))
    return float((dx * dy).sum() / denominator) if denominator else math.nan


@dataclass(frozen=True)
class OrderSpec:
    """Which candidate orders a position-bias run scores; the original order always comes first.

    Rotations put every item once at every letter, so per-letter averages are exactly balanced;
    seeded permutations (count and seed apply to them only) sample orders when N rotations cost too much.
    """

    mode: str = "rotations"
    count: int = 20
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in ORDER_MODES:
            raise ValueError(f"order mode {self.mode!r} is not one of {', '.join(ORDER_MODES)}")
        object.__setattr__(self, "count", check_limit("orders", self.count))
        object.__setattr__(self, "seed", check_limit("order_seed", self.seed))


def candidate_orders(count: int, spec: OrderSpec = OrderSpec()) -> list[tuple[int, ...]]:
    """Orders as tuples order[position] = original candidate index; the identity first."""
    identity = tuple(range(count))
    if spec.mode == "rotations":
        return [identity[shift:] + identity[:shift] for shift in range(count)]
    if math.factorial(count) <= spec.count:
        # Fewer distinct orders exist than asked for: score each exactly once.
        return [identity, *(order for order in itertools.permutations(identity) if order != identity)]
    rng = np.random.default_rng(spec.seed)
    orders, seen = [identity], {identity}
    while len(orders) < spec.count:
        order = tuple(int(index) for index in rng.permutation(count))
        if order not in seen:
            seen.add(order)
            orders.append(order)
    return orders


@dataclass(frozen=True, eq=False)
class PositionBias:
    """One user's candidates scored under several orders: what the letter does, apart from the item."""

    system: str
    user_id: str
    preset: str
    letters: tuple[str, ...]
    item_ids: tuple[str, ...]
    item_texts: tuple[str, ...]
    target_index: int | None
    orders: tuple[tuple[int, ...], ...]
    position_probs: np.ndarray  # [order, letter position]
    letter_mass: np.ndarray  # [order]

    @property
    def uniform(self) -> float:
        return 1.0 / len(self.letters)

    @property
    def item_probs(self) -> np.ndarray:
        """[order, original item index]: each item's probability under each order."""
        result = np.empty_like(self.position_probs)
        for row, order in enumerate(self.orders):
            result[row, list(order)] = self.position_probs[row]
        return result

    @property
    def item_position_probs(self) -> np.ndarray:
        """[item, position]: the item's mean probability when it stands at that letter (NaN: never did)."""
        count = len(self.letters)
        total, seen = np.zeros((count, count)), np.zeros((count, count))
        for row, order in enumerate(self.orders):
            total[list(order), np.arange(count)] += self.position_probs[row]
            seen[list(order), np.arange(count)] += 1
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(seen > 0, total / np.maximum(seen, 1), np.nan)

    @property
    def letter_means(self) -> np.ndarray:
        """Per letter, the mean probability it gets whatever item stands there."""
        return self.position_probs.mean(axis=0)

    @property
    def debiased(self) -> np.ndarray:
        """Each item's probability averaged over the orders: the letter's share averages out."""
        return self.item_probs.mean(axis=0)

    @property
    def top1_positions(self) -> np.ndarray:
        """Per order, the letter position of the top-1 (the first on ties, as the ranking sorts)."""
        return self.position_probs.argmax(axis=1)

    @property
    def truth_ranks(self) -> list[int | None]:
        """The ground truth's rank under each order."""
        return [rank_of_truth(row, self.target_index) for row in self.item_probs]

    @property
    def truth_rank_counts(self) -> np.ndarray:
        """How many orders put the ground truth at rank 1, 2, ... N (all zero when it is absent)."""
        counts = np.zeros(len(self.letters), dtype=np.int64)
        for rank in self.truth_ranks:
            if rank is not None:
                counts[rank - 1] += 1
        return counts

    @property
    def tau_vs_original(self) -> np.ndarray:
        """Kendall tau-b of each order's item scores against the original order's."""
        probs = self.item_probs
        return np.array([kendall_tau_b(probs[0], row) for row in probs])

    @property
    def stability(self) -> float:
        """Mean Kendall tau-b over all pairs of orders: 1 = the ranking ignores the order."""
        probs = self.item_probs
        taus = [kendall_tau_b(probs[a], probs[b]) for a, b in itertools.combinations(range(len(probs)), 2)]
        finite = [tau for tau in taus if not math.isnan(tau)]
        return float(np.mean(finite)) if finite else math.nan

    @property
    def rank_original(self) -> int | None:
        return self.truth_ranks[0]

    @property
    def rank_debiased(self) -> int | None:
        return rank_of_truth(self.debiased, self.target_index)

    def metrics(self) -> dict[str, dict[str, float]]:
        """The user's metrics as shown, with debiased scores, and averaged over all orders."""
        return {"original": metrics_at(self.rank_original), "debiased": metrics_at(self.rank_debiased),
                "over_orders": mean_metrics(self.truth_ranks)}

    def to_json(self) -> dict[str, Any]:
        item_probs, by_position, debiased = self.item_probs, self.item_position_probs, self.debiased
        return {
            "system": self.system, "user_id": self.user_id, "preset": self.preset,
            "letters": list(self.letters), "target_index": self.target_index,
            "orders": [list(order) for order in self.orders],
            "uniform": self.uniform, "letter_means": self.letter_means.tolist(),
            "stability": _finite(self.stability),
            "tau_vs_original": [_finite(tau) for tau in self.tau_vs_original],
            "truth_rank_counts": self.truth_rank_counts.tolist(),
            "top1_letters": [self.letters[position] for position in self.top1_positions],
            "letter_mass": self.letter_mass.tolist(),
            "rank_original": self.rank_original, "rank_debiased": self.rank_debiased,
            "metrics": self.metrics(),
            "items": [{"item_id": item_id, "text": text, "truth": index == self.target_index,
                       "probability_original": float(item_probs[0, index]),
                       "debiased": float(debiased[index]),
                       "by_position": [_finite(value) for value in by_position[index]]}
                      for index, (item_id, text) in enumerate(zip(self.item_ids, self.item_texts,
                                                                  strict=True))],
        }


def _finite(value: float) -> float | None:
    """JSON has no NaN: an undefined value (tau of constant scores, an unvisited position) is null."""
    return None if math.isnan(value) else float(value)


def _position_bias_prepared(inspector: Inspector, prepared: PreparedUser, settings: InspectSettings,
                            system: ResolvedSystem, spec: OrderSpec, batch_size: int | None,
                            cancel: CancelCheck = None,
                            progress: ProgressCallback | None = None) -> PositionBias:
    count = len(prepared.candidates.item_ids)
    orders = candidate_orders(count, spec)
    variants = [prepared]  # the identity: exactly the prompt Inspect shows, so its score is shared
    variants += [inspector.variant(prepared, settings, order=order) for order in orders[1:]]
    # The orders share a length, so batching them costs no padding; chunks bound memory and let a stop in.
    scores = score_in_chunks(inspector, system, variants, f"position bias of user {prepared.split.user_id}",
                             batch_size=batch_size, cancel=cancel, progress=progress)
    return PositionBias(
        system=system.name, user_id=prepared.split.user_id, preset=prepared.prompt.preset,
        letters=prepared.prompt.letters, item_ids=prepared.candidates.item_ids,
        item_texts=prepared.candidate_texts, target_index=prepared.candidates.target_index, orders=tuple(orders),
        position_probs=letter_probs(scores), letter_mass=np.array([score.letter_mass for score in scores]))


def position_bias(inspector: Inspector, user_id: str, settings: InspectSettings,
                  system: str | ResolvedSystem = BASE,
                  spec: OrderSpec = OrderSpec(), *, batch_size: int | None = None,
                  progress: ProgressCallback | None = None, cancel: CancelCheck = None) -> PositionBias:
    """Score one user's candidates under every order of `spec`, in chunks with a stop check between them."""
    resolved = inspector.resolve(system, settings)
    prepared = inspector.prepare(user_id, resolved.settings)
    return _position_bias_prepared(inspector, prepared, resolved.settings, resolved, spec, batch_size, cancel,
                                   progress)


@dataclass(frozen=True, eq=False)
class PositionBiasSummary:
    """Position bias over many users: where the probability goes by letter, and what debiasing buys."""

    system: str
    users: tuple[PositionBias, ...]

    @property
    def letters(self) -> tuple[str, ...]:
        return self.users[0].letters

    @property
    def uniform(self) -> float:
        return 1.0 / len(self.letters)

    @property
    def mass_by_letter(self) -> np.ndarray:
        """Mean probability at each letter position over all users and orders (uniform = 1/N)."""
        return np.concatenate([user.position_probs for user in self.users]).mean(axis=0)

    @property
    def top1_share(self) -> np.ndarray:
        """Share of all scored prompts (users × orders) whose top-1 stands at each letter."""
        positions = np.concatenate([user.top1_positions for user in self.users])
        return np.bincount(positions, minlength=len(self.letters)) / len(positions)

    @property
    def top1_a_rate(self) -> float:
        """How often the top-1 is the first letter, whatever item stands there (uniform = 1/N)."""
        return float(self.top1_share[0])

    @property
    def mean_stability(self) -> float:
        values = [user.stability for user in self.users if not math.isnan(user.stability)]
        return float(np.mean(values)) if values else math.nan

    def per_user_frame(self) -> pd.DataFrame:
        rows = []
        for user in self.users:
            target = user.target_index
            ranks = [rank for rank in user.truth_ranks if rank is not None]
            rows.append({
                "user_id": user.user_id, "system": self.system, "rank": user.rank_original,
                "rank_debiased": user.rank_debiased,
                "mean_rank_over_orders": float(np.mean(ranks)) if ranks else None,
                "truth_probability": None if target is None else float(user.item_probs[0, target]),
                "truth_debiased": None if target is None else float(user.debiased[target]),
                "top1_letter": user.letters[int(user.top1_positions[0])], "stability": user.stability})
        return pd.DataFrame(rows, columns=[
            "user_id", "system", "rank", "rank_debiased", "mean_rank_over_orders", "truth_probability",
            "truth_debiased", "top1_letter", "stability"])

    def metrics(self) -> dict[str, dict[str, float]]:
        """Mean metrics as shown, with debiased scores, and averaged over all orders."""
        return {
            "original": mean_metrics([user.rank_original for user in self.users]),
            "debiased": mean_metrics([user.rank_debiased for user in self.users]),
            "over_orders": {name: float(np.mean([user.metrics()["over_orders"][name] for user in self.users]))
                            for name in METRIC_NAMES},
        }

    def debiased_difference(self, metric: str = "NDCG@10", *, seed: int = 0) -> PairedDifference:
        """Debiased minus original, paired over users with a bootstrap interval."""
        if metric not in METRIC_NAMES:
            raise ValueError(f"metric {metric!r} is not one of {', '.join(METRIC_NAMES)}")
        original = [metrics_at(user.rank_original)[metric] for user in self.users]
        debiased = [metrics_at(user.rank_debiased)[metric] for user in self.users]
        return paired_bootstrap(original, debiased, seed=seed)

    def to_json(self) -> dict[str, Any]:
        difference = self.debiased_difference()
        return {
            "system": self.system, "users": len(self.users), "letters": list(self.letters),
            "orders_per_user": len(self.users[0].orders), "uniform": self.uniform,
            "mass_by_letter": self.mass_by_letter.tolist(), "top1_share": self.top1_share.tolist(),
            "top1_a_rate": self.top1_a_rate, "mean_stability": _finite(self.mean_stability),
            "metrics": self.metrics(),
            "debiased_minus_original_ndcg10": {
                "difference": difference.difference, "low": difference.low, "high": difference.high,
                "improved": difference.improved, "unchanged": difference.unchanged,
                "worsened": difference.worsened},
            "per_user": _records(self.per_user_frame()),
        }


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    """Rows as plain dicts, NaN as None: JSON has no NaN."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def position_bias_over_users(inspector: Inspector, users: Sequence[str], settings: InspectSettings,
                             system: str | ResolvedSystem = BASE, spec: OrderSpec = OrderSpec(), *,
                             batch_size: int | None = None, progress: ProgressCallback | None = None,
                             cancel: CancelCheck = None) -> PositionBiasSummary:
    """Position bias for each user, summarised over all of them; a stop request is honoured between chunks."""
    if not users:
        raise ValueError("no users to diagnose: pass at least one user id")
    check_limit("diagnostic_users", len(users))
    resolved = inspector.resolve(system, settings)
    effective = resolved.settings
    orders_per_user = effective.candidates.count if spec.mode == "rotations" else spec.count
    check_limit("diagnostic_prompts", len(users) * orders_per_user)
    results = []
    for done, user_id in enumerate(users):
        checkpoint("position bias over users", done, len(users), progress=progress, cancel=cancel)
        prepared = inspector.prepare(user_id, effective)
        results.append(_position_bias_prepared(inspector, prepared, effective, resolved, spec, batch_size, cancel))
    checkpoint("position bias over users", len(users), len(users), progress=progress)
    return PositionBiasSummary(resolved.name, tuple(results))
