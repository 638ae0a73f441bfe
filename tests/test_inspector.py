"""The Inspector over a toy dataset and a tiny model: prompts, ranks, evaluation, and adapters from adapters/."""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, make_toy_dataset, tiny_loaded
from peft import LoraConfig, get_peft_model

from rerank_core.adapters import MANIFEST_FILE, AdapterError, new_staging_folder, publish_adapter
from rerank_core.candidates import CandidateConfig
from rerank_core.inspector import BASE, Inspector, InspectSettings
from rerank_core.metrics import METRIC_NAMES, metrics_at
from rerank_core.models import LoadedModel
from rerank_core.prompts import get_preset
from rerank_core.scoring import ScoreCache

EVALUATE_COLUMNS = ["user_id", "system", "preset", "rank", "target_in_candidates", "truth_probability",
                    "letter_mass", "top1_letter", "prompt_tokens", *METRIC_NAMES]


def test_prepare_is_deterministic_and_negatives_are_never_touched(smol_tokenizer) -> None:
    dataset = make_toy_dataset()
    settings = InspectSettings(candidates=CandidateConfig(count=20, seed=7))
    first = Inspector(dataset, tokenizer=smol_tokenizer)
    second = Inspector(make_toy_dataset(), tokenizer=smol_tokenizer)
    for user in dataset.users[:10]:
        for split in ("test", "validation"):
            split_settings = InspectSettings(split=split, candidates=settings.candidates)
            prepared = first.prepare(user, split_settings)
            assert prepared == second.prepare(user, split_settings)
            candidates = prepared.candidates
            assert len(candidates.item_ids) == 20 == len(set(candidates.item_ids))
            assert candidates.item_ids[candidates.target_index] == prepared.split.target
            negatives = set(candidates.item_ids) - {prepared.split.target}
            # Not only the history: the validation split must not see the later test item either.
            assert not negatives & dataset.touched(user)
            assert prepared.candidate_texts == tuple(dataset.text(item) for item in candidates.item_ids)
            assert prepared.prompt.letters == tuple("ABCDEFGHIJKLMNOPQRST")
            assert [token.letter for token in prepared.letter_tokens] == list(prepared.prompt.letters)
            assert prepared.token_ids == tuple(smol_tokenizer(prepared.prompt.rendered,
                                                              add_special_tokens=False)["input_ids"])
    other_seed = first.prepare(dataset.users[0], InspectSettings(candidates=CandidateConfig(seed=8)))
    assert other_seed.candidates != first.prepare(dataset.users[0], settings).candidates


def test_text_field_and_history_frame(smol_tokenizer) -> None:
    dataset = make_toy_dataset()
    inspector = Inspector(dataset, tokenizer=smol_tokenizer)
    prepared = inspector.prepare("u03", InspectSettings(text_field="caption"))
    assert all(text.startswith("Caption ") for text in prepared.candidate_texts)
    assert "- Caption " in prepared.prompt.text and "Title" not in prepared.prompt.text
    with pytest.raises(ValueError, match="needs a model"):
        inspector.inspect("u03", InspectSettings())


def test_tokenizer_only_inspector_needs_something() -> None:
    with pytest.raises(ValueError, match="needs a loaded model or at least a tokenizer"):
        Inspector(make_toy_dataset())


def test_inspect_ranks_pessimistically_when_the_model_cannot_choose(smol_tokenizer) -> None:
    loaded = tiny_loaded(smol_tokenizer)
    with torch.no_grad():
        loaded.model.lm_head.weight.zero_()  # every logit 0: every letter ties
    inspector = Inspector(make_toy_dataset(), loaded)
    result = inspector.inspect("u05", InspectSettings())
    assert result.scores.letter_probs == pytest.approx([1 / 20] * 20)
    assert result.scores.letter_mass == pytest.approx(20 / len(smol_tokenizer), rel=1e-4)
    assert result.rank == 20  # a tie counts against the truth
    assert result.metrics == {name: 0.0 for name in METRIC_NAMES}
    assert result.system == BASE and result.preset_note == ""
    assert result.user_id == "u05"


def test_inspect_fields_agree_with_each_other(smol_tokenizer) -> None:
    dataset = make_toy_dataset()
    inspector = Inspector(dataset, tiny_loaded(smol_tokenizer, seed=2))
    result = inspector.inspect("u07", InspectSettings(candidates=CandidateConfig(count=8)))
    probs = result.scores.letter_probs
    target = result.prepared.candidates.target_index
    assert sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert result.rank == 1 + sum(1 for index, p in enumerate(probs) if index != target and p >= probs[target])
    assert result.metrics == metrics_at(result.rank)
    frame = result.candidates_frame(dataset)
    assert list(frame["letter"]) == list("ABCDEFGH")
    assert frame["truth"].sum() == 1 and frame.loc[frame["truth"], "letter"].item() == "ABCDEFGH"[target]
    assert sorted(frame["rank"]) == list(range(1, 9))
    as_json = result.to_json(dataset)
    json.dumps(as_json)  # plain JSON all the way down
    assert as_json["rank"] == result.rank and as_json["target_index"] == target
    assert as_json["prompt_tokens"] == len(result.prepared.token_ids)


def test_evaluate_returns_the_documented_columns(smol_tokenizer) -> None:
    dataset = make_toy_dataset()
    inspector = Inspector(dataset, tiny_loaded(smol_tokenizer, seed=4), batch_size=2)
    settings = InspectSettings(candidates=CandidateConfig(count=10))
    users = dataset.users[:9]
    progress: list[tuple[int, int]] = []
    frame = inspector.evaluate(users, settings, progress=lambda done, total: progress.append((done, total)))
    assert list(frame.columns) == EVALUATE_COLUMNS
    assert list(frame["user_id"]) == users
    assert set(frame["system"]) == {BASE} and set(frame["preset"]) == {"seed"}
    assert progress == [(8, 9), (9, 9)]  # chunks of batch_size * 4 users
    fresh = Inspector(dataset, tiny_loaded(smol_tokenizer, seed=4))
    for row in frame.to_dict(orient="records"):
        single = fresh.inspect(row["user_id"], settings)
        assert row["rank"] == single.rank
        assert row["truth_probability"] == pytest.approx(
            single.scores.letter_probs[single.prepared.candidates.target_index], abs=1e-5)
        assert row["letter_mass"] == pytest.approx(single.scores.letter_mass, rel=1e-4)
        assert row["top1_letter"] == single.prepared.prompt.letters[single.scores.ranking()[0]]
        assert row["prompt_tokens"] == len(single.prepared.token_ids)
        assert {name: row[name] for name in METRIC_NAMES} == single.metrics


def test_evaluate_counts_a_retriever_miss_as_zero(smol_tokenizer) -> None:
    dataset = make_toy_dataset()
    inspector = Inspector(dataset, tiny_loaded(smol_tokenizer))
    settings = InspectSettings(candidates=CandidateConfig(source="retriever", count=3, order="retriever"))
    frame = inspector.evaluate(dataset.users, settings)
    missed = frame[frame["rank"].isna()]
    assert len(missed) > 0  # 3 retrieved items out of 120 miss most targets
    assert missed["truth_probability"].isna().all()
    assert (missed[list(METRIC_NAMES)] == 0).all().all()
    assert frame["letter_mass"].between(0, 1).all()


# -- adapters ---------------------------------------------------------------------------------------------


def write_adapter(tokenizer, root: Path, name: str, manifest: dict | None, *, hidden: int = 32) -> Path:
    """An untrained LoRA with random B (so it changes the output), saved and published as training would."""
    model = get_peft_model(build_tiny_llama(tokenizer, hidden=hidden),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                      init_lora_weights=False))
    staging = new_staging_folder(root)
    model.save_pretrained(staging)
    if manifest is not None:
        (staging / MANIFEST_FILE).write_text(json.dumps(manifest))
    return publish_adapter(staging, name, root)


def manifest_for(loaded: LoadedModel, preset: str = "seed_after") -> dict:
    return {"preset": preset, "strategy": "as_trained",
            "base_model": {"name": loaded.name, "fingerprint": loaded.fingerprint}}


def test_adapter_is_scored_with_its_training_preset(smol_tokenizer, tmp_path: Path) -> None:
    loaded = tiny_loaded(smol_tokenizer)
    write_adapter(smol_tokenizer, tmp_path, "after", manifest_for(loaded))
    dataset = make_toy_dataset()
    inspector = Inspector(dataset, loaded, adapters_root=str(tmp_path))
    assert [info.name for info in inspector.adapters()] == ["after"]
    settings = InspectSettings(preset=get_preset("seed"))
    base = inspector.inspect("u02", settings)
    adapted = inspector.inspect("u02", settings, system="after")
    assert adapted.settings.preset == get_preset("seed_after")
    assert "'seed_after'" in adapted.preset_note and "'seed'" in adapted.preset_note
    assert "- Title" in adapted.prepared.prompt.text and "(A)" in adapted.prepared.prompt.text
    # The adapter really runs: same prompt, other probabilities than the base.
    same_prompt = inspector.inspect("u02", InspectSettings(preset=get_preset("seed_after")))
    assert same_prompt.prepared.token_ids == adapted.prepared.token_ids
    assert max(abs(a - b) for a, b in zip(same_prompt.scores.letter_probs, adapted.scores.letter_probs)) > 1e-4
    # Overriding the adapter's preset is allowed and says nothing.
    override = inspector.inspect("u02", InspectSettings(preset=get_preset("seed"), use_adapter_preset=False),
                                 system="after")
    assert override.settings.preset == get_preset("seed") and override.preset_note == ""
    # The base is unchanged once the adapter is loaded (scored again, not from the cache).
    inspector.cache = ScoreCache()
    again = inspector.inspect("u02", settings)
    assert again.scores.letter_probs == pytest.approx(base.scores.letter_probs, abs=1e-6)
    frame = inspector.evaluate(["u02", "u03"], settings, system="after")
    assert set(frame["preset"]) == {"seed_after"} and set(frame["system"]) == {"after"}


def test_adapter_overwritten_under_the_same_name_is_reloaded(smol_tokenizer, tmp_path: Path) -> None:
    loaded = tiny_loaded(smol_tokenizer)
    write_adapter(smol_tokenizer, tmp_path, "same", manifest_for(loaded))
    inspector = Inspector(make_toy_dataset(), loaded, adapters_root=str(tmp_path))
    first = inspector.inspect("u02", InspectSettings(), system="same")
    staging = new_staging_folder(tmp_path)
    # Seed 1: other random LoRA weights (only the adapter is saved, not the base it was built on).
    get_peft_model(build_tiny_llama(smol_tokenizer, seed=1), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)).save_pretrained(staging)
    (staging / MANIFEST_FILE).write_text(json.dumps(manifest_for(loaded)))
    publish_adapter(staging, "same", tmp_path, overwrite=True)
    second = inspector.inspect("u02", InspectSettings(), system="same")
    assert max(abs(a - b) for a, b in zip(first.scores.letter_probs, second.scores.letter_probs)) > 1e-4


def test_two_inspectors_on_one_model_share_its_adapters(smol_tokenizer, tmp_path: Path) -> None:
    loaded = tiny_loaded(smol_tokenizer)
    write_adapter(smol_tokenizer, tmp_path, "shared", manifest_for(loaded))
    first = Inspector(make_toy_dataset(), loaded, adapters_root=str(tmp_path))
    second = Inspector(make_toy_dataset(seed=1), loaded, adapters_root=str(tmp_path))
    base_before = second.inspect("u02", InspectSettings())
    first.inspect("u02", InspectSettings(), system="shared")  # PEFT wraps the shared model in place
    second.cache = ScoreCache()
    base_after = second.inspect("u02", InspectSettings())
    assert base_after.scores.letter_probs == pytest.approx(base_before.scores.letter_probs, abs=1e-6)


def test_adapter_for_another_base_is_refused_naming_both(smol_tokenizer, tmp_path: Path) -> None:
    loaded = tiny_loaded(smol_tokenizer)
    manifest = manifest_for(loaded)
    manifest["base_model"] = {"name": "Other-7B", "fingerprint": "0123456789abcdef"}
    write_adapter(smol_tokenizer, tmp_path, "foreign", manifest)
    inspector = Inspector(make_toy_dataset(), loaded, adapters_root=str(tmp_path))
    with pytest.raises(AdapterError, match=r"'Other-7B'.*0123456789abcdef.*'tiny-llama'.*" + loaded.fingerprint):
        inspector.inspect("u02", InspectSettings(), system="foreign")
    with pytest.raises(AdapterError, match=r"no adapter named 'missing'.*available: foreign"):
        inspector.inspect("u02", InspectSettings(), system="missing")


def test_adapter_with_other_shapes_is_refused(smol_tokenizer, tmp_path: Path) -> None:
    loaded = tiny_loaded(smol_tokenizer)
    write_adapter(smol_tokenizer, tmp_path, "wider", None, hidden=64)
    inspector = Inspector(make_toy_dataset(), loaded, adapters_root=str(tmp_path))
    with pytest.raises(AdapterError, match="does not fit"):
        inspector.inspect("u02", InspectSettings(), system="wider")


@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_adapter_weights_are_refused(smol_tokenizer, tmp_path: Path, damage: str) -> None:
    loaded = tiny_loaded(smol_tokenizer)
    folder = write_adapter(smol_tokenizer, tmp_path, "broken", manifest_for(loaded))
    weights = folder / "adapter_model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(b"\x00garbage" * 10 if damage == "garbage" else data[:len(data) // 2])
    inspector = Inspector(make_toy_dataset(), loaded, adapters_root=str(tmp_path))
    with pytest.raises(AdapterError, match=r"'broken' weights .* are unreadable.*train it again"):
        inspector.inspect("u02", InspectSettings(), system="broken")


def test_plain_peft_adapter_loads_with_a_warning(smol_tokenizer, tmp_path: Path,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    loaded = tiny_loaded(smol_tokenizer)
    write_adapter(smol_tokenizer, tmp_path, "plain", None)
    inspector = Inspector(make_toy_dataset(), loaded, adapters_root=str(tmp_path))
    with caplog.at_level(logging.WARNING, logger="rerank_core.adapters"):
        result = inspector.inspect("u02", InspectSettings(preset=get_preset("seed")), system="plain")
    assert any("plain" in record.getMessage() and MANIFEST_FILE in record.getMessage()
               for record in caplog.records)
    assert result.settings.preset == get_preset("seed") and result.preset_note == ""
    assert sum(result.scores.letter_probs) == pytest.approx(1.0, abs=1e-5)


def test_adapter_is_scored_with_its_training_prompt_budget(smol_tokenizer, tmp_path: Path) -> None:
    """The manifest's max_prompt_tokens applies as its preset does: the prompt the adapter was trained on."""
    loaded = tiny_loaded(smol_tokenizer)
    manifest = {**manifest_for(loaded, preset="seed"), "training": {"max_prompt_tokens": 250}}
    write_adapter(smol_tokenizer, tmp_path, "short", manifest)
    inspector = Inspector(make_toy_dataset(), loaded, adapters_root=str(tmp_path))
    settings = InspectSettings(preset=get_preset("seed"))
    adapted = inspector.inspect("u03", settings, system="short")
    assert adapted.settings.max_prompt_tokens == 250 and "250 tokens" in adapted.preset_note
    assert len(adapted.prepared.token_ids) <= 250 and adapted.prepared.prompt.dropped_history > 0
    assert inspector.inspect("u03", settings).prepared.prompt.dropped_history == 0  # the base: 1536 tokens
    override = inspector.inspect("u03", replace(settings, use_adapter_preset=False), system="short")
    assert override.settings.max_prompt_tokens == 1536 and override.prepared.prompt.dropped_history == 0
    # A budget sized for the training candidate count does not apply to prompts with another count.
    write_adapter(smol_tokenizer, tmp_path, "short5", {**manifest, "candidates": {"count": 5}})
    assert inspector.inspect("u03", settings, system="short5").settings.max_prompt_tokens == 1536
    five = replace(settings, candidates=replace(settings.candidates, count=5))
    assert inspector.inspect("u03", five, system="short5").settings.max_prompt_tokens == 250
