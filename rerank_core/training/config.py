"""The settings of a fine-tune as one checked dataclass, and the quick/full training presets users start from."""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass, replace
from typing import Any

from rerank_core.candidates import CandidateConfig
from rerank_core.prompts import PromptPreset, get_preset, parse_template_kwargs, with_template_kwargs
from rerank_core.training.settings import SETTINGS, parse_settings, setting

__all__ = ["RENAMED_SETTINGS", "TRAINING_PRESETS", "RunCancelled", "TrainConfig", "TrainingError",
           "training_config"]

# Settings saved under an older name (config files, the "training" block of older adapter manifests): read
# under the old name, written under the new one.
RENAMED_SETTINGS = {"prompt_preset": "preset"}


class TrainingError(RuntimeError):
    """A training run that cannot start or finish as configured, with the fix in the message."""


class RunCancelled(Exception):
    """A stop request seen outside the Trainer loop; never escapes train_adapter."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a fine-tune; all of it goes into the adapter manifest."""

    lora_r: int = 16
    lora_alpha: int = 32
    # 0 in the quick preset: peft's dropout mask per projection costs a fifth of a CPU step (README, Benchmarks).
    lora_dropout: float = 0.0
    target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    learning_rate: float = 1e-3
    epochs: float = 1.0
    batch_size: int = 4
    grad_accumulation: int = 1
    # Below 1: a share of the total steps; 1 or more: a number of steps.
    warmup: float = 0.05
    max_samples: int | None = 192
    seed: int = 0
    # None: sized from the data (PromptBudget): the candidates plus `history_items` recent history items.
    max_prompt_tokens: int | None = None
    history_items: int = 5
    # The prompt preset's name, as the manifest and the --preset flag spell it (prompt_preset is the resolved one).
    preset: str = "seed_after"
    strategy: str = "as_trained"
    candidates: int = 20
    candidate_source: str = "random"
    text_field: str = "title"
    sample_mode: str = "prefixes"
    eval_every: int = 24
    eval_users: int = 32
    train_on_eos: bool = True
    # Chat-template options as JSON text (e.g. '{"enable_thinking": false}'), for training and evaluation alike.
    template_kwargs: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "template_kwargs", parse_template_kwargs(self.template_kwargs))
        _ = self.prompt_preset  # an unknown preset name fails here
        for item in SETTINGS:  # each setting's choices and bounds, as declared once in training.settings
            item.check(getattr(self, item.name))
        self.candidate_config()  # candidate count and seed checks live there

    @property
    def uniform_loss(self) -> float:
        """The letter loss of a model that spreads its answer evenly: ln(number of candidates)."""
        return math.log(self.candidates)

    def candidate_config(self) -> CandidateConfig:
        """The candidate draw these settings ask for, checked by CandidateConfig."""
        return CandidateConfig(source=self.candidate_source, count=self.candidates, seed=self.seed)

    @functools.cached_property
    def prompt_preset(self) -> PromptPreset:
        """The prompt preset with the chat-template options, resolved once from the name the config stores:
        samples, labels, the prompt budget and validation all render with it."""
        return with_template_kwargs(get_preset(self.preset), self.template_kwargs)

    def to_json(self) -> dict[str, Any]:
        """Plain values under the current setting names: the manifest's "training" block and --config files."""
        values = asdict(self)
        values["target_modules"] = list(self.target_modules)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TrainConfig:
        """The inverse of to_json (the app's job hands its settings over this way); every value is checked, and a
        setting saved under its older name (RENAMED_SETTINGS) is read under the new one."""
        renamed = {RENAMED_SETTINGS.get(name, name): value for name, value in values.items()
                   if not (name in RENAMED_SETTINGS and RENAMED_SETTINGS[name] in values)}
        return cls(**{name: setting(name).parse(value) if value is not None else None
                      for name, value in renamed.items()})


# quick: findings.md's setting (letter after the text, lr 1e-3, batch 4) sized for a 2-core CPU and the 135M
# default model: 192 samples of ~310 tokens (20 candidates, about 5 history items) lift test NDCG@10 on the
# bundled sample from 0.22 to 0.73, as much as 300 samples did (0.74) in two thirds of the time. The prompt
# budget is sized from the data (20 candidates + 5 recent items: 334 tokens on the sample, 492 on MovieLens 100K).
# full: a GPU run over every prefix with LlamaRec's longer prompts.
# movielens: the best setting known on the real MovieLens 100K (README, "Real data"): the titles alone teach the
# quick preset nothing there, the training-part interaction count in the item text does; 2 history items leave the
# count room, lr 2e-3 and 384 samples (96 steps, about 12 minutes on a 2-core CPU) drew level with popularity.
# Validation only before and after (eval_every 0): mid-run checks of 32 users cost more than they tell here.
TRAINING_PRESETS: dict[str, TrainConfig] = {
    "quick": TrainConfig(),
    "full": TrainConfig(lora_dropout=0.05, learning_rate=2e-4, epochs=2.0, batch_size=16, warmup=0.03,
                        max_samples=None, max_prompt_tokens=1536, eval_every=200, eval_users=200),
    "movielens": TrainConfig(learning_rate=2e-3, max_samples=384, history_items=2, text_field="title_count",
                             eval_every=0, candidates=20, candidate_source="random", preset="seed_after"),
}


def training_config(training_preset: str = "quick", **values: Any) -> TrainConfig:
    """A training preset with some settings replaced: values as a flag, the form or the API gives them (checked
    and typed by training.settings; None or "" keeps the preset's, 0 for max_samples means all samples)."""
    if training_preset not in TRAINING_PRESETS:
        raise ValueError(f"training preset {training_preset!r} is not one of {', '.join(TRAINING_PRESETS)}")
    return replace(TRAINING_PRESETS[training_preset], **parse_settings(values))
