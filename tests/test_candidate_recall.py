"""Candidate recall and the two populations, recomputed by hand on a dataset whose retriever output is known."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from conftest import write_csv_dataset

from rerank_core.baselines import evaluate_baseline, paired_rows, random_expected_metrics
from rerank_core.candidates import CandidateConfig, CandidateSampler
from rerank_core.compare import SUMMARY_COLUMNS, compare_systems, comparison_table
from rerank_core.data.dataset import Dataset, Item
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.metrics import ALL_USERS, AMONG_CANDIDATES, candidate_recall
from rerank_core.prompts import get_preset

# Eight items, every user's history four distinct items: with 4 retriever candidates the retriever lists exactly
# the four items the history leaves (it never proposes a history item), so a target repeated from the history
# (u3, u4) is never among them and every other target is.
SEQUENCES = {"u1": ["a", "b", "c", "d", "e"], "u2": ["b", "c", "d", "e", "a"], "u3": ["a", "b", "c", "d", "a"],
             "u4": ["c", "d", "e", "f", "c"], "u5": ["e", "f", "g", "h", "a"]}
USERS = list(SEQUENCES)
RETRIEVER = CandidateConfig(source="retriever", count=4, seed=0)
# By hand: training parts (the first three items) count a 2, b 3, c 4, d 2, e 2, f 1, g 1, h 0. Popularity ranks
# u1's e (2) above f, g, h: rank 1; u2's a (2) above f, g, h: rank 1; u5's a (2) ties with d (2) below b (3) and
# c (4), ties counting against it: rank 4.
POPULARITY_NDCG = {"u1": 1.0, "u2": 1.0, "u3": 0.0, "u4": 0.0, "u5": 1 / math.log2(5)}
FOUND = ["u1", "u2", "u5"]


def known_dataset() -> Dataset:
    return Dataset("known", {name: Item(name, f"Film {name}") for name in "abcdefgh"}, SEQUENCES)


def test_the_retriever_holds_exactly_the_items_the_history_leaves() -> None:
    dataset = known_dataset()
    sampler = CandidateSampler(dataset, RETRIEVER)
    for user in USERS:
        split = dataset.split_user(user, "test")
        candidates = sampler.for_split(split)
        assert set(candidates.item_ids) == set("abcdefgh") - set(split.history)
        assert (candidates.target_index is not None) == (user in FOUND)


def test_recall_and_both_populations_match_the_hand_count() -> None:
    dataset = known_dataset()
    frames = {name: evaluate_baseline(dataset, USERS, "test", RETRIEVER, name) for name in ("random", "popularity")}
    popularity = frames["popularity"].set_index("user_id")
    assert popularity["target_in_candidates"].tolist() == [user in FOUND for user in USERS]
    # A missed target keeps rank None and every metric 0.
    assert popularity.loc[["u3", "u4"], "rank"].isna().all() and (popularity.loc[["u3", "u4"], "NDCG@10"] == 0).all()
    assert popularity["NDCG@10"].to_dict() == pytest.approx(POPULARITY_NDCG)

    per_user = pd.concat(frames.values(), ignore_index=True)
    recall = candidate_recall(per_user, "retriever", 4)
    assert (recall.found, recall.users, recall.share, recall.complete) == (3, 5, 0.6, False)
    assert "3 of 5 users" in recall.describe() and recall.to_json()["recall"] == 0.6

    rows = {(row["population"], row["metric"]): row
            for row in paired_rows(per_user, USERS, "popularity", "random", SUMMARY_COLUMNS, 500, 0)}
    random_ndcg = random_expected_metrics(4)["NDCG@10"]
    overall, subset = rows[(ALL_USERS, "NDCG@10")], rows[(AMONG_CANDIDATES, "NDCG@10")]
    assert (overall["n"], subset["n"]) == (5, 3)
    assert overall["mean"] == pytest.approx(sum(POPULARITY_NDCG.values()) / 5)
    assert overall["reference_mean"] == pytest.approx(3 * random_ndcg / 5)
    assert subset["mean"] == pytest.approx(sum(POPULARITY_NDCG[user] for user in FOUND) / 3)
    assert subset["reference_mean"] == pytest.approx(random_ndcg)
    # Paired over the same three users: the difference of their means, the misses (0 and 0) left out.
    assert subset["difference"] == pytest.approx(subset["mean"] - random_ndcg)
    assert subset["ci_low"] <= subset["difference"] <= subset["ci_high"]
    assert (subset["improved"], subset["worsened"]) == (2, 1)  # u5's rank 4 is below random's expected 2.5
    # LlamaRec's "overall" at K <= 20 is the all-users mean: the subset's weighted by its share, misses at 0.
    assert overall["mean"] == pytest.approx(subset["mean"] * recall.share)


def test_random_candidates_show_one_population() -> None:
    dataset = known_dataset()
    config = CandidateConfig(count=4, seed=0)
    frame = evaluate_baseline(dataset, USERS, "test", config, "popularity")
    assert frame["target_in_candidates"].all()
    recall = candidate_recall(frame, "random", 4)
    assert recall.complete and "one population shown" in recall.describe()
    rows = paired_rows(frame, USERS, "popularity", "popularity", SUMMARY_COLUMNS, 100, 0)
    assert {row["population"] for row in rows} == {ALL_USERS}


def test_compare_labels_both_populations_on_retriever_candidates(tiny_smol) -> None:
    from rerank_app import views

    inspector = Inspector(known_dataset(), tiny_smol)
    settings = InspectSettings(preset=get_preset("seed_after"), candidates=RETRIEVER, max_prompt_tokens=400)
    per_user, summary = compare_systems(inspector, USERS, settings, ["base"], bootstrap_samples=200)
    assert per_user.set_index("user_id")["target_in_candidates"].to_dict() == {user: user in FOUND for user in USERS}
    ndcg = summary[summary.metric == "NDCG@10"].set_index("population")
    base = per_user.set_index("user_id")["NDCG@10"]
    assert ndcg.loc[ALL_USERS, "mean"] == pytest.approx(base.mean())
    assert ndcg.loc[AMONG_CANDIDATES, "mean"] == pytest.approx(base[FOUND].mean())
    assert ndcg.loc[AMONG_CANDIDATES, "n"] == 3
    table = comparison_table(summary)
    assert "| population | users |" in table and f"| {AMONG_CANDIDATES} | 3 |" in table
    recall = candidate_recall(per_user, "retriever", 4)
    view = views.compare_view(per_user, summary, recall=recall)
    # The app's N-user view opens with the recall and lists both populations.
    assert view.counts.startswith("**Candidate recall 0.600: the target is among the 4 retriever candidates for "
                                  "3 of 5 users")
    assert set(view.metrics["population"]) == {ALL_USERS, AMONG_CANDIDATES}


def test_eval_summary_json_has_the_recall_and_both_populations(tiny_model_folder, tmp_path) -> None:
    from rerank_core.cli.main import main

    data = write_csv_dataset(known_dataset(), tmp_path / "data")
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(tiny_model_folder), "--data", str(data), "--users", "0", "--candidates",
                 "4", "--candidate-source", "retriever", "--output-dir", str(out), "--dtype", "fp32"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["candidate_recall"] == {"source": "retriever", "candidates": 4, "users": 5,
                                           "target_among_candidates": 3, "recall": 0.6, "populations_coincide": False}
    populations = {(row["system"], row["population"]): row["n"] for row in summary["rows"]}
    assert populations[("base", ALL_USERS)] == 5 and populations[("popularity", AMONG_CANDIDATES)] == 3
    assert "target_in_candidates" in (out / "per_user.csv").read_text().splitlines()[0]
