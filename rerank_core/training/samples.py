"""Training samples cut from each user's sequence, the data-sized prompt budget, and their prefix labels."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from rerank_core.candidates import CandidateSampler, CandidateSet
from rerank_core.data.dataset import Dataset
from rerank_core.labels import LabeledExample, label_example
from rerank_core.progress import CancelFlag
from rerank_core.prompts import Prompt, PromptError, build_prompt
from rerank_core.training.config import RunCancelled, TrainConfig, TrainingError

__all__ = [
    "TARGET_NOT_AMONG_CANDIDATES",
    "PromptBudget",
    "TrainingSample",
    "build_training_samples",
    "item_text_cost",
    "label_samples",
    "size_prompt_budget",
    "validation_users",
    "with_prompt_budget",
]

# Prompts measured to size the budget: enough to see long titles, cheap next to training.
_BUDGET_PROBES = 64
# The reason a sample on retriever candidates is dropped, as reports and the manifest name it.
TARGET_NOT_AMONG_CANDIDATES = "target_not_among_candidates"


@dataclass(frozen=True)
class TrainingSample:
    """One (history, candidates, answer letter) example cut from a user's training sequence."""

    user_id: str
    position: int
    history: tuple[str, ...]
    target: str
    candidates: CandidateSet
    prompt: Prompt

    @property
    def answer_letter(self) -> str:
        """The letter the model is trained to answer: the target's letter in this prompt."""
        return self.prompt.letters[self.candidates.target_index]


def _seeded_rng(*parts: object) -> np.random.Generator:
    # hashlib, not hash(): Python salts str hashes per process, and samples must repeat across runs.
    digest = hashlib.sha256("|".join(map(str, parts)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _split_points(dataset: Dataset, config: TrainConfig) -> list[tuple[str, int]]:
    """(user, target position) pairs; one pass over the sequences, nothing built yet."""
    points: list[tuple[str, int]] = []
    for user in dataset.users:
        length = len(dataset.training_sequence(user))
        if length < 2:
            continue  # a target needs at least one history item before it
        if config.sample_mode == "prefixes":
            points.extend((user, position) for position in range(1, length))
        else:
            points.append((user, int(_seeded_rng(config.seed, "split", user).integers(1, length))))
    return points


@dataclass(frozen=True)
class PromptBudget:
    """A prompt budget sized from the data: the longest of some sample prompts with a few recent history items."""

    tokens: int
    history_items: int
    candidates: int
    measured: int
    median_tokens: int

    def describe(self) -> str:
        """The budget and where it comes from, in one line for the progress output."""
        return (f"prompt budget {self.tokens} tokens: the longest of {self.measured} sample prompts with "
                f"{self.candidates} candidates and the {self.history_items} most recent history items "
                f"(median {self.median_tokens})")

    def describe_cost(self, text_field: str) -> str:
        """What an item text costs, in one line shown before a run (the CLI's train, the app's preview)."""
        return (f"item text {text_field!r}: median {self.median_tokens}, max {self.tokens} prompt tokens "
                f"({self.measured} seeded sample prompts of {self.candidates} candidates and "
                f"{self.history_items} history items)")


def size_prompt_budget(dataset: Dataset, tokenizer: Any, config: TrainConfig) -> PromptBudget:
    """Measure seeded sample prompts (candidates plus config.history_items recent items) and take the longest.

    A fixed cap sized for one dataset drops every sample of a dataset with longer titles; this one grows with
    the texts, and longer histories still get their oldest items dropped to fit.
    """
    points = _split_points(dataset, config)
    if not points:
        raise TrainingError("no user has the 4 interactions a training sample needs (history, target, "
                            "validation and test items)")
    chosen = _seeded_rng(config.seed, "budget").choice(len(points), size=min(_BUDGET_PROBES, len(points)),
                                                        replace=False)
    sampler = CandidateSampler(dataset, config.candidate_config())
    lengths = []
    for index in sorted(chosen.tolist()):
        user, position = points[index]
        sequence = dataset.training_sequence(user)
        history = tuple(sequence[max(0, position - config.history_items):position])
        candidates = sampler.for_training(user, history, sequence[position], sample_key=str(position))
        prompt = build_prompt(
            tokenizer, config.prompt_preset, [dataset.text(item, config.text_field) for item in history],
            [dataset.text(item, config.text_field) for item in candidates.item_ids])
        lengths.append(prompt.token_count)
    return PromptBudget(tokens=max(lengths), history_items=config.history_items, candidates=config.candidates,
                        measured=len(lengths), median_tokens=int(np.median(lengths)))


def item_text_cost(dataset: Dataset, tokenizer: Any, config: TrainConfig) -> PromptBudget:
    """What config.text_field costs in prompt tokens, measured before a run so item texts can be compared:
    the median and longest of the seeded sample prompts size_prompt_budget measures (tokenizing only).

    The spec is checked against the dataset first: an unknown part is one error naming it, before any prompt.
    """
    dataset.item_text(config.text_field)
    return size_prompt_budget(dataset, tokenizer, config)


def with_prompt_budget(dataset: Dataset, tokenizer: Any,
                       config: TrainConfig) -> tuple[TrainConfig, PromptBudget | None]:
    """The config with a data-sized max_prompt_tokens when it has none; a fixed cap is kept (budget None)."""
    if config.max_prompt_tokens is not None:
        return config, None
    budget = size_prompt_budget(dataset, tokenizer, config)
    return replace(config, max_prompt_tokens=budget.tokens), budget


def build_training_samples(
    dataset: Dataset,
    tokenizer: Any,
    config: TrainConfig,
    *,
    cancel: CancelFlag | None = None,
) -> tuple[list[TrainingSample], dict[str, int]]:
    """Training samples and the count of dropped ones by reason; linear in the number of interactions.

    Split points are listed first (cheap), `max_samples` of them drawn with the seed, and only those get
    candidates and a prompt: a small run over a large dataset does not tokenize the whole dataset.
    """
    config, _ = with_prompt_budget(dataset, tokenizer, config)
    points = _split_points(dataset, config)
    if config.max_samples is not None and len(points) > config.max_samples:
        chosen = _seeded_rng(config.seed, "select").choice(len(points), size=config.max_samples, replace=False)
        points = [points[index] for index in sorted(chosen.tolist())]
    sampler = CandidateSampler(dataset, config.candidate_config())
    samples: list[TrainingSample] = []
    dropped = {"prompt_too_long": 0}
    if config.candidate_source == "retriever":
        # Retriever candidates are the retriever's top N, as evaluated: a target it misses has no letter to learn.
        dropped[TARGET_NOT_AMONG_CANDIDATES] = 0
    for number, (user, position) in enumerate(points):
        if cancel is not None and number % 16 == 0 and cancel.requested:
            raise RunCancelled
        sequence = dataset.training_sequence(user)
        # Every history line costs at least one token, so older items could never fit the prompt:
        # capping them keeps each sample's cost bounded however long the user's sequence is.
        start = 0 if config.max_prompt_tokens is None else max(0, position - config.max_prompt_tokens)
        history, target = tuple(sequence[start:position]), sequence[position]
        candidates = sampler.for_training(user, history, target, sample_key=str(position))
        if candidates.target_index is None:
            dropped[TARGET_NOT_AMONG_CANDIDATES] += 1
            continue
        try:
            prompt = build_prompt(
                tokenizer, config.prompt_preset, [dataset.text(item, config.text_field) for item in history],
                [dataset.text(item, config.text_field) for item in candidates.item_ids],
                max_prompt_tokens=config.max_prompt_tokens)
        except PromptError:
            dropped["prompt_too_long"] += 1
            continue
        samples.append(TrainingSample(user, position, history, target, candidates, prompt))
    return samples, dropped


def label_samples(
    tokenizer: Any,
    samples: Sequence[TrainingSample],
    config: TrainConfig,
    *,
    max_length: int | None = None,
) -> tuple[list[LabeledExample], dict[str, int]]:
    """Prefix labels for every sample; examples left with no loss-carrying token are dropped and counted."""
    examples: list[LabeledExample] = []
    dropped = {"no_loss_token": 0}
    for sample in samples:
        example = label_example(tokenizer, config.prompt_preset, sample.prompt.text, sample.answer_letter,
                                train_on_eos=config.train_on_eos, max_length=max_length)
        if example.loss_tokens == 0:
            dropped["no_loss_token"] += 1
            continue
        examples.append(example)
    return examples, dropped


def validation_users(dataset: Dataset, count: int, seed: int) -> list[str]:
    """A small fixed validation subset: the same users for every evaluation of a run."""
    users = dataset.users
    if count >= len(users):
        return users
    chosen = _seeded_rng(seed, "validation-users").choice(len(users), size=count, replace=False)
    return [users[index] for index in sorted(chosen.tolist())]
