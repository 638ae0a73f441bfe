"""Baselines score the very candidates the LLM sees, with the same metrics and paired CIs."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_toy_dataset

from rerank_core.baselines import BASELINE_PRESET, evaluate_baseline, random_expected_metrics, with_baselines
from rerank_core.candidates import CandidateConfig, CandidateSampler
from rerank_core.compare import compare_systems, comparison_table
from rerank_core.data.dataset import Dataset, Item
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.prompts import get_preset


def test_random_is_the_exact_expected_value_over_ranks() -> None:
    expected = random_expected_metrics(20)
    assert expected["Recall@10"] == pytest.approx(0.5)
    assert expected["MRR@1"] == pytest.approx(1 / 20)
    assert expected["NDCG@10"] == pytest.approx(sum(1 / math.log2(rank + 1) for rank in range(1, 11)) / 20)
    with pytest.raises(ValueError):
        random_expected_metrics(0)


def popularity_dataset() -> Dataset:
    """Item p is in every training sequence, q in two, the rest once; each user's test target is known."""
    items = {name: Item(name, f"Title {name}") for name in ("p", "q", "a", "b", "c", "d", "e", "f")}
    sequences = {"u1": ["p", "q", "a", "x1", "b"], "u2": ["p", "q", "c", "x2", "q"], "u3": ["p", "d", "e", "x3", "f"]}
    items.update({name: Item(name, name) for name in ("x1", "x2", "x3", "y1", "y2", "y3", "y4", "y5", "y6")})
    return Dataset("pop", items, sequences)


def test_popularity_counts_training_interactions_and_breaks_ties_pessimistically() -> None:
    dataset = popularity_dataset()
    config = CandidateConfig(source="random", count=8, seed=0)
    sampler = CandidateSampler(dataset, config)
    assert sampler.popularity(["p", "q", "a", "x1", "b", "f"]).tolist() == [3, 2, 1, 0, 0, 0]
    frame = evaluate_baseline(dataset, dataset.users, "test", config, "popularity").set_index("user_id")
    assert set(frame["preset"]) == {BASELINE_PRESET}
    for user in dataset.users:
        split = dataset.split_user(user, "test")
        candidates = sampler.for_split(split)
        counts = sampler.popularity(candidates.item_ids)
        truth = counts[candidates.target_index]
        # Every candidate with as many training interactions as the truth ranks before it.
        assert frame.loc[user, "rank"] == int(np.count_nonzero(counts >= truth))
    # u2's test target q (2 interactions) beats every negative (p is u2's own, so never a negative);
    # u1's target b was never trained on: it ties with every other unseen item and ranks last.
    assert (frame.loc["u2", "rank"], frame.loc["u1", "rank"]) == (1, 8)


def test_title_count_writes_the_popularity_baseline_counts_into_the_item_text() -> None:
    dataset = popularity_dataset()
    sampler = CandidateSampler(dataset, CandidateConfig(source="random", count=8, seed=0))
    # Hand-worked: p in all three training parts, q in two (u2's second q is its test target), b is u1's test
    # target and x1 its validation target, so neither is counted.
    assert [dataset.text(item, "title_count") for item in ("p", "q", "b", "x1")] == [
        "Title p, 3 interactions", "Title q, 2 interactions", "Title b, 0 interactions", "x1, 0 interactions"]
    for item in dataset.items:
        assert dataset.text(item, "title_count") == (
            f"{dataset.text(item)}, {int(sampler.popularity([item])[0])} interactions")
    with pytest.raises(ValueError, match="text field 'plot'"):
        dataset.text("p", "plot")


def test_retriever_baseline_reproduces_the_retriever_order() -> None:
    dataset = make_toy_dataset(users=20, items=60, length=12)
    config = CandidateConfig(source="retriever", count=10, seed=0, order="retriever")
    sampler = CandidateSampler(dataset, config)
    frame = evaluate_baseline(dataset, dataset.users, "test", config, "retriever").set_index("user_id")
    for user in dataset.users:
        split = dataset.split_user(user, "test")
        candidates = sampler.for_split(split)
        scores = sampler.retriever_scores(split.history, candidates.item_ids)
        assert np.all(np.diff(scores) <= 0)  # the retriever lists candidates best first
        if candidates.target_index is None:
            assert math.isnan(frame.loc[user, "rank"]) and frame.loc[user, "NDCG@10"] == 0.0
        else:
            assert frame.loc[user, "rank"] >= candidates.target_index + 1  # ties count against the truth
    # On random candidates the retriever baseline still scores with the retriever's tables.
    shuffled = evaluate_baseline(dataset, dataset.users, "test", CandidateConfig(count=10), "retriever")
    assert shuffled["rank"].notna().all()
    with pytest.raises(ValueError, match="not one of"):
        evaluate_baseline(dataset, dataset.users, "test", config, "oracle")


def test_baselines_join_the_comparison_and_any_run_can_be_the_reference(tiny_smol) -> None:
    dataset = make_toy_dataset(users=12, items=60, length=8)
    inspector = Inspector(dataset, tiny_smol)
    settings = InspectSettings(preset=get_preset("seed_after"), candidates=CandidateConfig(count=6),
                               max_prompt_tokens=400)
    users = dataset.users[:10]
    per_user, summary = compare_systems(inspector, users, settings, ["base"])
    names = ["random", "popularity", "retriever"]
    joined, with_rows = with_baselines(inspector, per_user, summary, users, settings, names)
    assert list(dict.fromkeys(joined["system"])) == ["base", *names]
    assert (joined.groupby("system")["user_id"].apply(list) == [users] * 4).all()
    ndcg = with_rows[with_rows.metric == "NDCG@10"].set_index("system")
    assert ndcg.loc["random", "mean"] == pytest.approx(random_expected_metrics(6)["NDCG@10"])
    assert set(ndcg["reference"]) == {"base"} and math.isnan(ndcg.loc["base", "difference"])
    assert ndcg.loc["popularity", "difference"] == pytest.approx(
        ndcg.loc["popularity", "mean"] - ndcg.loc["base", "mean"])
    assert "| popularity | baseline |" in comparison_table(with_rows)

    _, against_pop = with_baselines(inspector, per_user, summary, users, settings, names, reference="popularity")
    flipped = against_pop[against_pop.metric == "NDCG@10"].set_index("system")
    assert set(flipped["reference"]) == {"popularity"} and math.isnan(flipped.loc["popularity", "difference"])
    assert flipped.loc["base", "difference"] == pytest.approx(-ndcg.loc["popularity", "difference"])

    with pytest.raises(ValueError, match="not one of the runs"):
        with_baselines(inspector, per_user, summary, users, settings, names, reference="oracle")
    with pytest.raises(ValueError, match="repeat"):
        with_baselines(inspector, per_user, summary, users, settings, ["random", "random"])


def test_an_unknown_baseline_on_the_command_line_stops_before_loading(capsys: pytest.CaptureFixture[str]) -> None:
    from rerank_core.cli.main import main

    assert main(["eval", "--baselines", "popularity,oracle", "--users", "1"]) == 2
    assert "--baselines: oracle is not one of random, popularity, retriever (or none)" in capsys.readouterr().err
