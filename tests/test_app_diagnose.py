"""The Diagnose tab driven through gradio_client on a tiny model: each section's real outputs, and refusals."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from app_helpers import make_adapter, make_context
from gradio_client import Client

from rerank_app.pickers import make_settings
from rerank_app.ports import free_port
from rerank_app.server import build_app, launch
from rerank_core.inspector import BASE, Inspector
from rerank_core.models import load_model

DIAGNOSE_ENDPOINTS = {"/diagnose_position_bias", "/diagnose_position_bias_users", "/diagnose_letter_prior",
                      "/diagnose_history", "/diagnose_template", "/diagnose_letter_mass"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    context = make_context(tmp_path_factory.mktemp("diagnose"), smol_tokenizer)
    make_adapter(context.models.loaded("tiny-llama"), context.config.adapters_root, "lora-a")
    demo = build_app(context)
    port = free_port()
    launch(demo, port=port, block=False)
    yield context, Client(f"http://127.0.0.1:{port}/", verbose=False)
    demo.close()


def _figure(plot: dict) -> dict:
    return json.loads(plot["plot"])


def _values(array: list | dict) -> list:
    """A plotly array as a list: plotly 6+ sends numeric arrays as typed base64 ({"dtype", "bdata", "shape"})."""
    if isinstance(array, list):
        return array
    values = np.frombuffer(base64.b64decode(array["bdata"]), dtype=array["dtype"])
    if "shape" in array:
        values = values.reshape([int(size) for size in str(array["shape"]).split(",")])
    return values.tolist()


def test_diagnose_endpoints_take_names_and_ids_not_paths(served) -> None:
    _, client = served
    endpoints = client.view_api(return_format="dict", print_info=False)["named_endpoints"]
    assert set(endpoints) >= DIAGNOSE_ENDPOINTS
    parameters = {name: [parameter["parameter_name"] for parameter in endpoints[name]["parameters"]]
                  for name in DIAGNOSE_ENDPOINTS}
    assert parameters["/diagnose_template"] == ["model", "preset", "count", "template_kwargs"]
    assert parameters["/diagnose_position_bias"][:2] == ["dataset", "model"]
    assert {"system", "user_id", "orders", "permutations"} <= set(parameters["/diagnose_position_bias"])
    assert {"system", "users"} <= set(parameters["/diagnose_position_bias_users"])
    assert {"adapters", "users"} <= set(parameters["/diagnose_letter_mass"])
    assert not any("path" in name or "file" in name for names in parameters.values() for name in names)


def test_position_bias_for_one_user_matches_the_core(served) -> None:
    context, client = served
    note, heatmap, letters, ranks, items = client.predict(
        "toy", "tiny-llama", "test", "random", "seed", "as_trained", "title", 6, 0, True, "", BASE, "u03",
        "rotations", 20, api_name="/diagnose_position_bias")
    z = _values(_figure(heatmap)["data"][0]["z"])
    assert len(z) == 6 and all(len(row) == 6 for row in z)
    # Rotations put each item once at each letter: every cell is filled, and each column (one order's
    # letter position over all items) sums to the mean probability of that letter.
    letter_means = _values(_figure(letters)["data"][0]["y"])
    assert sum(letter_means) == pytest.approx(1.0, abs=1e-5)
    assert [sum(row[column] for row in z) / 6 for column in range(6)] == pytest.approx(letter_means, abs=1e-5)
    assert sum(_values(_figure(ranks)["data"][0]["y"])) == 6  # one ground-truth rank per order
    assert "**User u03 · base" in note and "6 orders" in note and "stability" in note
    assert len(items["data"]) == 6 and sum(row[3] == "★ truth" for row in items["data"]) == 1

    fresh = Inspector(context.datasets.get("toy").dataset, load_model(context.models.path("tiny-llama")))
    expected = fresh.inspect("u03", make_settings(count=6))
    shown = {row[1]: row[4] for row in items["data"]}
    assert [shown[item] for item in expected.prepared.candidates.item_ids] == pytest.approx(
        [round(float(value), 4) for value in expected.scores.letter_probs], abs=1e-4)


def test_position_bias_over_users_summarises_every_user_and_order(served) -> None:
    _, client = served
    top1, mass, summary = client.predict(
        "toy", "tiny-llama", "test", "random", "seed", "as_trained", "title", 5, 0, True, "", "lora-a", 3,
        "permutations", 4, api_name="/diagnose_position_bias_users")
    (row,) = summary["data"]
    columns = summary["headers"]
    assert row[columns.index("system")] == "lora-a" and row[columns.index("users")] == 3
    assert row[columns.index("orders")] == 4
    assert sum(_values(_figure(top1)["data"][0]["y"])) == pytest.approx(1.0)
    assert sum(_values(_figure(mass)["data"][0]["y"])) == pytest.approx(1.0, abs=1e-5)


def test_letter_prior_gives_one_row_per_letter(served) -> None:
    _, client = served
    chart, table = client.predict(
        "toy", "tiny-llama", "test", "random", "seed", "as_trained", "title", 5, 0, True, "", BASE, 4, "blank", "",
        api_name="/diagnose_letter_prior")
    assert [row[0] for row in table["data"]] == ["A", "B", "C", "D", "E"]
    assert sum(row[table["headers"].index(BASE)] for row in table["data"]) == pytest.approx(1.0, abs=1e-3)
    assert "blank" in _figure(chart)["layout"]["title"]["text"]


def test_history_influence_has_a_row_per_prompt_history_item_and_highlights_the_influential(served) -> None:
    context, client = served
    chart, table = client.predict(
        "toy", "tiny-llama", "test", "random", "seed", "as_trained", "title", 6, 0, True, "", BASE, "u03",
        api_name="/diagnose_history")
    with context.inspections.using("toy", "tiny-llama") as inspector:
        prepared = inspector.prepare("u03", make_settings(count=6))
    shown = prepared.split.history[prepared.prompt.dropped_history:]
    assert [row[1] for row in table["data"]] == list(shown)
    traces = _figure(chart)["data"]
    assert [trace["name"] for trace in traces] == ["history item", "most influential"]  # a legend says which
    assert sum(len(_values(trace["y"])) for trace in traces) == len(shown)
    influential = [index for index, row in enumerate(table["data"]) if row[table["headers"].index("influential")]]
    assert 1 <= len(influential) <= 3
    styling = table["metadata"]["styling"]
    assert all("background-color" in styling[index][0] for index in influential)
    assert all(not styling[index][0] for index in range(len(shown)) if index not in influential)


def test_template_consistency_is_ok_for_smollm2_with_the_seed_preset(served) -> None:
    _, client = served
    note, tokens, letters = client.predict("tiny-llama", "seed", 20, api_name="/diagnose_template")
    assert "preset `seed`: OK, consistent" in note and "the answer letter 'A' becomes token" in note
    assert [row[0] for row in letters["data"]] == [chr(ord("A") + index) for index in range(20)]
    notes = [row[tokens["headers"].index("note")] for row in tokens["data"]]
    assert "answer letter" in notes and "first difference" not in notes
    note, _, _ = client.predict("tiny-llama", "seed_after", 5, api_name="/diagnose_template")
    assert "preset `seed_after`" in note


def test_letter_mass_compares_the_base_with_adapters(served) -> None:
    _, client = served
    chart, table = client.predict(
        "toy", "tiny-llama", "test", "random", "seed", "as_trained", "title", 5, 0, True, "", ["lora-a"], 4,
        api_name="/diagnose_letter_mass")
    assert [row[0] for row in table["data"]] == [BASE, "lora-a"]
    assert all(row[1] == 4 and 0.0 <= row[2] <= 1.0 for row in table["data"])
    assert len(_figure(chart)["data"]) == 2


def test_bad_diagnose_requests_are_refused_and_the_app_keeps_serving(served) -> None:
    _, client = served
    settings = ("toy", "tiny-llama", "test", "random", "seed", "as_trained", "title", 5, 0, True, "")
    with pytest.raises(Exception, match="not in dataset toy"):
        client.predict(*settings, BASE, "nobody", api_name="/diagnose_history")
    with pytest.raises(Exception, match="orders must be from 1 to 200"):
        client.predict(*settings, BASE, "u01", "permutations", 0, api_name="/diagnose_position_bias")
    # The same name check as Inspect's: only adapters the picker offers.
    with pytest.raises(Exception, match=r"no adapter named '\.\./\.\./etc'"):
        client.predict(*settings, "../../etc", "u01", api_name="/diagnose_history")
    with pytest.raises(Exception, match="no model named 'nowhere'; choose one of tiny-llama"):  # named by the app
        client.predict("nowhere", "seed", 5, api_name="/diagnose_template")
    note, _, _ = client.predict("tiny-llama", "seed", 5, api_name="/diagnose_template")
    assert "Template consistency" in note
