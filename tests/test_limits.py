"""Every numeric input has a range the core enforces, and long runs stop at a boundary when asked."""

from __future__ import annotations

import threading

import pytest
from conftest import make_toy_dataset, tiny_loaded

from rerank_core.candidates import CandidateConfig
from rerank_core.compare import compare_systems
from rerank_core.diagnostics import (
    OrderSpec,
    history_influence,
    letter_mass,
    letter_prior,
    position_bias,
    position_bias_over_users,
)
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.limits import LIMITS, LimitError, limits_markdown, whole_number
from rerank_core.progress import Cancelled
from rerank_core.prompts import get_preset

SETTINGS = InspectSettings(preset=get_preset("seed"), candidates=CandidateConfig(count=6, seed=1))


@pytest.fixture(scope="module")
def dataset():
    return make_toy_dataset(users=40)


@pytest.fixture(scope="module")
def inspector(smol_tokenizer, dataset) -> Inspector:
    return Inspector(dataset, tiny_loaded(smol_tokenizer), batch_size=1)


@pytest.fixture(scope="module")
def tokenizer_only(smol_tokenizer, dataset) -> Inspector:
    return Inspector(dataset, tokenizer=smol_tokenizer)


# -- bounds -----------------------------------------------------------------------------------


@pytest.mark.parametrize(("value", "words"), [
    (None, "candidate seed is empty"), ("", "candidate seed is empty"), ("  ", "candidate seed is empty"),
    (1.5, "candidate seed must be a whole number, got 1.5"), ("1.5", "whole number"), ("abc", "whole number"),
    (True, "whole number"), (-1, "candidate seed must be from 0 to"), (2**40, "from 0 to 4294967295"),
])
def test_bad_seeds_get_a_message_that_names_the_field(value, words):
    with pytest.raises(LimitError, match=words) as caught:
        CandidateConfig(seed=value)
    assert caught.value.field == "candidate seed"


def test_whole_numbers_from_widgets_become_ints():
    config = CandidateConfig(count=20.0, seed="7")
    assert (config.count, config.seed) == (20, 7) and isinstance(config.count, int)
    assert whole_number("x", 3.0) == 3


def test_a_million_orders_is_refused_by_name():
    with pytest.raises(LimitError, match=r"orders must be from 1 to 200 .*got 1000000"):
        OrderSpec(mode="permutations", count=1_000_000)


def test_position_bias_over_users_refuses_more_prompts_than_allowed(tokenizer_only):
    users = [f"u{index:03d}" for index in range(300)]  # 300 users x 20 rotations = 6000 prompts
    settings = InspectSettings(candidates=CandidateConfig(count=20))
    with pytest.raises(LimitError, match=r"scored prompts \(users × orders\) must be from 1 to 5000.*got 6000"):
        position_bias_over_users(tokenizer_only, users, settings)
    with pytest.raises(LimitError, match="users must be from 1 to 500"):
        position_bias_over_users(tokenizer_only, users * 2, settings, spec=OrderSpec(count=1))


def test_user_counts_of_diagnostics_and_compare_are_bounded(tokenizer_only):
    many = [f"u{index}" for index in range(501)]
    with pytest.raises(LimitError, match="users must be from 1 to 500"):
        letter_prior(tokenizer_only, many, SETTINGS)
    with pytest.raises(LimitError, match="users must be from 1 to 500"):
        letter_mass(tokenizer_only, many, SETTINGS)
    with pytest.raises(LimitError, match="placeholder length must be from 0 to 50"):
        letter_prior(tokenizer_only, ["u00"], SETTINGS, placeholder="x" * 51)
    with pytest.raises(LimitError, match="users must be from 1 to 10000"):
        compare_systems(tokenizer_only, [f"u{index}" for index in range(10_001)], SETTINGS, ["base"])
    with pytest.raises(LimitError, match="bootstrap samples must be from 100 to 100000"):
        compare_systems(tokenizer_only, ["u00"], SETTINGS, ["base"], bootstrap_samples=10**9)
    with pytest.raises(LimitError, match="systems must be from 1 to 4"):
        compare_systems(tokenizer_only, ["u00"], SETTINGS, ["base", "a", "b", "c", "d"])


def test_prompt_budget_and_batch_size_are_bounded(smol_tokenizer, dataset):
    with pytest.raises(LimitError, match="max prompt tokens must be from 16"):
        InspectSettings(max_prompt_tokens=0)
    with pytest.raises(LimitError, match="batch size must be from 1 to 256"):
        Inspector(dataset, tokenizer=smol_tokenizer, batch_size=100_000)


def test_the_ranges_are_documented_in_one_table():
    table = limits_markdown()
    for key, limit in LIMITS.items():
        assert f"`{key}`" in table and f"{limit.high:,}" in table


# -- cancellation and progress ----------------------------------------------------------------


def test_position_bias_stops_between_chunks_and_reports_progress(inspector):
    seen: list[tuple[int, int]] = []
    stop = threading.Event()

    def progress(done: int, total: int) -> None:
        seen.append((done, total))
        stop.set()  # ask to stop as soon as the first chunk is scored

    spec = OrderSpec(mode="permutations", count=60)
    with pytest.raises(Cancelled, match=r"stopped on request after 20 of 60") as caught:
        position_bias(inspector, "u00", SETTINGS, spec=spec, batch_size=20, progress=progress, cancel=stop)
    assert seen == [(20, 60)] and caught.value.done == 20
    # Without a stop request the same call completes.
    assert len(position_bias(inspector, "u00", SETTINGS, spec=spec, batch_size=20).orders) == 60


def test_position_bias_over_users_stops_at_a_user_boundary(inspector, dataset):
    calls = iter(range(1000))
    with pytest.raises(Cancelled) as caught:
        # A callable cancel check: true from its third call on.
        position_bias_over_users(inspector, dataset.users[:10], SETTINGS, spec=OrderSpec(count=2),
                                 cancel=lambda: next(calls) >= 2)
    assert caught.value.total <= 10 and caught.value.done < 10


def test_compare_over_users_stops_between_chunks(inspector, dataset):
    users = dataset.users[:20]
    progress: list[int] = []
    stop = threading.Event()

    def report(done: int, total: int) -> None:
        progress.append(done)
        if done >= 4:
            stop.set()

    with pytest.raises(Cancelled, match="scoring base stopped on request after 4 of 20"):
        compare_systems(inspector, users, SETTINGS, ["base"], progress=report, cancel=stop)
    assert progress == [4]  # batch size 1: users are scored four per chunk


def test_letter_prior_letter_mass_and_history_influence_honour_a_stop(inspector, dataset):
    stop = threading.Event()
    stop.set()
    users = dataset.users[:3]
    with pytest.raises(Cancelled):
        letter_prior(inspector, users, SETTINGS, cancel=stop)
    with pytest.raises(Cancelled):
        letter_mass(inspector, users, SETTINGS, cancel=stop)
    with pytest.raises(Cancelled):
        history_influence(inspector, users[0], SETTINGS, cancel=stop)


def test_the_readme_shows_the_same_table():
    from pathlib import Path

    readme = (Path(__file__).resolve().parent.parent / "README.md").read_text(encoding="utf-8")
    assert limits_markdown() in readme
