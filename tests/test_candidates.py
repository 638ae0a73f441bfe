"""Candidate sources: determinism, exclusion of touched items, popularity bias and the retriever."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

import rerank_core.candidates as candidates_module
from rerank_core.candidates import CandidateConfig, CandidateSampler, CandidateSet
from rerank_core.data.dataset import Dataset, Item

ROOT = Path(__file__).resolve().parent.parent


def make_dataset(n_items: int = 60, n_users: int = 30) -> Dataset:
    """Users walk overlapping stretches of the catalogue, so every user touches 8 items."""
    items = {f"i{n}": Item(f"i{n}", f"Title {n}") for n in range(n_items)}
    sequences = {f"u{u}": [f"i{(u * 2 + step) % n_items}" for step in range(8)] for u in range(n_users)}
    return Dataset(name="toy", items=items, sequences=sequences)


def sample(source: str, user: str = "u3", split: str = "test", seed: int = 0,
           count: int = 10) -> CandidateSet:
    dataset = make_dataset()
    sampler = CandidateSampler(dataset, CandidateConfig(source=source, count=count, seed=seed))
    return sampler.for_split(dataset.split_user(user, split))


@pytest.mark.parametrize("source", ["random", "popular", "retriever"])
def test_same_inputs_same_candidates(source: str) -> None:
    assert sample(source) == sample(source)
    assert sample(source, seed=1) != sample(source) or source == "retriever"


def test_candidates_repeat_in_another_process() -> None:
    script = ("import json; from tests.test_candidates import sample; "
              "print(json.dumps([list(sample(s).item_ids) for s in ('random', 'popular', 'retriever')]))")
    # A different hash seed would change str hashes: the candidates must not depend on them.
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": "12345"}
    output = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True,
                            text=True, check=True).stdout
    assert json.loads(output) == [list(sample(s).item_ids) for s in ("random", "popular", "retriever")]


@pytest.mark.parametrize("source", ["random", "popular"])
@pytest.mark.parametrize("split", ["validation", "test"])
def test_negatives_exclude_every_touched_item(source: str, split: str) -> None:
    dataset = make_dataset()
    for seed in range(20):
        sampler = CandidateSampler(dataset, CandidateConfig(source=source, count=30, seed=seed))
        for user in ("u0", "u7"):
            user_split = dataset.split_user(user, split)
            candidates = sampler.for_split(user_split)
            assert len(candidates.item_ids) == 30 == len(set(candidates.item_ids))
            assert candidates.item_ids[candidates.target_index] == user_split.target
            others = set(candidates.item_ids) - {user_split.target}
            # Includes the test item when the split is validation: a future item is no negative.
            assert not others & dataset.touched(user)


@pytest.mark.parametrize("source", ["random", "popular", "retriever"])
def test_training_samples_exclude_touched_and_future_items(source: str) -> None:
    dataset = make_dataset()
    sampler = CandidateSampler(dataset, CandidateConfig(source=source, count=20))
    sequence = dataset.training_sequence("u5")
    candidates = sampler.for_training("u5", sequence[:3], sequence[3], sample_key="3")
    assert candidates.item_ids[candidates.target_index] == sequence[3]
    assert len(set(candidates.item_ids)) == 20
    assert not (set(candidates.item_ids) - {sequence[3]}) & dataset.touched("u5")
    assert candidates == sampler.for_training("u5", sequence[:3], sequence[3], sample_key="3")


def test_target_position_is_spread() -> None:
    dataset = make_dataset()
    sampler = CandidateSampler(dataset, CandidateConfig(source="random", count=5))
    sequence = dataset.training_sequence("u1")
    samples = [sampler.for_training("u1", sequence[:2], sequence[2], sample_key=str(k)) for k in range(500)]
    positions = Counter(candidates.target_index for candidates in samples)
    assert set(positions) == set(range(5))
    assert min(positions.values()) > 60


def test_popular_items_are_drawn_more_often() -> None:
    items = {f"i{n}": Item(f"i{n}", f"Title {n}") for n in range(50)}
    # Every user trains on i5..i9; their validation and test items (i10..i39) never count.
    sequences = {f"u{u}": ["i5", "i6", "i7", "i8", "i9", f"i{10 + u}", f"i{11 + u}"] for u in range(29)}
    sequences["probe"] = ["i0", "i1", "i2"]
    dataset = Dataset(name="skewed", items=items, sequences=sequences)
    drawn: dict[str, Counter[str]] = {}
    for source in ("random", "popular"):
        sampler = CandidateSampler(dataset, CandidateConfig(source=source, count=4))
        samples = [sampler.for_training("probe", ["i0"], "i1", sample_key=str(key)) for key in range(300)]
        drawn[source] = Counter(item for candidates in samples for item in candidates.item_ids)
    head = [f"i{n}" for n in range(5, 10)]
    tail = [f"i{n}" for n in range(40, 45)]
    popular_head = sum(drawn["popular"][i] for i in head)
    assert popular_head > 5 * sum(drawn["popular"][i] for i in tail)
    assert popular_head > 3 * sum(drawn["random"][i] for i in head)


def test_user_touching_most_of_the_catalogue_uses_fallback() -> None:
    items = {f"i{n}": Item(f"i{n}", f"Title {n}") for n in range(12)}
    sequences = {"heavy": [f"i{n}" for n in range(9)], "light": ["i0", "i1", "i2"]}
    dataset = Dataset(name="small", items=items, sequences=sequences)
    for source in ("random", "popular"):
        sampler = CandidateSampler(dataset, CandidateConfig(source=source, count=4))
        candidates = sampler.for_split(dataset.split_user("heavy"))
        assert sorted(set(candidates.item_ids) - {"i8"}) == ["i10", "i11", "i9"]


def test_retriever_ranks_strong_transition_first() -> None:
    items = {f"i{n}": Item(f"i{n}", f"Title {n}") for n in range(30)}
    # In training, "i1" is nearly always followed by "i2"; "i9" is the most popular item overall.
    sequences = {f"u{u}": ["i9", "i9", f"i{10 + u}", "i1", "i2", "i9", "i5", "i6"] for u in range(15)}
    sequences["probe"] = ["i9", "i1", "i2", "i3"]
    dataset = Dataset(name="chain", items=items, sequences=sequences)
    ranked = CandidateSampler(dataset, CandidateConfig(source="retriever", count=5, order="retriever"))
    candidates = ranked.for_split(dataset.split_user("probe", "validation"))
    assert candidates.item_ids[0] == "i2" and candidates.target_index == 0
    assert "i1" not in candidates.item_ids and "i9" not in candidates.item_ids  # history is excluded
    missed = ranked.for_split(dataset.split_user("probe", "test"))
    assert missed.target_index is None and len(missed.item_ids) == 5
    shuffled = CandidateSampler(dataset, CandidateConfig(source="retriever", count=5))
    assert sorted(shuffled.for_split(dataset.split_user("probe", "validation")).item_ids) \
        == sorted(candidates.item_ids)


def test_config_errors_name_the_field() -> None:
    with pytest.raises(ValueError, match="count"):
        CandidateConfig(count=53)
    with pytest.raises(ValueError, match="count"):
        CandidateConfig(count=0)
    with pytest.raises(ValueError, match="source"):
        CandidateConfig(source="nearest")
    with pytest.raises(ValueError, match="order 'retriever' needs source"):
        CandidateConfig(source="random", order="retriever")


def test_catalogue_too_small() -> None:
    items = {f"i{n}": Item(f"i{n}", f"Title {n}") for n in range(10)}
    dataset = Dataset(name="tiny", items=items, sequences={"u1": [f"i{n}" for n in range(8)]})
    with pytest.raises(ValueError, match="larger than the 10 items"):
        CandidateSampler(dataset, CandidateConfig(count=11))
    sampler = CandidateSampler(dataset, CandidateConfig(count=5))
    with pytest.raises(ValueError, match=r"user 'u1': 8 touched items leave 2 of the 10 items.*at most 3"):
        sampler.for_split(dataset.split_user("u1"))
    with pytest.raises(KeyError, match="not in dataset tiny"):
        sampler.for_training("nobody", ["i1"], "i2", sample_key="0")


def test_retriever_dense_and_sparse_scoring_agree(monkeypatch: pytest.MonkeyPatch) -> None:
    dataset = make_dataset()
    results = []
    for share in (0.0, float("inf")):  # always dense, never dense
        monkeypatch.setattr(candidates_module, "_DENSE_SHARE", share)
        sampler = CandidateSampler(dataset, CandidateConfig(source="retriever", count=12, order="retriever"))
        results.append([sampler.for_split(dataset.split_user(user)) for user in dataset.users])
    assert results[0] == results[1]


def test_training_reads_each_users_touched_items_once(monkeypatch: pytest.MonkeyPatch) -> None:
    """for_training runs once per sample (every prefix of a sequence): the touched set is built once per user."""
    dataset = make_dataset()
    sampler = CandidateSampler(dataset, CandidateConfig(source="random", count=10))
    calls: list[str] = []
    touched = dataset.touched
    monkeypatch.setattr(dataset, "touched", lambda user: calls.append(user) or touched(user))
    sequence = dataset.training_sequence("u5")
    first = [sampler.for_training("u5", sequence[:end], sequence[end], sample_key=str(end)) for end in (2, 3, 4)]
    assert calls == ["u5"]
    fresh = CandidateSampler(dataset, CandidateConfig(source="random", count=10))
    assert first == [fresh.for_training("u5", sequence[:end], sequence[end], sample_key=str(end)) for end in (2, 3, 4)]
