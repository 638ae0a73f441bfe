"""Diagnostics no single score shows: position bias, letter prior, history influence, template consistency."""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from rerank_core.alignment import align
from rerank_core.candidates import CandidateSet
from rerank_core.inspector import BASE, Inspector, InspectSettings, PreparedUser
from rerank_core.metrics import (
    METRIC_NAMES,
    PairedDifference,
    metrics_at,
    paired_bootstrap,
    rank_of_truth,
    summarize,
)
from rerank_core.prompts import (
    PromptPreset,
    answer_slot,
    build_prompt,
    encode_rendered,
    get_preset,
    letters_for,
    render_chat,
    render_generation_prompt,
    render_inference,
    render_training,
)
from rerank_core.verbalizer import LetterToken, probe_text, resolve_letters

__all__ = [
    "ORDER_MODES",
    "PRIOR_MODES",
    "HistoryInfluence",
    "LetterMass",
    "LetterPrior",
    "OrderSpec",
    "PositionBias",
    "PositionBiasSummary",
    "TemplateConsistency",
    "TemplateProblem",
    "candidate_orders",
    "history_influence",
    "kendall_tau_b",
    "letter_mass",
    "letter_prior",
    "position_bias",
    "position_bias_over_users",
    "template_consistency",
]

ORDER_MODES = ("rotations", "permutations")
PRIOR_MODES = ("blank", "placeholder")
ProgressCallback = Callable[[int, int], None]
# Tokens shown on each side of a template divergence: enough to see the block that differs.
_WINDOW = 6


# -- shared helpers -------------------------------------------------------------------------


def _kept_history(prepared: PreparedUser) -> tuple[str, ...]:
    """The history items the prompt actually shows (the oldest may have been dropped to fit)."""
    return prepared.split.history[prepared.prompt.dropped_history:]


def _variant(inspector: Inspector, settings: InspectSettings, prepared: PreparedUser, *,
             history_ids: Sequence[str], candidate_ids: Sequence[str], target_index: int | None,
             candidate_texts: Sequence[str] | None = None) -> PreparedUser:
    """The user's prompt with other history or candidates; not re-truncated, so variants differ only there."""
    dataset = inspector.dataset
    history_texts = [dataset.text(item, settings.text_field) for item in history_ids]
    texts = tuple(candidate_texts) if candidate_texts is not None else tuple(
        dataset.text(item, settings.text_field) for item in candidate_ids)
    prompt = build_prompt(inspector.tokenizer, settings.prompt_preset, history_texts, texts, max_prompt_tokens=None)
    token_ids = tuple(encode_rendered(inspector.tokenizer, settings.prompt_preset, prompt.rendered))
    return replace(prepared, candidates=CandidateSet(tuple(candidate_ids), target_index),
                   candidate_texts=texts, prompt=prompt, token_ids=token_ids)


def _probs(scores: Sequence[Any]) -> np.ndarray:
    return np.array([score.letter_probs for score in scores], dtype=np.float64)


def _mean_metrics(ranks: Sequence[int | None]) -> dict[str, float]:
    summary = summarize([metrics_at(rank) for rank in ranks])
    return {name: summary[name] for name in METRIC_NAMES}


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


# -- position bias --------------------------------------------------------------------------


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
        if isinstance(self.count, bool) or not isinstance(self.count, int) or self.count < 1:
            raise ValueError(f"order count must be a positive integer, got {self.count!r}")


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
                "over_orders": _mean_metrics(self.truth_ranks)}

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
                            system: str, spec: OrderSpec, batch_size: int | None) -> PositionBias:
    count = len(prepared.candidates.item_ids)
    orders = candidate_orders(count, spec)
    kept = _kept_history(prepared)
    target = prepared.candidates.target_index
    variants = [prepared]  # the identity: exactly the prompt Inspect shows, so its score is shared
    for order in orders[1:]:
        variants.append(_variant(
            inspector, settings, prepared, history_ids=kept,
            candidate_ids=[prepared.candidates.item_ids[index] for index in order],
            candidate_texts=[prepared.candidate_texts[index] for index in order],
            target_index=None if target is None else order.index(target)))
    # One batch per user: the orders share a length, so padding costs nothing.
    scores = inspector.score_prepared(system, variants, batch_size=batch_size or len(variants))
    return PositionBias(
        system=system, user_id=prepared.split.user_id, preset=prepared.prompt.preset,
        letters=prepared.prompt.letters, item_ids=prepared.candidates.item_ids,
        item_texts=prepared.candidate_texts, target_index=target, orders=tuple(orders),
        position_probs=_probs(scores), letter_mass=np.array([score.letter_mass for score in scores]))


def position_bias(inspector: Inspector, user_id: str, settings: InspectSettings, system: str = BASE,
                  spec: OrderSpec = OrderSpec(), *, batch_size: int | None = None) -> PositionBias:
    """Score one user's candidates under every order of `spec`; all orders run as one batch by default."""
    effective, _ = inspector.settings_for(system, settings)
    prepared = inspector.prepare(user_id, effective)
    return _position_bias_prepared(inspector, prepared, effective, system, spec, batch_size)


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
            "original": _mean_metrics([user.rank_original for user in self.users]),
            "debiased": _mean_metrics([user.rank_debiased for user in self.users]),
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
                             system: str = BASE, spec: OrderSpec = OrderSpec(), *,
                             batch_size: int | None = None,
                             progress: ProgressCallback | None = None) -> PositionBiasSummary:
    """Position bias for each user (one batch per user), summarised over all of them."""
    if not users:
        raise ValueError("no users to diagnose: pass at least one user id")
    effective, _ = inspector.settings_for(system, settings)
    results = []
    for done, user_id in enumerate(users, 1):
        prepared = inspector.prepare(user_id, effective)
        results.append(_position_bias_prepared(inspector, prepared, effective, system, spec, batch_size))
        if progress is not None:
            progress(done, len(users))
    return PositionBiasSummary(system, tuple(results))


# -- letter prior ---------------------------------------------------------------------------


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


def letter_prior(inspector: Inspector, users: Sequence[str], settings: InspectSettings, system: str = BASE,
                 mode: str = "placeholder", *, placeholder: str = "item",
                 progress: ProgressCallback | None = None) -> LetterPrior:
    """Each user's real history, every candidate text blanked ("") or the same placeholder word."""
    if mode not in PRIOR_MODES:
        raise ValueError(f"letter prior mode {mode!r} is not one of {', '.join(PRIOR_MODES)}")
    if not users:
        raise ValueError("no users to diagnose: pass at least one user id")
    effective, _ = inspector.settings_for(system, settings)
    text = "" if mode == "blank" else placeholder
    variants = []
    for done, user_id in enumerate(users, 1):
        prepared = inspector.prepare(user_id, effective)
        variants.append(_variant(
            inspector, effective, prepared, history_ids=_kept_history(prepared),
            candidate_ids=prepared.candidates.item_ids, target_index=prepared.candidates.target_index,
            candidate_texts=[text] * len(prepared.candidate_texts)))
        if progress is not None:
            progress(done, len(users))
    scores = inspector.score_prepared(system, variants)
    return LetterPrior(system=system, preset=variants[0].prompt.preset, mode=mode, placeholder=text,
                       letters=variants[0].prompt.letters, user_ids=tuple(users), probs=_probs(scores),
                       letter_mass=np.array([score.letter_mass for score in scores]))


# -- history influence ----------------------------------------------------------------------


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
        """Row indices of the items whose removal moves the truth most (the distribution, without truth)."""
        delta = self.truth_delta
        strength = self.total_variation if delta is None else np.abs(delta)
        order = sorted(range(len(strength)), key=lambda row: (-strength[row], -self.total_variation[row]))
        return [row for row in order[:count] if strength[row] > 0]

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


def history_influence(inspector: Inspector, user_id: str, settings: InspectSettings, system: str = BASE, *,
                      batch_size: int | None = None) -> HistoryInfluence:
    """Remove each shown history item in turn and re-score; the full prompt and the removals are one batch."""
    effective, _ = inspector.settings_for(system, settings)
    prepared = inspector.prepare(user_id, effective)
    kept = _kept_history(prepared)
    if not kept:
        raise ValueError(f"user {user_id!r}: the prompt shows no history item (all dropped to fit "
                         f"max_prompt_tokens={effective.max_prompt_tokens}); raise the limit or use fewer "
                         "candidates")
    variants = [prepared]
    for row in range(len(kept)):
        variants.append(_variant(
            inspector, effective, prepared, history_ids=kept[:row] + kept[row + 1:],
            candidate_ids=prepared.candidates.item_ids, candidate_texts=prepared.candidate_texts,
            target_index=prepared.candidates.target_index))
    probs = _probs(inspector.score_prepared(system, variants, batch_size=batch_size or len(variants)))
    dropped = prepared.prompt.dropped_history
    return HistoryInfluence(
        system=system, user_id=user_id, preset=prepared.prompt.preset, letters=prepared.prompt.letters,
        candidate_ids=prepared.candidates.item_ids, target_index=prepared.candidates.target_index,
        positions=tuple(range(dropped + 1, dropped + len(kept) + 1)), history_ids=kept,
        history_texts=tuple(inspector.dataset.text(item, effective.text_field) for item in kept),
        full_probs=probs[0], without_probs=probs[1:])


# -- template consistency -------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateProblem:
    """One thing wrong (error) or worth knowing (warning) about how a preset renders, in plain words."""

    severity: str
    kind: str
    message: str


@dataclass(frozen=True)
class TemplateConsistency:
    """Inference vs training rendering of one prompt: prefix, divergence, loss tokens, the answer token."""

    preset: str
    chat: bool
    letter: str
    prompt_ids: tuple[int, ...]
    full_ids: tuple[int, ...]
    diverge_at: int | None
    generation_prompt: str | None  # what add_generation_prompt appends (chat presets only)
    inference_window: tuple[tuple[int, int, str], ...]  # (index, token id, token) around the divergence
    training_window: tuple[tuple[int, int, str], ...]
    loss_tokens: tuple[tuple[int, int, str], ...]  # the tokens after the prompt: training keeps loss on them
    answer_token: tuple[int, int, str] | None  # the token the answer letter becomes in training
    letter_tokens: tuple[LetterToken, ...]  # every letter, seed strategy, audited against as-trained
    problems: tuple[TemplateProblem, ...]

    @property
    def is_prefix(self) -> bool:
        return self.diverge_at is None

    @property
    def ok(self) -> bool:
        return not any(problem.severity == "error" for problem in self.problems)

    @property
    def explanation(self) -> str:
        """A status line, then every problem in plain words."""
        if self.answer_token is not None:
            head = (f"preset {self.preset!r}: the inference prompt ({len(self.prompt_ids)} tokens) is a "
                    f"token prefix of the training conversation; training keeps loss on "
                    f"{len(self.loss_tokens)} token(s) after it, the first being {self.answer_token[2]!r} "
                    f"({self.answer_token[1]}) for the answer letter {self.letter!r}.")
        else:
            head = (f"preset {self.preset!r}: the inference prompt is NOT a token prefix of the training "
                    f"conversation (first difference at token {self.diverge_at}).")
        return "\n".join([head, *(f"{problem.severity}: {problem.message}" for problem in self.problems)])

    def to_json(self) -> dict[str, Any]:
        def tokens(rows: Sequence[tuple[int, int, str]]) -> list[dict[str, Any]]:
            return [{"index": index, "token_id": token_id, "token": token} for index, token_id, token in rows]

        return {
            "preset": self.preset, "chat": self.chat, "letter": self.letter, "ok": self.ok,
            "is_prefix": self.is_prefix, "prompt_tokens": len(self.prompt_ids),
            "full_tokens": len(self.full_ids), "diverge_at": self.diverge_at,
            "generation_prompt": self.generation_prompt, "inference_window": tokens(self.inference_window),
            "training_window": tokens(self.training_window),
            "loss_tokens": tokens(self.loss_tokens),
            "answer_token": None if self.answer_token is None else tokens([self.answer_token])[0],
            "letters": [token.to_json() for token in self.letter_tokens],
            "problems": [{"severity": problem.severity, "kind": problem.kind, "message": problem.message}
                         for problem in self.problems],
            "explanation": self.explanation,
        }


def _token_rows(tokenizer: Any, ids: Sequence[int], start: int,
                stop: int) -> tuple[tuple[int, int, str], ...]:
    return tuple((index, int(ids[index]), str(tokenizer.convert_ids_to_tokens(int(ids[index]))))
                 for index in range(max(0, start), min(len(ids), stop)))


def _generation_prompt(tokenizer: Any, preset: PromptPreset, text: str) -> str | None:
    """What add_generation_prompt appends after the user turn; None for text presets."""
    if not preset.chat:
        return None
    inference = render_generation_prompt(tokenizer, preset, text)
    plain = render_chat(tokenizer, preset, [{"role": "user", "content": text}], False)
    return inference[len(plain):] if inference.startswith(plain) else None


def _mismatch_problem(tokenizer: Any, preset: PromptPreset, text: str, letter: str, diverge_at: int,
                      prompt_ids: Sequence[int], full_ids: Sequence[int]) -> TemplateProblem:
    """Say why the inference prompt is not a token prefix of the training conversation."""
    inference = render_inference(tokenizer, preset, text)
    training = render_training(tokenizer, preset, text, letter)
    if len(full_ids) == len(prompt_ids) and tuple(full_ids) == tuple(prompt_ids):
        return TemplateProblem("error", "no_answer_token", (
            "the training conversation ends where the inference prompt ends: no token follows the prompt, "
            "so there is no answer letter to train or score. The template probably drops the assistant "
            "message."))
    common = os.path.commonprefix([inference, training])  # noqa: RUF071 (strings, not paths)
    if common == inference:
        merged = (tokenizer.convert_ids_to_tokens(int(full_ids[diverge_at]))
                  if diverge_at < len(full_ids) else "")
        return TemplateProblem("error", "letter_merges", (
            f"the training text starts with the inference text, but the tokens differ from token "
            f"{diverge_at}: "
            f"the answer letter {letter!r} merges with the end of the prompt into token {merged!r}. At "
            "inference the prompt's last token is a different one, so the letter token the model learns "
            "never stands where it is scored. End the prompt with a token the letter cannot join (e.g. a "
            "newline) or choose another preset."))
    extra = inference[len(common):]
    continued = training[len(common):len(common) + max(len(extra), 12)]
    where = f"after {common[-30:]!r}"
    generation = _generation_prompt(tokenizer, preset, text)
    if generation and extra and extra in generation:
        block = (f"the chat template's generation prompt ({generation!r}) adds {extra!r}, which the training "
                 "conversation never contains")
    else:
        block = f"the inference rendering has {extra!r} where the training conversation has {continued!r}"
    return TemplateProblem("error", "not_prefix", (
        f"the inference prompt is not a token prefix of the training conversation (first difference at token "
        f"{diverge_at}, {where}): {block}. A model fine-tuned on these conversations learns to answer "
        f"right after {common[-20:]!r}, but at inference it reads {extra!r} first, so the letter "
        "probabilities are read after text training never showed. Make the generation prompt match the "
        "assistant turn's opening (or render training the same way), or choose a text preset."))


def template_consistency(tokenizer: Any, preset: str | PromptPreset, *, text: str | None = None,
                         letter: str = "A", count: int = 20) -> TemplateConsistency:
    """Check a tokenizer and preset without any model: the same renderings training and scoring use."""
    preset = get_preset(preset)
    prompt_text = text if text is not None else probe_text(tokenizer, preset, count)
    alignment = align(tokenizer, preset, prompt_text, letter)
    prompt_ids, full_ids = alignment.prompt_ids, alignment.full_ids
    problems: list[TemplateProblem] = []
    loss_tokens: tuple[tuple[int, int, str], ...] = ()
    answer = None
    if alignment.is_prefix:
        centre = len(prompt_ids)
        loss_tokens = _token_rows(tokenizer, full_ids, len(prompt_ids), len(full_ids))
        answer = loss_tokens[0]
        decoded = tokenizer.decode([answer[1]])
        if decoded.strip() != letter:
            spelled = [tokenizer.decode([row[1]]) for row in loss_tokens]
            at = next((index for index, piece in enumerate(spelled) if piece.strip() == letter), None)
            before = "".join(spelled[:at]) if at is not None else None
            problems.append(TemplateProblem("error", "answer_not_letter", (
                f"the first token training teaches after the prompt is {answer[2]!r} (decodes to "
                f"{decoded!r}), not the letter {letter!r}"
                + (f": the training conversation puts {before!r} between the prompt and the letter, so the "
                   "position scored at inference is trained to emit that, not a letter. Put that text into "
                   "the generation prompt, or strip it from the assistant turn." if before
                   else ": the letter is tokenized together with other text; choose another preset."))))
        elif answer[2] != letter:
            problems.append(TemplateProblem("warning", "letter_with_space", (
                f"the answer letter {letter!r} becomes token {answer[2]!r} (decodes to {decoded!r}): the "
                "template puts a space or word start before the letter, so the bare-letter token that "
                "`convert_tokens_to_ids` finds is not the one training teaches.")))
    else:
        centre = alignment.diverge_at
        problems.append(_mismatch_problem(tokenizer, preset, prompt_text, letter, alignment.diverge_at,
                                          prompt_ids, full_ids))
    slot = answer_slot(tokenizer, preset)
    # The template's own quirks come first: they explain the prompt's end before any letter problem.
    problems[:0] = [TemplateProblem("warning", flag, note) for flag, note in zip(slot.flags, slot.notes(), strict=True)]
    letters = tuple(resolve_letters(tokenizer, preset, letters_for(count), "seed", text=prompt_text))
    not_prefix = [token.letter for token in letters if "template_not_prefix" in token.flags]
    if alignment.is_prefix and not_prefix:
        problems.append(TemplateProblem("error", "letters_not_prefix", (
            f"letters {', '.join(not_prefix)} are not token prefixes of their training conversation: "
            "these letters merge with the prompt's end when appended; the model cannot be trained or scored "
            "on them.")))
    differs = [token.letter for token in letters if "differs_from_as_trained" in token.flags]
    answer_is_letter = not any(problem.kind == "answer_not_letter" for problem in problems)
    if differs and answer_is_letter:
        problems.append(TemplateProblem("warning", "seed_differs", (
            f"for letters {', '.join(differs)} the seed strategy's token is not the token training "
            "teaches: scoring with the 'seed' strategy reads other logits than a fine-tune raises; use "
            "'as_trained'.")))
    shared = [token.letter for token in letters if "shared_id" in token.flags]
    if shared:
        problems.append(TemplateProblem("error", "shared_token", (
            f"letters {', '.join(shared)} map to one token ID: their candidates get identical scores and "
            "cannot be told apart. Use fewer candidates or another tokenizer.")))
    return TemplateConsistency(
        preset=preset.name, chat=preset.chat, letter=letter, prompt_ids=prompt_ids, full_ids=full_ids,
        diverge_at=alignment.diverge_at, generation_prompt=_generation_prompt(tokenizer, preset, prompt_text),
        inference_window=_token_rows(tokenizer, prompt_ids, centre - _WINDOW, centre + _WINDOW),
        training_window=_token_rows(tokenizer, full_ids, centre - _WINDOW, centre + _WINDOW),
        loss_tokens=loss_tokens, answer_token=answer, letter_tokens=letters, problems=tuple(problems))


# -- letter mass over users -----------------------------------------------------------------


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
                systems: Sequence[str] = (BASE,), *, progress: ProgressCallback | None = None) -> LetterMass:
    """Evaluate every user with every system and keep the letter mass (each adapter with its own preset)."""
    if not users:
        raise ValueError("no users to diagnose: pass at least one user id")
    frames = []
    for index, system in enumerate(systems):
        report = None if progress is None else (
            lambda done, total, index=index: progress(index * total + done, total * len(systems)))
        frames.append(inspector.evaluate(users, settings, system, progress=report))
    return LetterMass(pd.concat(frames, ignore_index=True))
