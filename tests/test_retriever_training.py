"""Training on retriever candidates: the retriever's top N as evaluation sees them, the target never forced in."""

from __future__ import annotations

import json
from dataclasses import replace

from conftest import make_toy_dataset, tiny_config, tiny_loaded

from rerank_core.adapters import MANIFEST_FILE
from rerank_core.candidates import CandidateConfig, CandidateSampler
from rerank_core.data.dataset import Dataset, Item
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.prompts import get_preset
from rerank_core.training.run import train_adapter
from rerank_core.training.samples import TARGET_NOT_AMONG_CANDIDATES, build_training_samples

RETRIEVER_TRAINING = {"candidate_source": "retriever", "candidates": 5, "max_samples": None, "max_prompt_tokens": None,
                      "history_items": 3}


def expected_outcome(dataset: Dataset, sampler: CandidateSampler, user: str, position: int, count: int) -> bool:
    """Whether the target is among the retriever's top `count` for this prefix, worked out with the retriever's
    scores (the baseline's path, not the sampler's top-k search): the history never proposed, the user's other
    items not negatives, ties by catalogue order."""
    sequence = dataset.training_sequence(user)
    history, target = sequence[:position], sequence[position]
    blocked = (set(dataset.touched(user)) - {target}) | set(history)
    allowed = sorted(set(dataset.items) - blocked)
    scores = sampler.retriever_scores(history, allowed)
    ranked = sorted(range(len(allowed)), key=lambda index: (-scores[index], allowed[index]))
    return target in {allowed[index] for index in ranked[:count]}


def test_retriever_samples_drop_the_targets_the_retriever_misses(smol_tokenizer) -> None:
    # Dense transitions (30 users over 30 items): the sample's own next item is not always in the top 5.
    dataset = make_toy_dataset(users=30, items=30, length=8)
    config = tiny_config(**RETRIEVER_TRAINING)
    samples, dropped = build_training_samples(dataset, smol_tokenizer, config)
    sampler = CandidateSampler(dataset, config.candidate_config())
    points = [(user, position) for user in dataset.users for position in range(1, len(dataset.training_sequence(user)))]
    kept = {(user, position) for user, position in points if expected_outcome(dataset, sampler, user, position, 5)}
    assert 0 < len(kept) < len(points)  # the case is informative: some kept, some dropped
    assert dropped == {"prompt_too_long": 0, TARGET_NOT_AMONG_CANDIDATES: len(points) - len(kept)}
    assert {(sample.user_id, sample.position) for sample in samples} == kept
    for sample in samples:
        assert sample.candidates.item_ids[sample.candidates.target_index] == sample.target
        assert sample.target not in sample.history and len(sample.candidates.item_ids) == 5
    # Shuffled: the target does not sit where the retriever ranked it for every sample.
    assert len({sample.candidates.target_index for sample in samples}) > 1
    # Random negatives drop nothing for this reason: the target is always there.
    _, random_dropped = build_training_samples(dataset, smol_tokenizer, replace(config, candidate_source="random"))
    assert TARGET_NOT_AMONG_CANDIDATES not in random_dropped


def test_a_target_repeated_from_the_history_is_never_a_retriever_candidate() -> None:
    items = {name: Item(name, name) for name in "abcdefgh"}
    dataset = Dataset("repeat", items, {"u1": ["a", "b", "a", "c", "d", "e"], "u2": ["a", "b", "c", "d", "e", "f"]})
    sampler = CandidateSampler(dataset, CandidateConfig(source="retriever", count=3))
    assert sampler.for_training("u1", ["a", "b"], "a", sample_key="2").target_index is None
    found = sampler.for_training("u2", ["a", "b"], "c", sample_key="2")
    assert found.item_ids[found.target_index] == "c"


def test_the_manifest_records_the_source_and_compare_warns_on_other_candidates(smol_tokenizer, tmp_path) -> None:
    loaded, dataset = tiny_loaded(smol_tokenizer), make_toy_dataset(users=30, items=30, length=8)
    config = tiny_config(**{**RETRIEVER_TRAINING, "max_samples": 24})
    report = train_adapter(loaded, dataset, config, "hard", root=tmp_path)
    manifest = json.loads((tmp_path / "hard" / MANIFEST_FILE).read_text())
    assert manifest["candidates"]["source"] == "retriever"
    assert manifest["report"]["dropped"][TARGET_NOT_AMONG_CANDIDATES] == report.dropped[TARGET_NOT_AMONG_CANDIDATES] > 0
    assert report.samples == 24 - report.dropped[TARGET_NOT_AMONG_CANDIDATES] - report.dropped["prompt_too_long"]
    inspector = Inspector(dataset, loaded, adapters_root=str(tmp_path))
    settings = InspectSettings(preset=get_preset("seed_after"), candidates=CandidateConfig(count=5))
    assert "adapter 'hard' learnt on retriever candidates, scored here on random candidates" in \
        inspector.resolve("hard", settings).note
    same = replace(settings, candidates=CandidateConfig(source="retriever", count=5))
    assert "learnt on" not in inspector.resolve("hard", same).note
