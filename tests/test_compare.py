"""Compare is like for like: an adapter meets the base on the adapter's own preset; the preset's effect is a row."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import make_toy_dataset, tiny_loaded

from rerank_core.adapters import MANIFEST_FILE
from rerank_core.candidates import CandidateConfig
from rerank_core.compare import (
    PRESET_EFFECT,
    REFERENCE,
    SAME_PRESET,
    adapter_notes,
    compare_systems,
    comparison_table,
    movers,
)
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.prompts import get_preset

SETTINGS = InspectSettings(preset=get_preset("seed"), candidates=CandidateConfig(count=6, seed=2))


def publish_adapter(loaded, root, name: str, preset: str, text_field: str = "title") -> None:
    """A LoRA adapter with random (non-zero) weights, recorded as trained with `preset`."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(5)
    model = get_peft_model(loaded.model, LoraConfig(r=2, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                    lora_dropout=0.0, init_lora_weights=False))
    folder = root / name
    model.save_pretrained(folder)
    model.unload()
    (folder / MANIFEST_FILE).write_text(json.dumps({
        "preset": preset, "base_model": {"name": loaded.name, "fingerprint": loaded.fingerprint},
        "training": {"text_field": text_field}}))


@pytest.fixture(scope="module")
def setup(smol_tokenizer, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    loaded = tiny_loaded(smol_tokenizer)
    publish_adapter(loaded, root, "after", "seed_after")
    publish_adapter(loaded, root, "same", "seed")
    publish_adapter(loaded, root, "counts", "seed", text_field="title_count")
    dataset = make_toy_dataset(users=12)
    return Inspector(dataset, loaded, adapters_root=str(root)), dataset.users


def test_an_adapter_with_another_preset_is_paired_with_the_base_on_that_preset(setup):
    inspector, users = setup
    per_user, summary = compare_systems(inspector, users, SETTINGS, ["base", "after", "same"],
                                        bootstrap_samples=200)
    rows = summary[summary["metric"] == "NDCG@10"].set_index("system")
    assert list(rows.index) == ["base", "base @ seed_after", "after", "same"]
    assert rows.loc["base", "comparison"] == REFERENCE and math.isnan(rows.loc["base", "difference"])
    # The headline for the adapter: the same preset on both sides.
    assert rows.loc["after", ["preset", "reference", "comparison"]].tolist() == [
        "seed_after", "base @ seed_after", SAME_PRESET]
    assert rows.loc["same", ["preset", "reference"]].tolist() == ["seed", "base"]
    # The preset's own effect, labelled, against the base on the default preset.
    assert rows.loc["base @ seed_after", ["preset", "reference", "comparison"]].tolist() == [
        "seed_after", "base", PRESET_EFFECT]
    # The references are what the base scores on its own with each preset.
    from dataclasses import replace

    direct = inspector.evaluate(users, replace(SETTINGS, preset=get_preset("seed_after")), "base")
    assert rows.loc["after", "reference_mean"] == pytest.approx(direct["NDCG@10"].mean())
    assert rows.loc["base @ seed_after", "mean"] == pytest.approx(direct["NDCG@10"].mean())
    adapter = per_user[per_user["system"] == "after"]
    assert rows.loc["after", "difference"] == pytest.approx(adapter["NDCG@10"].mean() - direct["NDCG@10"].mean())
    assert set(per_user.groupby("system")["preset"].first().items()) == {
        ("base", "seed"), ("base @ seed_after", "seed_after"), ("after", "seed_after"), ("same", "seed")}
    table = comparison_table(summary)
    assert "| after | seed_after | base @ seed_after (vs reference, same preset) |" in table
    assert "| base @ seed_after | seed_after | base (preset effect) |" in table


def test_without_adapter_presets_nothing_extra_is_scored(setup):
    inspector, users = setup
    settings = replace_preset(use_adapter_preset=False)
    _, summary = compare_systems(inspector, users, settings, ["base", "after"], bootstrap_samples=200)
    assert list(dict.fromkeys(summary["system"])) == ["base", "after"]
    assert set(summary["preset"]) == {"seed"}


def test_movers_pair_each_run_with_its_own_reference(setup):
    inspector, users = setup
    per_user, summary = compare_systems(inspector, users, SETTINGS, ["base", "after"], bootstrap_samples=200)
    moved = movers(per_user, summary, count=3)
    assert set(moved.groupby("system")["reference"].first().items()) == {
        ("after", "base @ seed_after"), ("base @ seed_after", "base")}
    for row in moved.itertuples():
        reference = per_user[(per_user["system"] == row.reference) & (per_user["user_id"] == row.user_id)]
        own = per_user[(per_user["system"] == row.system) & (per_user["user_id"] == row.user_id)]
        assert row.difference == pytest.approx(float(own["NDCG@10"].iloc[0] - reference["NDCG@10"].iloc[0]))
        gained = row.difference > 0 or (row.difference == 0
                                        and row.truth_probability > row.reference_truth_probability)
        assert (row.change == "improved") == gained


def replace_preset(**changes) -> InspectSettings:
    from dataclasses import replace

    return replace(SETTINGS, **changes)


def test_the_compare_tab_names_each_reference(setup):
    from rerank_app import views

    inspector, users = setup
    per_user, summary = compare_systems(inspector, users, SETTINGS, ["base", "after"], bootstrap_samples=200)
    counts = views.compare_view(per_user, summary).counts
    assert "**after** vs **base @ seed_after** on NDCG@10" in counts
    assert "**base @ seed_after** vs **base** (the preset's own effect) on NDCG@10" in counts


def test_compare_calls_a_difference_significant_only_when_its_interval_leaves_zero(setup):
    from rerank_app import views

    inspector, users = setup
    per_user, summary = compare_systems(inspector, users, SETTINGS, ["base", "after"], bootstrap_samples=200)
    rows = summary.index[summary["system"] != summary["reference"]][:3]
    summary.loc[rows, ["ci_low", "ci_high"]] = [[(0.1 + 0.2 - 0.3) / 3, 0.05], [0.001, 0.05], [math.nan, math.nan]]
    table = views.compare_view(per_user, summary).differences.loc[rows]
    assert table["significant"].tolist() == ["no", "yes", "-"]
    assert table["95% CI"].tolist() == ["[+0.0000, +0.0500]", "[+0.0010, +0.0500]", "-"]


def test_an_adapter_trained_on_another_item_text_is_flagged_not_switched(setup):
    inspector, _ = setup
    resolved = inspector.resolve("counts", SETTINGS)
    effective, note = resolved.settings, resolved.note
    # Switching only the adapter's text would credit the count in the text to the fine-tune in Compare.
    assert effective.text_field == "title"
    assert "trained with item text 'title_count', scored here with 'title'" in note
    counted = inspector.resolve("counts", replace_preset(text_field="title_count"))
    assert counted.settings.text_field == "title_count" and "item text" not in counted.note
    assert "item text" not in inspector.resolve("same", SETTINGS).note
    # Compare and eval list the same notes beside their tables (a mean cannot show them).
    notes = adapter_notes([inspector.resolve(name, SETTINGS) for name in ["base", "after", "same", "counts"]])
    assert len(notes) == 2
    assert "trained with preset 'seed_after'" in notes[0] and "item text 'title_count'" in notes[1]


def test_a_comparison_checks_each_adapter_once(setup, monkeypatch):
    """The adapter's manifest and weights are checked when the system is resolved, never again below."""
    import rerank_core.systems as systems

    inspector, users = setup
    checked: list[str] = []
    real_check = systems.check_adapter

    def counting_check(loaded, name, root=None):
        checked.append(name)
        return real_check(loaded, name, root)

    monkeypatch.setattr(systems, "check_adapter", counting_check)
    resolved = [inspector.resolve(name, SETTINGS) for name in ["base", "counts"]]
    assert checked == ["counts"]
    compare_systems(inspector, users[:3], SETTINGS, resolved, bootstrap_samples=100)
    inspector.inspect(users[0], SETTINGS, resolved[1])
    assert checked == ["counts"]  # handed down: neither compare, evaluate, scoring nor loading checked it again
    with pytest.raises(ValueError, match="resolved for other settings"):
        inspector.inspect(users[0], replace_preset(text_field="title_count"), resolved[1])
