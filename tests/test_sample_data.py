"""The bundled synthetic sample: loads, is reproducible, and carries the series signal it promises."""

from __future__ import annotations

import importlib.util
import re
import sys
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType

import pytest

from rerank_core.data.builtin import bundled_sample_path
from rerank_core.data.dataset import Dataset
from rerank_core.data.loaders import load_dataset

SERIES_TITLE = re.compile(
    r"^(?P<name>.+?) (?:(?P<roman>I|II|III|IV|V|VI)|Part (?P<part>\d)|Book (?P<book>\d))$")
ROMAN = {"I": 1, "II": 2, "III": 3, "IV": 4, "V": 5, "VI": 6}


@pytest.fixture(scope="module")
def sample() -> Dataset:
    return load_dataset()


def generator(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    """Import sample_data/generate.py by path: sample_data is a data folder, not a package."""
    spec = importlib.util.spec_from_file_location("sample_generate", bundled_sample_path() / "generate.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look their module up in sys.modules while the class body runs.
    monkeypatch.setitem(sys.modules, spec.name, module)
    spec.loader.exec_module(module)
    return module


def series_of(title: str) -> tuple[str, int] | None:
    match = SERIES_TITLE.match(title)
    if match is None:
        return None
    number = ROMAN[match["roman"]] if match["roman"] else int(match["part"] or match["book"])
    return match["name"], number


def continuation_share(dataset: Dataset, split: str) -> float:
    """Share of targets that are the next instalment of a series already in the history."""
    hits = 0
    for user in dataset.users:
        case = dataset.split_user(user, split)
        seen: dict[str, int] = {}
        for item in case.history:
            parsed = series_of(dataset.items[item].title)
            if parsed:
                seen[parsed[0]] = max(seen.get(parsed[0], 0), parsed[1])
        target = series_of(dataset.items[case.target].title)
        hits += target is not None and seen.get(target[0]) == target[1] - 1
    return hits / len(dataset.users)


def test_sample_loads_with_promised_sizes(sample: Dataset) -> None:
    assert 400 <= len(sample.items) <= 600
    assert 500 <= len(sample.users) <= 700
    assert not sample.short_users
    assert all(5 <= len(sequence) <= 50 for sequence in sample.sequences.values())
    assert all(re.fullmatch(r"u\d{4}", user) for user in sample.users)
    assert all(re.fullmatch(r"i\d{4}", item) for item in sample.items)
    assert all(2 <= len(item.title.split()) <= 5 for item in sample.items.values())
    assert all(item.caption and item.summary for item in sample.items.values())
    folder = bundled_sample_path()
    assert sum((folder / name).stat().st_size for name in ("items.csv", "interactions.csv")) < 3 * 1024**2


def test_series_structure(sample: Dataset) -> None:
    series: dict[str, list[int]] = {}
    for item in sample.items.values():
        parsed = series_of(item.title)
        if parsed:
            series.setdefault(parsed[0], []).append(parsed[1])
    assert 60 <= len(series) <= 80
    assert all(sorted(numbers) == list(range(1, len(numbers) + 1)) and 3 <= len(numbers) <= 6
               for numbers in series.values())
    assert 150 <= len(sample.items) - sum(map(len, series.values())) <= 200


def test_targets_mostly_continue_a_series_in_the_history(sample: Dataset) -> None:
    assert continuation_share(sample, "test") >= 0.5
    assert continuation_share(sample, "validation") >= 0.5


def test_timestamps_lie_in_2020_to_2024() -> None:
    lines = (bundled_sample_path() / "interactions.csv").read_text().splitlines()[1:]
    stamps = [int(line.rsplit(",", 1)[1]) for line in lines]
    assert datetime(2020, 1, 1, tzinfo=UTC).timestamp() <= min(stamps)
    assert max(stamps) < datetime(2025, 1, 1, tzinfo=UTC).timestamp()


def test_generator_reproduces_the_committed_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    generator(monkeypatch).main(out_dir=tmp_path)
    for name in ("items.csv", "interactions.csv"):
        assert (tmp_path / name).read_bytes() == (bundled_sample_path() / name).read_bytes(), name


def test_readme_states_the_real_counts(sample: Dataset) -> None:
    readme = (bundled_sample_path() / "README.md").read_text()
    interactions = sum(len(sequence) for sequence in sample.sequences.values())
    assert "SYNTHETIC" in readme
    assert f"Items: {len(sample.items)}" in readme
    assert f"Users: {len(sample.users)}, interactions: {interactions:,}" in readme
    assert f"{continuation_share(sample, 'test'):.1%} of test targets" in readme
