"""The tabs' handlers called directly, without a server: each is a module-level function of (context, ...)."""

from __future__ import annotations

import inspect

import gradio as gr
import pytest
from app_helpers import make_adapter, make_context

from rerank_app.context import SessionError
from rerank_app.pickers import PICKER_NAMES, Pickers, endpoint
from rerank_app.tabs import compare, data, diagnose, finetune
from rerank_app.tabs import inspect as inspect_tab
from rerank_core.adapters import AdapterError
from rerank_core.diagnostics import position_bias
from rerank_core.inspector import BASE
from rerank_core.prompts import get_preset

PICKERS = Pickers(dataset="toy", model="tiny-llama", count=6)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    context = make_context(tmp_path_factory.mktemp("handlers"), smol_tokenizer)
    make_adapter(context.models.loaded("tiny-llama"), context.config.adapters_root, "lora-a")
    return context


def test_pickers_build_the_settings_in_one_place() -> None:
    settings = Pickers(count=7.0, seed=3, preset="seed_after", use_adapter_preset=False).settings()
    assert settings.candidates.count == 7 and isinstance(settings.candidates.count, int)
    assert settings.candidates.seed == 3 and not settings.use_adapter_preset
    assert settings.preset == get_preset("seed_after")  # the name resolved here, once


def test_inspect_handler_returns_every_output_for_the_user(context) -> None:
    outputs = inspect_tab.inspect(context, PICKERS, BASE, "u03")
    assert len(outputs) == len(inspect_tab.OUTPUT_NAMES)
    summary = outputs[inspect_tab.OUTPUT_NAMES.index("summary")]
    assert "User u03" in summary and "system **base**" in summary
    with pytest.raises(SessionError, match="not in dataset toy"):
        inspect_tab.inspect(context, PICKERS, BASE, "nobody")


def test_inspect_rebuilds_the_view_only_when_the_inspection_or_the_order_changes(context) -> None:
    first = inspect_tab.inspect(context, PICKERS, BASE, "u04")
    assert inspect_tab.inspect(context, PICKERS, BASE, "u04") is first  # scored and built once
    chart = inspect_tab.OUTPUT_NAMES.index("chart")
    by_probability = inspect_tab.inspect(context, PICKERS, BASE, "u04", order="probability")
    assert by_probability is not first and by_probability[chart] is not first[chart]
    other_user = inspect_tab.inspect(context, PICKERS, BASE, "u05")
    assert other_user[0] != first[0]
    context.inspections.clear_cache()  # as if re-scored (e.g. a retrained adapter)
    rescored = inspect_tab.inspect(context, PICKERS, BASE, "u04")
    assert rescored is not first and rescored[0] == first[0]


def test_inspect_json_fills_a_blank_dataset_and_model(context) -> None:
    payload = inspect_tab.inspect_json(context, "u02", Pickers(count=5))
    assert payload["user_id"] == "u02" and len(payload["candidates"]) == 5


def test_endpoint_spells_out_the_pickers_and_turns_errors_into_toasts(context) -> None:
    event = endpoint(inspect_tab.inspect, context)
    names = list(inspect.signature(event).parameters)
    assert names == [*PICKER_NAMES, "adapter", "user_id", "order"]
    values = [getattr(PICKERS, name) for name in PICKER_NAMES]
    assert event(*values, BASE, "u03")[0] == inspect_tab.inspect(context, PICKERS, BASE, "u03")[0]
    with pytest.raises(gr.Error, match="not in dataset toy"):
        event(*values, BASE, "nobody")
    json_names = list(inspect.signature(endpoint(inspect_tab.inspect_json, context)).parameters)
    assert json_names == ["user_id", *PICKER_NAMES, "adapter"]


def test_compare_user_handler_shows_every_system(context) -> None:
    chart, table = compare.compare_user(context, PICKERS, ["lora-a"], "u02")
    assert table["system"].tolist() == [BASE, "lora-a"]
    assert len(chart.data) == 2
    with pytest.raises(SessionError, match="at most 3 adapters"):
        compare.compare_user(context, PICKERS, ["a", "b", "c", "d"], "u02")


def test_diagnose_handlers_check_names_like_inspect(context) -> None:
    note, heatmap, *_ = diagnose.diagnose_position_bias(context, PICKERS, BASE, " u03 ")
    with context.inspections.using("toy", "tiny-llama") as inspector:
        expected = position_bias(inspector, "u03", PICKERS.settings())
    assert "User u03" in note and len(heatmap.data[0].z) == len(expected.item_ids)
    with pytest.raises(SessionError, match="not in dataset toy"):
        diagnose.diagnose_history(context, PICKERS, BASE, "nobody")
    with pytest.raises(AdapterError, match="no adapter named"):
        diagnose.diagnose_history(context, PICKERS, "../../etc", "u01")
    note, _tokens, letters = diagnose.diagnose_template(context, "tiny-llama", "seed", 5)
    assert "Template consistency" in note and letters["letter"].tolist() == list("ABCDE")


def test_diagnose_over_users_refuses_a_count_out_of_range(context) -> None:
    for users in (0, 10_000, None, 2.5):
        with pytest.raises(ValueError, match="users"):
            diagnose.diagnose_position_bias_users(context, PICKERS, BASE, users=users,
                                                  progress=lambda *args, **kwargs: None)
    _top1, _mass, summary = diagnose.diagnose_position_bias_users(context, PICKERS, BASE, users=1,
                                                                progress=lambda *args, **kwargs: None)
    assert summary["users"].tolist() == [1]
    chart, table = diagnose.diagnose_letter_mass(context, PICKERS, ["lora-a", BASE], users=2,
                                                 progress=lambda *args, **kwargs: None)
    assert table["system"].tolist() == [BASE, "lora-a"] and table["users"].tolist() == [2, 2]
    assert len(chart.data) == 2


def test_data_and_finetune_handlers(context) -> None:
    summary, _lengths, _popularity, top_items = data.statistics(context, "toy")
    assert "users" in summary and len(top_items) > 0
    values = finetune.fill_preset("quick")
    assert len(values) == len(finetune.FORM_FIELDS)
    preview = finetune.show_preview(context, "quick", "toy", "tiny-llama", *values)
    assert "ri-loss" in preview


def test_a_refused_request_keeps_the_results_and_restores_the_controls(context) -> None:
    answered = inspect_tab.inspect_page(context, PICKERS, BASE, "u03")
    count = len(inspect_tab.OUTPUT_NAMES)
    remembered = answered[count]
    assert remembered["user"] == "u03" and remembered["count"] == 6
    assert all(part == gr.skip() for part in answered[count + 1:])
    for bad in (Pickers(dataset="toy", model="tiny-llama", count=6, seed=None),
                Pickers(dataset="toy", model="tiny-llama", count=6, seed=1.5)):
        with pytest.warns(UserWarning, match="candidate seed"):
            refused = inspect_tab.inspect_page(context, bad, BASE, "u03", "letter", remembered)
        # Previous results stay on screen; every control goes back to its last valid value.
        assert all(part == gr.skip() for part in refused[:count + 1])
        restored = dict(zip(inspect_tab.CONTROL_NAMES, refused[count + 1:], strict=True))
        assert restored["seed"]["value"] == 0 and restored["user"]["value"] == "u03"


def _quiet(*args, **kwargs) -> None:
    """A progress tracker that shows nothing (handlers called without a page)."""


def test_compare_says_when_an_adapter_is_scored_on_another_item_text_than_it_learnt(context) -> None:
    make_adapter(context.models.loaded("tiny-llama"), context.config.adapters_root, "lora-count",
                 text_field="title_count")
    counts = compare.compare(context, PICKERS, ["lora-count"], 10, progress=_quiet)[0]
    assert "ℹ adapter 'lora-count' was trained with item text 'title_count', scored here with 'title'" in counts
    assert "ℹ" not in compare.compare(context, PICKERS, ["lora-a"], 10, progress=_quiet)[0]


def test_a_refused_compare_keeps_its_results_and_restores_its_controls(context) -> None:
    start = {"adapters": [], "users": 100}  # the tab's initial values
    answered = compare.compare_page(context, PICKERS, ["lora-a"], 10, start, progress=_quiet)
    outputs = compare.COMPARE_OUTPUTS
    remembered = answered[outputs]
    assert remembered == {"adapters": ["lora-a"], "users": 10}
    assert "improved" in answered[0] and all(part == gr.skip() for part in answered[outputs + 1:])
    for adapters, users, message in ((["no-such"], 10, "no adapter named 'no-such'"),
                                     (["lora-a"], 100_000, "users must be from 1 to")):
        with pytest.warns(UserWarning, match=message):
            refused = compare.compare_page(context, PICKERS, adapters, users, remembered, progress=_quiet)
        # Metrics, movers and scatter stay on screen; the adapters and the count go back to the last answered run.
        assert all(part == gr.skip() for part in refused[:outputs + 1])
        assert [part["value"] for part in refused[outputs + 1:]] == [["lora-a"], 10]
    with pytest.warns(UserWarning, match="no adapter named"):
        refused = compare.compare_user_page(context, PICKERS, ["no-such"], "u02", remembered)
    assert all(part == gr.skip() for part in refused[:3]) and refused[3]["value"] == ["lora-a"]


def test_a_refused_diagnostic_keeps_its_results_and_restores_its_controls(context) -> None:
    answered = diagnose.position_bias_page(context, PICKERS, BASE, "u03", "permutations", 3, None, progress=_quiet)
    remembered = answered[5]
    assert "User u03" in answered[0] and remembered == {"system": BASE, "orders": "permutations", "permutations": 3}
    with pytest.warns(UserWarning, match="orders must be from 1 to 200"):
        refused = diagnose.position_bias_page(context, PICKERS, BASE, "u03", "permutations", 1_000_000, remembered,
                                              progress=_quiet)
    assert all(part == gr.skip() for part in refused[:6])
    assert [part["value"] for part in refused[6:]] == [BASE, "permutations", 3]
    # Sections share the tab's remembered values: letter mass keeps what position bias remembered.
    answered = diagnose.letter_mass_page(context, PICKERS, [], 2, remembered, progress=_quiet)
    remembered = answered[2]
    assert remembered["mass_users"] == 2 and remembered["permutations"] == 3
    with pytest.warns(UserWarning, match="users must be from 1"):
        refused = diagnose.letter_mass_page(context, PICKERS, [], 0, remembered, progress=_quiet)
    assert all(part == gr.skip() for part in refused[:3])
    assert [part["value"] for part in refused[3:]] == [[], 2]
    # The template check reads only the Inspect tab's controls: nothing of this tab to restore.
    with pytest.warns(UserWarning, match="template"):
        refused = diagnose.template_page(context, "tiny-llama", "seed", 5, "not json", remembered)
    assert len(refused) == 4 and all(part == gr.skip() for part in refused)


def test_a_stopped_run_keeps_the_results_and_the_chosen_controls(context) -> None:
    class Request:
        session_hash = "page-stopped"

    def stop_after_first_chunk(done: float, desc: str = "") -> None:
        if done > 0:
            diagnose.stop_runs(context, Request())

    with pytest.warns(UserWarning, match="stopped on request"):
        stopped = diagnose.position_bias_users_page(context, PICKERS, BASE, 8, "permutations", 30, None,
                                                    request=Request(), progress=stop_after_first_chunk)
    assert len(stopped) == 3 + 1 + 4 and all(part == gr.skip() for part in stopped)


def test_compare_on_many_users_opens_with_the_candidate_recall(context) -> None:
    from dataclasses import replace

    counts = compare.compare(context, PICKERS, [], 10, progress=_quiet)[0]
    assert counts.startswith("**Candidate recall 1.000: the target is among the 6 random candidates for all 10 users")
    retrieved = compare.compare(context, replace(PICKERS, source="retriever"), [], 10, progress=_quiet)
    assert "the target is among the 6 retriever candidates for" in retrieved[0]
    assert "population" in retrieved[1].columns


def test_item_text_specs_in_the_pickers_the_inspection_and_the_fine_tune_preview(context) -> None:
    from dataclasses import replace

    from rerank_app.pickers import text_field_choices

    # The toy items have no fields of their own: the named texts and the count are offered, any spec may be typed.
    offered = [value for value, _ in text_field_choices(context, "toy").choices]
    assert offered == ["title", "caption", "summary", "title_count", "title+count"]
    assert text_field_choices(context, "not-registered") == gr.skip()
    counted = context.inspections.inspect("toy", "tiny-llama", BASE, "u03", replace(PICKERS, text_field="title+count")
                                          .settings())
    assert all(" | " in text for text in counted.prepared.candidate_texts)
    with pytest.raises(ValueError, match="unknown part 'genres'"):
        inspect_tab.inspect(context, replace(PICKERS, text_field="title+genres"), BASE, "u03")

    values = dict(zip(finetune.FORM_FIELDS, finetune.fill_preset("quick"), strict=True))
    preview = finetune.show_preview(context, "quick", "toy", "tiny-llama",
                                    *{**values, "text_field": "title+count"}.values())
    assert "item text &#x27;title+count&#x27;: median " in preview and "prompt tokens" in preview
    with pytest.raises(ValueError, match="unknown part 'genres'"):
        finetune.show_preview(context, "quick", "toy", "tiny-llama", *{**values, "text_field": "title+genres"}.values())
    with pytest.raises(ValueError, match="unknown part 'genres'"):  # refused before any subprocess starts
        context.finetune.start("spec-run", "toy", "tiny-llama", "quick", {"text_field": "title+genres"})
