"""The quick preset sizes its prompt budget from the data, so long real titles do not drop every sample."""

from __future__ import annotations

from dataclasses import replace

import pytest
from conftest import make_toy_dataset

from rerank_core.cli.main import build_parser
from rerank_core.cli.train import config_from_args
from rerank_core.data.dataset import Dataset, Item
from rerank_core.training.config import TRAINING_PRESETS, TrainConfig, training_config
from rerank_core.training.samples import build_training_samples, size_prompt_budget, with_prompt_budget


def long_title_dataset() -> Dataset:
    """Titles of about 20 tokens each: 20 candidates alone need far more than the old fixed 320 tokens."""
    base = make_toy_dataset(users=20, items=80, length=10)
    items = {item_id: Item(item_id, f"{item.title}: the extended director's cut of a long forgotten film noir "
                                    "classic, restored")
             for item_id, item in base.items.items()}
    return Dataset("long", items, base.sequences)


def test_budget_grows_with_the_texts_and_keeps_every_sample(smol_tokenizer) -> None:
    dataset = long_title_dataset()
    quick = replace(TRAINING_PRESETS["quick"], max_samples=16, eval_users=0)
    assert quick.max_prompt_tokens is None  # the quick preset sizes its budget from the data
    fixed, _ = build_training_samples(dataset, smol_tokenizer, replace(quick, max_prompt_tokens=320))
    assert fixed == []  # the old fixed cap: not even the candidates fit

    budget = size_prompt_budget(dataset, smol_tokenizer, quick)
    assert budget.tokens > 320 and budget.history_items == 5 and budget.candidates == 20
    assert budget.median_tokens <= budget.tokens
    assert "20 candidates and the 5 most recent history items" in budget.describe()
    samples, dropped = build_training_samples(dataset, smol_tokenizer, quick)
    assert len(samples) == 16 and dropped == {"prompt_too_long": 0}
    assert all(sample.prompt.token_count <= budget.tokens for sample in samples)
    # Room for five recent items: a sample with a longer history keeps at least five of them.
    assert min(len(sample.prompt.history_texts) for sample in samples if len(sample.history) >= 5) >= 5


def test_more_history_items_mean_a_larger_budget_and_a_fixed_cap_is_kept(smol_tokenizer) -> None:
    dataset = long_title_dataset()
    small = size_prompt_budget(dataset, smol_tokenizer, training_config("quick", history_items=1))
    large = size_prompt_budget(dataset, smol_tokenizer, training_config("quick", history_items=8))
    assert large.tokens > small.tokens
    fixed = training_config("quick", max_prompt_tokens=999)
    assert with_prompt_budget(dataset, smol_tokenizer, fixed) == (fixed, None)
    sized, budget = with_prompt_budget(dataset, smol_tokenizer, TRAINING_PRESETS["quick"])
    assert sized.max_prompt_tokens == budget.tokens


@pytest.mark.parametrize("value", [-1, 51, True])
def test_history_items_is_bounded(value: object) -> None:
    with pytest.raises(ValueError, match="history_items"):
        TrainConfig(history_items=value)  # type: ignore[arg-type]


def test_zero_on_the_command_line_means_sized_from_the_data() -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["train", "--name", "a"])).max_prompt_tokens is None
    args = parser.parse_args(["train", "--name", "a", "--training-preset", "full", "--max-prompt-tokens", "0",
                              "--history-items", "3"])
    config = config_from_args(args)
    assert (config.max_prompt_tokens, config.history_items, config.max_samples) == (None, 3, None)
    assert config_from_args(parser.parse_args(["train", "--name", "a", "--max-prompt-tokens", "400"])) \
        .max_prompt_tokens == 400
