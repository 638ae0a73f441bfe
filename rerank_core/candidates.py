"""Where candidates come from: seeded random or popular negatives, or a sequential retriever's top-k."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from rerank_core.data.dataset import Dataset, UserSplit
from rerank_core.limits import LIMITS, check_limit

__all__ = [
    "CANDIDATE_ORDERS",
    "CANDIDATE_SOURCES",
    "MAX_CANDIDATES",
    "CandidateConfig",
    "CandidateSampler",
    "CandidateSet",
]

CANDIDATE_SOURCES = ("random", "popular", "retriever")
CANDIDATE_ORDERS = ("shuffled", "retriever")
# Letters A-Z then a-z label the candidates, so a prompt can hold at most 52.
MAX_CANDIDATES = LIMITS["candidates"].high

# Retriever constants. The most recent items say most about the next one (sequential
# recommendation), so the last few history items vote with halving weights.
_RECENT_ITEMS = 3
_RECENCY_DECAY = 0.5
# Co-occurrence within a short window only fills in where next-item transitions are
# missing, so it is scaled well below a transition of the same probability.
_COOCCURRENCE_WINDOW = 5
_COOCCURRENCE_WEIGHT = 0.1
# Once the pooled neighbours reach this share of the catalogue, scoring it all beats sorting them.
_DENSE_SHARE = 0.25
# Popularity is the back-off for items no history item points to (and breaks ties).
_POPULARITY_WEIGHT = 0.01
# Rejection sampling stays linear while at most this share of draws gets rejected;
# beyond it (a user who touched most of the catalogue) we list the allowed items once.
_MAX_REJECTED_SHARE = 0.5


@dataclass(frozen=True)
class CandidateConfig:
    """How candidates are built; order "retriever" keeps the retriever's ranking (LlamaRec's eval)."""

    source: str = "random"
    count: int = 20
    seed: int = 0
    order: str = "shuffled"

    def __post_init__(self) -> None:
        if self.source not in CANDIDATE_SOURCES:
            raise ValueError(f"candidate source {self.source!r} is not one of {', '.join(CANDIDATE_SOURCES)}")
        if self.order not in CANDIDATE_ORDERS:
            raise ValueError(f"candidate order {self.order!r} is not one of {', '.join(CANDIDATE_ORDERS)}")
        if self.order == "retriever" and self.source != "retriever":
            raise ValueError(f"candidate order 'retriever' needs source 'retriever', not {self.source!r}: "
                             "use order 'shuffled' for random or popular candidates")
        # A widget's 20.0 or "20" becomes 20; empty, fractional or out-of-range values are refused by name.
        object.__setattr__(self, "count", check_limit("candidates", self.count))
        object.__setattr__(self, "seed", check_limit("candidate_seed", self.seed))


@dataclass(frozen=True)
class CandidateSet:
    """The candidates shown to the model, and where the target sits (None: the retriever missed it)."""

    item_ids: tuple[str, ...]
    target_index: int | None


class CandidateSampler:
    """Builds candidate sets for one dataset and config; popularity and the retriever are built once."""

    def __init__(self, dataset: Dataset, config: CandidateConfig) -> None:
        if not isinstance(config, CandidateConfig):
            raise TypeError(f"config must be a CandidateConfig, got {type(config).__name__}")
        if config.count > len(dataset.items):
            raise ValueError(f"candidate count {config.count} is larger than the {len(dataset.items)} items "
                             f"of dataset {dataset.name}: lower the count")
        self.dataset = dataset
        self.config = config
        # A sorted catalogue makes index-based draws identical in every process.
        self._ids: list[str] = sorted(dataset.items)
        self._index = {item_id: i for i, item_id in enumerate(self._ids)}
        self._touched_by_user: dict[str, frozenset[int]] = {}
        training = [np.fromiter((self._index[item] for item in dataset.training_sequence(user)),
                                dtype=np.int64) for user in dataset.users]
        counts = np.array([dataset.training_counts[item] for item in self._ids], dtype=np.float64)
        # Add-one smoothing: an item never seen in training can still be drawn as a popular negative.
        self._weights = counts + 1.0
        self._cumulative = np.cumsum(self._weights)
        self._back_off = _POPULARITY_WEIGHT * counts / max(counts.sum(), 1.0)
        # Most popular first, ties by catalogue order: the retriever's deterministic back-off list.
        self._by_popularity = np.lexsort((np.arange(len(self._ids)), -counts))
        self._training = training
        self._tables: tuple[_Neighbours, _Neighbours] | None = None
        if config.source == "retriever":
            self._neighbour_tables()

    def for_split(self, split: UserSplit) -> CandidateSet:
        """Eval/inspection candidates for a user's validation or test target."""
        rng = self._rng(split.user_id, f"split:{split.split}")
        if self.config.source == "retriever":
            history = {self._index[item] for item in split.history}
            self._check_room(split.user_id, len(history), self.config.count, "history")
            ranked = [self._ids[i] for i in self._retrieve(split.history, history, self.config.count)]
            if self.config.order == "shuffled":
                ranked = [ranked[i] for i in rng.permutation(len(ranked))]
            target_index = ranked.index(split.target) if split.target in ranked else None
            return CandidateSet(tuple(ranked), target_index)
        excluded = self._touched(split.user_id)
        return self._with_target(split.target, self._negatives(split.user_id, excluded, rng), rng)

    def for_training(self, user_id: str, history: Sequence[str], target: str,
                     sample_key: str) -> CandidateSet:
        """A training sample's candidates, always shuffled: the target plus random or popular negatives, or the
        retriever's top `count` for this history as evaluation sees them (hard negatives), the target NOT forced
        in (target_index None when the retriever misses it: build_training_samples drops that sample)."""
        # Even with order "retriever" training shuffles: a fixed target position would teach the letter.
        rng = self._rng(user_id, f"train:{sample_key}")
        history_indices = {self._index[item] for item in history}
        if self.config.source == "retriever":
            # As in evaluation the history is never proposed; the user's other items (later ones, validation and
            # test targets) are not negatives either. The target may be retrieved unless it is in the history.
            excluded = (self._touched(user_id) - {self._index[target]}) | history_indices
            self._check_room(user_id, len(excluded), self.config.count, "touched items")
            ranked = [self._ids[i] for i in self._retrieve(history, excluded, self.config.count)]
            ranked = [ranked[i] for i in rng.permutation(len(ranked))]
            return CandidateSet(tuple(ranked), ranked.index(target) if target in ranked else None)
        excluded = self._touched(user_id) | history_indices | {self._index[target]}
        return self._with_target(target, self._negatives(user_id, excluded, rng), rng)

    def popularity(self, item_ids: Sequence[str]) -> np.ndarray:
        """Interaction counts in the training part of the split (everything before validation)."""
        return self._weights[[self._index[item] for item in item_ids]] - 1.0  # undo the add-one smoothing

    def retriever_scores(self, history: Sequence[str], item_ids: Sequence[str]) -> np.ndarray:
        """The retriever's score of each given item after this history: ranking by it is the retriever's order."""
        pooled, weights = self._neighbour_votes(history)
        score = self._back_off + np.bincount(pooled, weights=weights, minlength=len(self._ids))
        return score[[self._index[item] for item in item_ids]]

    def _neighbour_tables(self) -> tuple[_Neighbours, _Neighbours]:
        """Next-item transitions and windowed co-occurrence, built on first use (once per sampler)."""
        if self._tables is None:
            size = len(self._ids)
            self._tables = (
                _Neighbours.build(self._training, size, lags=(1,), symmetric=False),
                _Neighbours.build(self._training, size, lags=tuple(range(1, _COOCCURRENCE_WINDOW + 1)),
                                  symmetric=True))
        return self._tables

    def _neighbour_votes(self, history: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Items the last few history items point to, with their recency- and table-weighted votes."""
        recent = [self._index[item] for item in reversed(history[-_RECENT_ITEMS:])]
        weights = [_RECENCY_DECAY ** position for position in range(len(recent))]
        transitions, cooccurrence = self._neighbour_tables()
        neighbours, scores = [], []
        for table, scale in ((transitions, 1.0), (cooccurrence, _COOCCURRENCE_WEIGHT)):
            for item, weight in zip(recent, weights, strict=True):
                targets, probabilities = table.row(item)
                neighbours.append(targets)
                scores.append(probabilities * (weight * scale))
        return np.concatenate([np.zeros(0, np.int64), *neighbours]), np.concatenate([np.zeros(0), *scores])

    def _rng(self, user_id: str, purpose: str) -> np.random.Generator:
        # hashlib, not hash(): Python salts str hashes per process, and samples must repeat across runs.
        key = f"{self.config.seed}|{self.config.source}|{user_id}|{purpose}".encode()
        return np.random.default_rng(int.from_bytes(hashlib.sha256(key).digest()[:8], "little"))

    def _touched(self, user_id: str) -> frozenset[int]:
        """Every item the user touched, as catalogue indices; built once per user (training asks per sample)."""
        found = self._touched_by_user.get(user_id)
        if found is None:
            if user_id not in self.dataset.sequences:
                raise KeyError(f"user {user_id!r} is not in dataset {self.dataset.name}: "
                               "pick one of dataset.users")
            found = self._touched_by_user[user_id] = frozenset(
                self._index[item] for item in self.dataset.touched(user_id))
        return found

    def _check_room(self, user_id: str, excluded: int, needed: int, what: str) -> None:
        available = len(self._ids) - excluded
        if available < needed:
            raise ValueError(
                f"user {user_id!r}: {excluded} {what} leave {available} of the {len(self._ids)} items "
                f"as candidates, but {needed} are needed for {self.config.count} candidates: "
                f"lower the candidate count to at most {self.config.count - needed + available}")

    def _with_target(self, target: str, negatives: Sequence[int], rng: np.random.Generator) -> CandidateSet:
        items = [target, *(self._ids[i] for i in negatives)]
        # A full shuffle, not an insert: popular draws come out most-popular-first.
        order = rng.permutation(len(items))
        return CandidateSet(tuple(items[i] for i in order), int(np.flatnonzero(order == 0)[0]))

    def _negatives(self, user_id: str, excluded: set[int], rng: np.random.Generator) -> list[int]:
        needed = self.config.count - 1
        self._check_room(user_id, len(excluded), needed, "touched items")
        popular = self.config.source == "popular"
        total = float(self._cumulative[-1]) if popular else float(len(self._ids))
        # Mass a draw can land on without being usable: the excluded items, then the chosen ones too.
        blocked = float(self._weights[sorted(excluded)].sum()) if popular else float(len(excluded))
        chosen: list[int] = []
        taken = set(excluded)
        # Rejection sampling keeps a user's cost proportional to the count, not the catalogue.
        while len(chosen) < needed and blocked <= _MAX_REJECTED_SHARE * total:
            draws = 2 * (needed - len(chosen)) + 4
            if popular:
                picks = np.searchsorted(self._cumulative, rng.random(draws) * total, side="right")
            else:
                picks = rng.integers(0, len(self._ids), size=draws)
            for pick in picks.tolist():
                if pick not in taken and len(chosen) < needed:
                    taken.add(pick)
                    chosen.append(pick)
                    blocked += float(self._weights[pick]) if popular else 1.0
        if len(chosen) < needed:
            # Most of the catalogue is blocked: list what is left once (linear in the catalogue).
            allowed = np.fromiter((i for i in range(len(self._ids)) if i not in taken), dtype=np.int64)
            weights = self._weights[allowed] / self._weights[allowed].sum() if popular else None
            chosen += rng.choice(allowed, size=needed - len(chosen), replace=False, p=weights).tolist()
        return chosen

    def _retrieve(self, history: Sequence[str], excluded: set[int], k: int) -> list[int]:
        """Top-k item indices not in excluded, scored from the last few history items."""
        pooled, weights = self._neighbour_votes(history)
        if len(pooled) >= _DENSE_SHARE * len(self._ids):
            # Dense neighbourhoods: one catalogue-sized vector is cheaper than sorting the pool.
            pool = np.arange(len(self._ids))
            score = self._back_off + np.bincount(pooled, weights=weights, minlength=len(self._ids))
        else:
            unique, inverse = np.unique(pooled, return_inverse=True)
            # Items no history item points to score popularity only, so the top-k allowed ones among
            # them sit in this prefix of the popularity list: no need to score the whole catalogue.
            pool = np.union1d(unique, self._by_popularity[:k + len(excluded) + len(unique)])
            score = self._back_off[pool]
            summed = np.bincount(inverse, weights=weights, minlength=len(unique))
            score[np.searchsorted(pool, unique)] += summed
        allowed = ~np.isin(pool, np.fromiter(excluded, dtype=np.int64, count=len(excluded)))
        pool, score = pool[allowed], score[allowed]
        if len(pool) > k:
            # Keep everything tied with the k-th score so ties break by catalogue order below.
            best = score >= np.partition(score, len(score) - k)[len(score) - k]
            pool, score = pool[best], score[best]
        return pool[np.lexsort((pool, -score))[:k]].tolist()


@dataclass(frozen=True)
class _Neighbours:
    """Row-normalised sparse counts (CSR layout): P(next or nearby item | item)."""

    starts: np.ndarray
    targets: np.ndarray
    probabilities: np.ndarray

    @classmethod
    def build(cls, sequences: list[np.ndarray], size: int, lags: tuple[int, ...],
              symmetric: bool) -> _Neighbours:
        items = np.concatenate([np.zeros(0, np.int64), *sequences])
        owners = np.repeat(np.arange(len(sequences)), [len(sequence) for sequence in sequences])
        sources, targets = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        for lag in lags:
            # Pairs never cross from one user's sequence into the next one's.
            same_user = owners[:-lag] == owners[lag:]
            earlier, later = items[:-lag][same_user], items[lag:][same_user]
            sources += [earlier, later] if symmetric else [earlier]
            targets += [later, earlier] if symmetric else [later]
        source, target = np.concatenate(sources), np.concatenate(targets)
        keep = source != target  # repeats say nothing about what comes next
        codes, counts = np.unique(source[keep] * size + target[keep], return_counts=True)
        rows, columns = codes // size, codes % size
        totals = np.bincount(rows, weights=counts, minlength=size)
        return cls(np.searchsorted(rows, np.arange(size + 1)), columns, counts / totals[rows])

    def row(self, item: int) -> tuple[np.ndarray, np.ndarray]:
        start, end = self.starts[item], self.starts[item + 1]
        return self.targets[start:end], self.probabilities[start:end]
