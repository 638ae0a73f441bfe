"""Every fine-tune setting declared once: the CLI flags, the app's form, its API and the job hand-over are built
from SETTINGS, and every value from any of them is parsed and bounded here."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from rerank_core.candidates import CANDIDATE_SOURCES
from rerank_core.data.item_text import TEXT_FIELDS, item_text_spelling
from rerank_core.limits import LIMITS, whole_number
from rerank_core.prompts import PRESETS
from rerank_core.verbalizer import STRATEGIES

__all__ = ["MAX_BUDGET_HISTORY_ITEMS", "SAMPLE_MODES", "SETTINGS", "Setting", "parse_settings", "setting"]

SAMPLE_MODES = ("prefixes", "random_split")
# A data-sized prompt budget makes room for at most this many history items (LlamaRec's prompts keep 20).
MAX_BUDGET_HISTORY_ITEMS = 50


@dataclass(frozen=True)
class Setting:
    """One TrainConfig field: its type, flag, help, choices and bounds (the defaults are the training presets')."""

    name: str
    kind: type  # int, float, str, bool, or tuple (a comma-separated list of names)
    flag: str
    help: str
    choices: tuple[str, ...] = ()
    low: float | None = None  # inclusive, unless low_open
    high: float | None = None  # inclusive, unless high_open
    low_open: bool = False
    high_open: bool = False
    zero_means: str = ""  # what 0 (on the command line, in the form or the API) means: that setting's None
    form: str = "advanced"  # where the app's Fine-tune form shows it: "main", "advanced", or "" (CLI only)
    label: str = ""  # how errors name it when the name alone is ambiguous ("preset": the prompt preset)
    # An open-ended text setting: the values a form offers, and the check that writes any value in its one
    # spelling or raises (the item-text spec's form; its parts are checked against the dataset when it loads).
    offered: tuple[str, ...] = ()
    normalize: Callable[[str], str] | None = None

    @property
    def rule(self) -> str:
        """The allowed values in words, for help texts and errors."""
        if self.choices:
            return f"one of {', '.join(self.choices)}"
        if self.offered:
            return f"one of {', '.join(self.offered)}, or the dataset's fields joined by '+'"
        if self.kind is bool or self.kind is tuple:
            return "a comma-separated list of names" if self.kind is tuple else "true or false"
        if self.kind is int and not (self.low_open or self.high_open):
            return f"a whole number from {_shown(self.low)} to {_shown(self.high)}" + self.zero_note
        low = "(" if self.low_open else "["
        high = ")" if self.high_open else "]"
        return f"in {low}{_shown(self.low)}, {_shown(self.high)}{high}" + self.zero_note

    @property
    def zero_note(self) -> str:
        return f" (0: {self.zero_means})" if self.zero_means else ""

    def parse(self, value: Any) -> Any:
        """A value from a flag, a form, an API call or a JSON file: typed, checked, 0 → None where 0 means all."""
        if self.kind is tuple:
            parts = value.split(",") if isinstance(value, str) else list(value)
            value = tuple(str(part).strip() for part in parts if str(part).strip())
        elif self.kind is bool:
            if not isinstance(value, bool):
                if str(value).lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"{self.name} must be true or false, got {value!r}")
                value = str(value).lower() in ("true", "1")
        elif self.kind is str:
            value = value if isinstance(value, str) else json.dumps(value)  # a JSON object given as one
            value = self.normalize(value) if self.normalize is not None else value
        else:
            value = self._number(value)
        if self.zero_means and value == 0:
            return None
        self.check(value)
        return value

    def check(self, value: Any) -> None:
        """Raise ValueError naming the setting when a typed value is outside its choices or bounds."""
        if value is None:
            if self.zero_means:
                return
            raise ValueError(f"{self.name} needs a value: {self.rule}")
        if self.choices and value not in self.choices:
            raise ValueError(f"{self.label or self.name.replace('_', ' ')} {value!r} is not one of "
                             f"{', '.join(self.choices)}")
        if self.normalize is not None:
            self.normalize(value)
        if self.kind is tuple and not value:
            raise ValueError(f"{self.name} is empty: name at least one, e.g. q_proj,v_proj")
        if self.kind in (int, float):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{self.name} must be a number, got {value!r}")
            outside = ((self.low is not None and (value < self.low or (self.low_open and value == self.low)))
                       or (self.high is not None and (value > self.high or (self.high_open and value == self.high))))
            if outside or not math.isfinite(value):
                raise ValueError(f"{self.name} must be {self.rule}, got {value}")

    def _number(self, value: Any) -> int | float:
        if self.kind is int:
            return whole_number(self.name, value)  # the same rule as every other whole-number input
        if isinstance(value, bool):
            raise ValueError(f"{self.name} must be a number, got {value!r}")
        try:
            return float(value)
        except (TypeError, ValueError):
            raise ValueError(f"{self.name} must be a number, got {value!r}") from None


def _shown(bound: float | None) -> str:
    if bound is None:
        return "∞"
    return str(int(bound)) if float(bound).is_integer() else str(bound)


# One line per setting, in the order the form and --help show them. Defaults: TRAINING_PRESETS in training/config.py;
# bounds shared with inspection (candidates, seed, prompt tokens) come from limits.LIMITS.
SETTINGS: tuple[Setting, ...] = (
    Setting("preset", str, "--preset", "prompt preset; *_after put the letter after the item text",
            choices=tuple(PRESETS), form="main", label="prompt preset"),
    Setting("template_kwargs", str, "--template-kwargs", "chat-template options as a JSON object, e.g. "
            "'{\"enable_thinking\": false}'; used for training and validation, recorded in the manifest and applied "
            "when the adapter is evaluated (checked by prompts.parse_template_kwargs)", form="main"),
    Setting("candidates", int, "--candidates", "candidates per prompt", low=LIMITS["candidates"].low,
            high=LIMITS["candidates"].high, form="main"),
    Setting("max_samples", int, "--max-samples", "draw at most this many training samples", low=1, high=10**9,
            zero_means="all of them", form="main"),
    Setting("epochs", float, "--epochs", "passes over the training samples (fractions allowed)", low=0,
            high=1000, low_open=True, form="main"),
    Setting("learning_rate", float, "--lr", "peak learning rate (AdamW, linear decay)", low=0, high=1,
            low_open=True, form="main"),
    Setting("lora_r", int, "--lora-r", "LoRA rank r", low=1, high=4096),
    Setting("lora_alpha", int, "--lora-alpha", "LoRA alpha (the update is scaled by alpha / r)", low=1, high=65536),
    Setting("lora_dropout", float, "--lora-dropout", "dropout on the LoRA input", low=0, high=1, high_open=True),
    Setting("batch_size", int, "--batch-size", "samples per step and process", low=1, high=65536),
    Setting("grad_accumulation", int, "--grad-accumulation", "micro-batches summed into one optimizer step",
            low=1, high=65536),
    Setting("warmup", float, "--warmup", "linear warm-up: below 1 a share of all steps, 1 or more a number of steps",
            low=0, high=10**9),
    Setting("eval_every", int, "--eval-every", "validation NDCG@10/Recall@10 every N steps (0: only before and "
            "after)", low=0, high=10**9),
    Setting("eval_users", int, "--eval-users", "size of the fixed validation subset (0: no validation)", low=0,
            high=10**6),
    Setting("max_prompt_tokens", int, "--max-prompt-tokens",
            "drop the oldest history items until the prompt fits this many tokens",
            low=LIMITS["max_prompt_tokens"].low, high=LIMITS["max_prompt_tokens"].high,
            zero_means="size it from the data, room for the candidates plus --history-items"),
    Setting("history_items", int, "--history-items", "recent history items a data-sized prompt budget makes room "
            "for", low=0, high=MAX_BUDGET_HISTORY_ITEMS),
    Setting("seed", int, "--seed", "seed for samples, candidates and LoRA initialisation",
            low=LIMITS["candidate_seed"].low, high=LIMITS["candidate_seed"].high),
    Setting("strategy", str, "--strategy", "verbalizer strategy for validation and the manifest",
            choices=tuple(STRATEGIES)),
    Setting("candidate_source", str, "--candidate-source", "where negatives come from",
            choices=tuple(CANDIDATE_SOURCES)),
    Setting("text_field", str, "--text-field", "item text in prompts: a named text, or fields joined by '+', e.g. "
            "title+year+genres+count (count: the item's interactions in the training part; the fields: the "
            "dataset's own, e.g. ml-100k-real's release_year and class)", offered=TEXT_FIELDS,
            normalize=item_text_spelling),
    Setting("sample_mode", str, "--sample-mode", "prefixes: every prefix of each training sequence (LlamaRec); "
            "random_split: one seeded split point per user (the research code)", choices=SAMPLE_MODES),
    Setting("train_on_eos", bool, "--train-on-eos", "also train the end-of-turn token(s) after the letter"),
    Setting("target_modules", tuple, "--target-modules",
            "comma-separated module names LoRA adapts, e.g. q_proj,v_proj", form=""),
)
_BY_NAME = {item.name: item for item in SETTINGS}


def setting(name: str) -> Setting:
    """The declaration of one setting, or a ValueError listing the known ones."""
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError(f"unknown training setting {name!r}; known: {', '.join(sorted(_BY_NAME))}") from None


def parse_settings(values: Mapping[str, Any]) -> dict[str, Any]:
    """Typed, checked values by name; a value left out (None or "") is not in the result, 0-means-all is None."""
    unknown = sorted(set(values) - set(_BY_NAME))
    if unknown:
        raise ValueError(f"unknown training setting(s) {', '.join(unknown)}; known: {', '.join(sorted(_BY_NAME))}")
    return {name: _BY_NAME[name].parse(value) for name, value in values.items() if value is not None and value != ""}
