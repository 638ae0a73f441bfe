"""LoRA fine-tuning on answer letters: samples, prefix labels, the HF Trainer run, events and safe saving."""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import json
import logging
import math
import os
import platform
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import torch

from rerank_core.adapters import (
    MANIFEST_FILE,
    AdapterError,
    adapters_root,
    new_staging_folder,
    publish_adapter,
    remove_stale,
    validate_adapter_name,
)
from rerank_core.candidates import CandidateConfig, CandidateSampler, CandidateSet
from rerank_core.data.dataset import Dataset
from rerank_core.fsutil import atomic_write_text
from rerank_core.inspector import BASE, Inspector, InspectSettings
from rerank_core.labels import IGNORE_INDEX, LabeledExample, label_example
from rerank_core.models import LoadedModel
from rerank_core.progress import CancelFlag
from rerank_core.prompts import (
    Prompt,
    PromptError,
    PromptPreset,
    build_prompt,
    get_preset,
    parse_template_kwargs,
    with_template_kwargs,
)
from rerank_core.scoring import ScoreCache
from rerank_core.training.forward import training_forward
from rerank_core.training.settings import MAX_BUDGET_HISTORY_ITEMS, SETTINGS, parse_settings, setting

__all__ = [
    "LOSS_LABELS",
    "LOSS_TOKENS",
    "MAX_BUDGET_HISTORY_ITEMS",
    "TRAINING_PRESETS",
    "VALIDATION_METRICS",
    "PromptBudget",
    "TrainConfig",
    "TrainReport",
    "TrainingError",
    "TrainingSample",
    "build_training_samples",
    "check_adapter_target",
    "label_samples",
    "loss_summary",
    "size_prompt_budget",
    "train_adapter",
    "training_config",
    "validation_users",
    "with_prompt_budget",
]

log = logging.getLogger(__name__)

VALIDATION_METRICS = ("NDCG@10", "Recall@10", "MRR@10")
EventSink = Callable[[dict[str, Any]], None]
# Prompts measured to size the budget: enough to see long titles, cheap next to training.
_BUDGET_PROBES = 64
_MANIFEST_FORMAT = 1
_PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy", "pandas")


class TrainingError(RuntimeError):
    """A training run that cannot start or finish as configured, with the fix in the message."""


class _Cancelled(Exception):
    """A stop request seen outside the Trainer loop; never escapes train_adapter."""


@dataclass(frozen=True)
class TrainConfig:
    """Every setting of a fine-tune; all of it goes into the adapter manifest."""

    lora_r: int = 16
    lora_alpha: int = 32
    # 0 in the quick preset: peft draws a dropout mask per projection, 0.9 s of a 4 s CPU step (1 Dec 2026).
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
    prompt_preset: str = "seed_after"
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
        _ = self.preset  # an unknown preset name fails here
        for item in SETTINGS:  # each setting's choices and bounds, as declared once in train_settings
            item.check(getattr(self, item.name))
        self.candidate_config()  # candidate count and seed checks live there

    @property
    def uniform_loss(self) -> float:
        """The letter loss of a model that spreads its answer evenly: ln(number of candidates)."""
        return math.log(self.candidates)

    def candidate_config(self) -> CandidateConfig:
        return CandidateConfig(source=self.candidate_source, count=self.candidates, seed=self.seed)

    @functools.cached_property
    def preset(self) -> PromptPreset:
        """The prompt preset with the chat-template options, resolved once from the name the config stores:
        samples, labels, the prompt budget and validation all render with it."""
        return with_template_kwargs(get_preset(self.prompt_preset), self.template_kwargs)

    def to_json(self) -> dict[str, Any]:
        values = asdict(self)
        values["target_modules"] = list(self.target_modules)
        return values

    @classmethod
    def from_json(cls, values: dict[str, Any]) -> TrainConfig:
        """The inverse of to_json (the app's job hands its settings over this way); every value is checked."""
        return cls(**{name: setting(name).parse(value) if value is not None else None
                      for name, value in values.items()})


# quick: findings.md's setting (letter after the text, lr 1e-3, batch 4) sized for a 2-core CPU and the 135M
# default model: 192 samples of ~310 tokens (20 candidates, about 5 history items) lift test NDCG@10 on the
# bundled sample from 0.22 to 0.73, as much as 300 samples did (0.74) in two thirds of the time. The prompt
# budget is sized from the data (20 candidates + 5 recent items: 334 tokens on the sample, 492 on MovieLens 100K).
# full: a GPU run over every prefix with LlamaRec's longer prompts.
TRAINING_PRESETS: dict[str, TrainConfig] = {
    "quick": TrainConfig(),
    "full": TrainConfig(lora_dropout=0.05, learning_rate=2e-4, epochs=2.0, batch_size=16, warmup=0.03,
                        max_samples=None, max_prompt_tokens=1536, eval_every=200, eval_users=200),
}


def training_config(preset: str = "quick", **values: Any) -> TrainConfig:
    """A training preset with some settings replaced: values as a flag, the form or the API gives them (checked
    and typed by train_settings; None or "" keeps the preset's, 0 for max_samples means all samples)."""
    if preset not in TRAINING_PRESETS:
        raise ValueError(f"training preset {preset!r} is not one of {', '.join(TRAINING_PRESETS)}")
    return replace(TRAINING_PRESETS[preset], **parse_settings(values))


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
        return (f"prompt budget {self.tokens} tokens: the longest of {self.measured} sample prompts with "
                f"{self.candidates} candidates and the {self.history_items} most recent history items "
                f"(median {self.median_tokens})")


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
            tokenizer, config.preset, [dataset.text(item, config.text_field) for item in history],
            [dataset.text(item, config.text_field) for item in candidates.item_ids])
        lengths.append(prompt.token_count)
    return PromptBudget(tokens=max(lengths), history_items=config.history_items, candidates=config.candidates,
                        measured=len(lengths), median_tokens=int(np.median(lengths)))


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
    for number, (user, position) in enumerate(points):
        if cancel is not None and number % 16 == 0 and cancel.requested:
            raise _Cancelled
        sequence = dataset.training_sequence(user)
        # Every history line costs at least one token, so older items could never fit the prompt:
        # capping them keeps each sample's cost bounded however long the user's sequence is.
        start = 0 if config.max_prompt_tokens is None else max(0, position - config.max_prompt_tokens)
        history, target = tuple(sequence[start:position]), sequence[position]
        candidates = sampler.for_training(user, history, target, sample_key=str(position))
        try:
            prompt = build_prompt(
                tokenizer, config.preset, [dataset.text(item, config.text_field) for item in history],
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
        example = label_example(tokenizer, config.preset, sample.prompt.text, sample.answer_letter,
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


# What total_loss averages over, by train_on_eos; the letter loss is always the answer letter alone.
LOSS_TOKENS = {True: "letter + end-of-turn tokens", False: "letter token only"}
LOSS_LABELS = {
    "letter_loss": "letter loss (answer letter token only; ln N = a uniform guess over the N letters)",
    "total_loss": "total loss (mean over every loss-carrying token: the letter and, by default, the "
                  "end-of-turn tokens)",
}


def loss_summary(letter_loss: float | None, total_loss: float | None, uniform_loss: float,
                 loss_tokens: str = LOSS_TOKENS[True]) -> str:
    """One line that says which loss is which, with ln N beside the letter loss it is comparable to."""
    parts = []
    if letter_loss is not None:
        parts.append(f"letter loss {letter_loss:.4f} (ln N = {uniform_loss:.4f})")
    if total_loss is not None:
        parts.append(f"total loss {total_loss:.4f} ({loss_tokens})")
    return "; ".join(parts)


@dataclass
class TrainReport:
    """What a run did: samples, drops, time, losses against ln(N), validation before and after."""

    adapter: str
    status: str = "running"
    path: str | None = None
    samples: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    users_without_samples: int = 0
    steps: int = 0
    total_steps: int = 0
    world_size: int = 1
    wall_time_s: float = 0.0
    train_time_s: float = 0.0
    samples_per_s: float = 0.0
    final_loss: float | None = None  # the total loss (letter + end-of-turn tokens) of the last step
    final_letter_loss: float | None = None  # the answer letter's loss alone: compare with uniform_loss
    uniform_loss: float = 0.0
    loss_tokens: str = LOSS_TOKENS[True]  # what final_loss averages over
    validation: dict[str, dict[str, float]] = field(default_factory=dict)
    prompt_budget: dict[str, int] = field(default_factory=dict)
    replica_digests: list[str] = field(default_factory=list)

    @property
    def loss_line(self) -> str:
        return loss_summary(self.final_letter_loss, self.final_loss, self.uniform_loss, self.loss_tokens)

    def to_json(self) -> dict[str, Any]:
        return {**asdict(self), "loss_line": self.loss_line, "loss_labels": LOSS_LABELS}


# -- the run ------------------------------------------------------------------------------------


class _LeftPadCollator:
    """Pads a batch on the left (labels were built at preparation): every row's answer ends the row."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, rows: Sequence[dict[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        longest = max(len(row["input_ids"]) for row in rows)
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long)
        labels = torch.full((len(rows), longest), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), longest), dtype=torch.long)
        for index, row in enumerate(rows):
            length = len(row["input_ids"])
            input_ids[index, longest - length:] = torch.tensor(row["input_ids"], dtype=torch.long)
            labels[index, longest - length:] = torch.tensor(row["labels"], dtype=torch.long)
            attention_mask[index, longest - length:] = 1
        # Positions counted from each row's first real token: a padded row sees what it would see alone,
        # exactly as scoring feeds prompts.
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "labels": labels}


def _answer_loss(model: Any, inputs: dict[str, torch.Tensor],
                 labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, Any]:
    """Mean loss over the labelled tokens, and each row's letter (first labelled token) loss.

    Left padding puts every loss position in the last `span` columns, so the model computes logits
    there only: full-vocabulary logits for every prompt position would cost time and memory for nothing.
    """
    carries = labels != IGNORE_INDEX
    first = carries.int().argmax(dim=1)
    width = labels.shape[1]
    span = width - int(first.min())
    # Positions as an index tensor, not a count: the count slices a strided view, and a bf16 Linear on a
    # strided 3-D input broadcasts the head's weight per row (a 4-row batch: 463 ms a pass instead of 6 ms).
    keep = torch.arange(width - span - 1, width, device=labels.device)
    outputs = model(**inputs, logits_to_keep=keep, use_cache=False)
    logits = outputs.logits[:, :-1, :].float()  # position t predicts token t + 1
    targets = labels[:, -span:]
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none").view(targets.shape)
    loss = token_loss.sum() / carries.sum()
    letter_loss = token_loss[torch.arange(len(labels), device=labels.device), first - (width - span)]
    return loss, letter_loss.detach(), outputs


def _make_trainer(*args: Any, **kwargs: Any) -> Any:
    """A Trainer that computes the answer loss itself and logs the letter loss beside it."""
    # transformers takes seconds to import: only once a run starts, not for `train --help`
    from transformers import Trainer

    class AnswerLossTrainer(Trainer):
        # compute_loss returns a per-batch mean: the Trainer divides it by the accumulation steps.
        loss_is_scaled_for_ga = False

        def __init__(self, *inner_args: Any, **inner_kwargs: Any) -> None:
            super().__init__(*inner_args, **inner_kwargs)
            self._letter_sum = torch.zeros((), dtype=torch.float64)
            self._letter_count = 0

        def compute_loss(self, model: Any, inputs: dict[str, torch.Tensor], return_outputs: bool = False,
                         num_items_in_batch: Any = None) -> Any:
            labels = inputs.pop("labels")
            with training_forward(model, inputs["input_ids"]):
                loss, letter_loss, outputs = _answer_loss(model, inputs, labels)
            self._letter_sum = self._letter_sum + letter_loss.double().sum()
            self._letter_count += len(letter_loss)
            return (loss, outputs) if return_outputs else loss

        def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
            if "loss" in logs:
                totals = torch.tensor([float(self._letter_sum), float(self._letter_count)],
                                      dtype=torch.float64, device=self.args.device)
                if self.args.world_size > 1:
                    torch.distributed.all_reduce(totals)  # every rank logs at the same step
                logs["letter_loss"] = float(totals[0] / max(float(totals[1]), 1.0))
                self._letter_sum = torch.zeros((), dtype=torch.float64)
                self._letter_count = 0
            super().log(logs, start_time)

    return AnswerLossTrainer(*args, **kwargs)


def _package_versions() -> dict[str, str]:
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        versions["rerank-inspector"] = importlib.metadata.version("rerank-inspector")
    except importlib.metadata.PackageNotFoundError:
        versions["rerank-inspector"] = "source checkout"
    return versions


def _lora_digest(peft_model: Any) -> str:
    """A hash of the trained LoRA weights: equal on every replica of a correct data-parallel run."""
    # peft takes seconds to import: only once a run starts
    from peft import get_peft_model_state_dict

    digest = hashlib.sha256()
    for key, tensor in sorted(get_peft_model_state_dict(peft_model).items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def _gather(value: str, world_size: int) -> list[str]:
    if world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return [str(item) for item in gathered]


def _rank_and_world() -> tuple[int, int]:
    """From the launcher's environment (torchrun / accelerate launch set RANK and WORLD_SIZE)."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


class _Validator:
    """NDCG@10 / Recall@10 / MRR@10 of the in-training model on a fixed validation subset."""

    def __init__(self, dataset: Dataset, loaded: LoadedModel, peft_model: Any, config: TrainConfig,
                 cancel: CancelFlag | None) -> None:
        self.users = validation_users(dataset, config.eval_users, config.seed)
        self.settings = InspectSettings(
            preset=config.preset, strategy=config.strategy, text_field=config.text_field,
            split="validation", candidates=config.candidate_config(),
            max_prompt_tokens=config.max_prompt_tokens, use_adapter_preset=False,
            template_kwargs=config.template_kwargs)
        # The LoRA-injected module (not the PeftModel wrapper) scores with the adapter on as "base".
        self.inspector = Inspector(dataset, replace(loaded, model=peft_model.base_model))
        self.peft_model = peft_model
        self.cancel = cancel

    def __call__(self) -> dict[str, float]:
        def check(done: int, total: int) -> None:
            if self.cancel is not None and self.cancel.requested:
                raise _Cancelled

        self.inspector.cache = ScoreCache()  # weights changed since the last call
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            frame = self.inspector.evaluate(self.users, self.settings, progress=check)
        finally:
            self.peft_model.train(was_training)
        return {name: float(frame[name].mean()) for name in VALIDATION_METRICS}


def _run_callback(emit: EventSink, cancel: CancelFlag | None, validate: Callable[[], dict[str, float]] | None,
                  config: TrainConfig, report: TrainReport, started: float) -> Any:
    # transformers takes seconds to import: only once a run starts
    from transformers import TrainerCallback

    class RunCallback(TrainerCallback):
        """Step events, periodic validation, and the cancel check at every step boundary."""

        def __init__(self) -> None:
            self.cancelled = False
            self.train_started = time.monotonic()

        def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.train_started = time.monotonic()
            report.total_steps = state.max_steps
            emit({"event": "stage", "stage": "training", "total_steps": state.max_steps})

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            flag = torch.tensor([1.0 if cancel is not None and cancel.requested else 0.0], device=args.device)
            if args.world_size > 1:
                # Every replica must stop at the same step, or the others wait forever in a collective.
                torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            if flag.item() > 0:
                self.cancelled = True
                control.should_training_stop = True

        def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, float] | None = None,
                   **kwargs: Any) -> None:
            if not logs or "loss" not in logs:
                return
            step, total = state.global_step, state.max_steps
            elapsed = time.monotonic() - self.train_started
            report.steps = step
            report.final_loss = float(logs["loss"])
            report.final_letter_loss = logs.get("letter_loss")
            # "loss" stays for readers of older event logs; it is the total loss.
            emit({"event": "step", "step": step, "total_steps": total, "loss": float(logs["loss"]),
                  "total_loss": float(logs["loss"]), "letter_loss": logs.get("letter_loss"),
                  "loss_tokens": LOSS_TOKENS[config.train_on_eos], "uniform_loss": config.uniform_loss,
                  "learning_rate": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
                  "epoch": logs.get("epoch"), "elapsed": time.monotonic() - started,
                  "eta": elapsed / max(step, 1) * (total - step)})
            if (validate is not None and config.eval_every and step % config.eval_every == 0
                    and step < total and not self.cancelled):
                metrics = validate()
                report.validation[str(step)] = metrics
                emit({"event": "validation", "step": step, "elapsed": time.monotonic() - started, **metrics})

    return RunCallback()


def _has_lora_layers(model: Any) -> bool:
    # peft takes seconds to import: only once a run starts
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def _manifest(loaded: LoadedModel, dataset: Dataset, config: TrainConfig, name: str,
              report: TrainReport, training_preset: str | None) -> dict[str, Any]:
    return {
        "format": _MANIFEST_FORMAT,
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": {"name": loaded.name, "path": loaded.path, "fingerprint": loaded.fingerprint,
                       "dtype": str(loaded.dtype).replace("torch.", "")},
        "preset": config.prompt_preset,
        "template_kwargs": config.template_kwargs,
        "strategy": config.strategy,
        "candidates": {"source": config.candidate_source, "count": config.candidates, "seed": config.seed},
        "dataset": {"name": dataset.name, "source": dataset.source, "fingerprint": dataset.fingerprint(),
                    "users": len(dataset.sequences), "items": len(dataset.items)},
        "training_preset": training_preset,
        "training": config.to_json(),
        "versions": _package_versions(),
        "validation": {"split": "validation", "users": config.eval_users,
                       "before": report.validation.get("before"), "after": report.validation.get("after")},
        "report": report.to_json(),
    }


def check_adapter_target(name: str, root: str | os.PathLike[str] | None = None, *, overwrite: bool = False) -> Path:
    """adapters/<name>, if the name is valid and free (or may be overwritten): checked before any work."""
    validate_adapter_name(name)
    if name == BASE:
        raise AdapterError(f"{BASE!r} names the model without an adapter in every picker: choose another name")
    target = adapters_root(root) / name
    if target.exists() and not overwrite:
        raise AdapterError(f"adapter {name!r} already exists in {target.parent}; choose another name or pass "
                           "overwrite=True (--overwrite) to replace it")
    return target


def train_adapter(
    loaded: LoadedModel,
    dataset: Dataset,
    config: TrainConfig,
    name: str,
    *,
    root: str | os.PathLike[str] | None = None,
    overwrite: bool = False,
    on_event: EventSink | None = None,
    cancel: CancelFlag | None = None,
    training_preset: str | None = None,
) -> TrainReport:
    """Fine-tune LoRA on `loaded` and publish adapters/<name>; returns the report (status done or cancelled).

    Runs unchanged under `torchrun` / `accelerate launch`: every process trains its share, rank 0 alone
    validates, emits events and writes the adapter. Nothing is visible in adapters/ until the complete
    folder is renamed into place; a cancelled or failed run deletes its staging folder. `loaded.model`
    gets its LoRA layers removed again at the end, so the caller can keep using the base model.

    Events passed to `on_event` (each also has "time" and "adapter"), in order:
      start       pid, world_size, config, training_preset, model, dataset, uniform_loss
      stage       stage = samples | prompt budget (max_prompt_tokens, detail; when sized from the data) |
                  samples ready (samples, dropped) | validation (step) |
                  training (total_steps) | saving
      validation  step (0 = before training), elapsed, NDCG@10, Recall@10, MRR@10
      step        step, total_steps, letter_loss (the answer letter token alone: compare it with
                  uniform_loss = ln N), total_loss (mean over every loss-carrying token: the letter and,
                  with train_on_eos, the end-of-turn tokens; "loss" repeats it), loss_tokens (which tokens
                  total_loss covers), learning_rate, grad_norm, epoch, elapsed, eta (seconds)
      done | cancelled (reason) | failed (error)   report (TrainReport.to_json()); done also has path
    """
    # transformers and peft take seconds to import: only once a run starts
    from peft import LoraConfig, get_peft_model
    from transformers import TrainingArguments, set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    validate_adapter_name(name)  # before remove_stale touches the folder
    rank, world_size = _rank_and_world()
    is_main = rank == 0
    folder = adapters_root(root)
    started = time.monotonic()
    report = TrainReport(adapter=name, world_size=world_size, uniform_loss=config.uniform_loss,
                         loss_tokens=LOSS_TOKENS[config.train_on_eos])

    def emit(event: dict[str, Any]) -> None:
        if is_main and on_event is not None:
            on_event({"time": time.time(), "adapter": name, **event})

    if is_main:
        remove_stale(folder)
    check_adapter_target(name, folder, overwrite=overwrite)
    if _has_lora_layers(loaded.model):
        raise TrainingError("the loaded model already carries LoRA layers (an adapter was loaded into it); "
                            "load a fresh base model to train a new adapter")

    emit({"event": "start", "pid": os.getpid(), "world_size": world_size, "config": config.to_json(),
          "training_preset": training_preset, "model": {"name": loaded.name, "fingerprint": loaded.fingerprint},
          "dataset": {"name": dataset.name, "fingerprint": dataset.fingerprint()},
          "uniform_loss": config.uniform_loss})
    staging: Path | None = None
    work_dir = Path(tempfile.mkdtemp(prefix="rerank-train-"))
    peft_model = None
    try:
        emit({"event": "stage", "stage": "samples"})
        config, budget = with_prompt_budget(dataset, loaded.tokenizer, config)
        if budget is not None:
            report.prompt_budget = asdict(budget)
            emit({"event": "stage", "stage": "prompt budget", "max_prompt_tokens": budget.tokens,
                  "detail": budget.describe()})
        samples, dropped = build_training_samples(dataset, loaded.tokenizer, config, cancel=cancel)
        context = getattr(loaded.model.config, "max_position_embeddings", None)
        examples, unlabelled = label_samples(loaded.tokenizer, samples, config, max_length=context)
        report.dropped = {**dropped, **unlabelled}
        report.samples = len(examples)
        report.users_without_samples = sum(1 for user in dataset.users
                                           if len(dataset.training_sequence(user)) < 2)
        emit({"event": "stage", "stage": "samples ready", "samples": report.samples, "dropped": report.dropped})
        if not examples:
            raise TrainingError(
                f"no training example is left (dropped: {report.dropped}); users need at least 4 "
                "interactions, and prompts must fit max_prompt_tokens: raise it or use fewer candidates")
        if cancel is not None and cancel.requested:
            raise _Cancelled
        if is_main:
            staging = new_staging_folder(folder)

        set_seed(config.seed)
        peft_model = get_peft_model(loaded.model, LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM"))
        validate = (_Validator(dataset, loaded, peft_model, config, cancel)
                    if is_main and config.eval_users > 0 else None)
        if validate is not None:
            emit({"event": "stage", "stage": "validation", "step": 0})
            # LoRA's B matrices start at zero: step 0 is exactly the base model.
            report.validation["before"] = validate()
            emit({"event": "validation", "step": 0, "elapsed": time.monotonic() - started,
                  **report.validation["before"]})

        on_cpu = str(loaded.device).startswith("cpu")
        arguments = TrainingArguments(
            output_dir=str(work_dir), per_device_train_batch_size=config.batch_size,
            gradient_accumulation_steps=config.grad_accumulation, num_train_epochs=config.epochs,
            learning_rate=config.learning_rate, warmup_steps=config.warmup, lr_scheduler_type="linear",
            weight_decay=0.0, logging_strategy="steps", logging_steps=1, save_strategy="no",
            eval_strategy="no", report_to="none", disable_tqdm=True, seed=config.seed, data_seed=config.seed,
            use_cpu=on_cpu, ddp_backend="gloo" if on_cpu and world_size > 1 else None,
            dataloader_num_workers=0, dataloader_pin_memory=not on_cpu, remove_unused_columns=False,
            label_names=["labels"], ddp_find_unused_parameters=False, average_tokens_across_devices=False)
        callback = _run_callback(emit, cancel, validate, config, report, started)
        trainer = _make_trainer(
            model=peft_model, args=arguments, data_collator=_LeftPadCollator(_pad_id(loaded.tokenizer)),
            train_dataset=[{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples],
            callbacks=[callback])
        for noisy in (PrinterCallback, ProgressCallback):
            trainer.remove_callback(noisy)
        train_started = time.monotonic()
        trainer.train()
        report.train_time_s = time.monotonic() - train_started
        trained_share = report.steps / max(report.total_steps, 1)
        report.samples_per_s = report.samples * config.epochs * trained_share / max(report.train_time_s, 1e-9)
        if callback.cancelled:
            raise _Cancelled

        if validate is not None:
            emit({"event": "stage", "stage": "validation", "step": report.steps})
            report.validation["after"] = validate()
            emit({"event": "validation", "step": report.steps, "elapsed": time.monotonic() - started,
                  **report.validation["after"]})
        report.replica_digests = _gather(_lora_digest(peft_model), world_size)
        if len(set(report.replica_digests)) > 1:
            raise TrainingError(f"the {world_size} training processes ended with different LoRA weights "
                                f"({report.replica_digests}): the data-parallel setup is broken")
        if is_main:
            emit({"event": "stage", "stage": "saving"})
            peft_model.save_pretrained(str(staging))
            report.wall_time_s = time.monotonic() - started
            report.status = "done"
            report.path = str(folder / name)
            atomic_write_text(staging / MANIFEST_FILE, json.dumps(
                _manifest(loaded, dataset, config, name, report, training_preset), indent=2, default=str))
            publish_adapter(staging, name, folder, overwrite=overwrite)
            staging = None
        report.status = "done"
        report.wall_time_s = time.monotonic() - started
        emit({"event": "done", "path": report.path, "report": report.to_json()})
        return report
    except (_Cancelled, KeyboardInterrupt):
        report.status = "cancelled"
        report.wall_time_s = time.monotonic() - started
        emit({"event": "cancelled", "reason": cancel.reason if cancel is not None else None,
              "report": report.to_json()})
        return report
    except BaseException as error:
        report.status = "failed"
        report.wall_time_s = time.monotonic() - started
        emit({"event": "failed", "error": f"{type(error).__name__}: {error}", "report": report.to_json()})
        raise
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(work_dir, ignore_errors=True)
        if peft_model is not None:
            peft_model.unload()  # gives the caller its base model back, LoRA layers removed
            loaded.model.eval()


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
