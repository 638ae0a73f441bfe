"""The Hugging Face Trainer set up for letter training: left-padded batches, the answer loss, step events with
periodic validation and cancel checks, and the replica check of a data-parallel run."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from rerank_core.data.dataset import Dataset
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.labels import IGNORE_INDEX, LabeledExample
from rerank_core.models import LoadedModel
from rerank_core.progress import CancelFlag
from rerank_core.scoring import ScoreCache
from rerank_core.training.config import RunCancelled, TrainConfig
from rerank_core.training.forward import training_forward
from rerank_core.training.samples import validation_users

__all__ = [
    "LOSS_LABELS",
    "LOSS_TOKENS",
    "VALIDATION_METRICS",
    "EventSink",
    "TrainReport",
    "Validator",
    "answer_loss_trainer",
    "has_lora_layers",
    "lora_digest",
    "loss_summary",
    "replica_values",
    "run_callback",
    "training_arguments",
]

VALIDATION_METRICS = ("NDCG@10", "Recall@10", "MRR@10")
EventSink = Callable[[dict[str, Any]], None]


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
    # A model split over GPUs returns logits on its last device: the loss is computed there.
    targets = labels[:, -span:].to(logits.device)
    token_loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=IGNORE_INDEX,
        reduction="none").view(targets.shape)
    loss = token_loss.sum() / carries.sum().to(logits.device)
    rows = torch.arange(len(labels), device=logits.device)
    letter_loss = token_loss[rows, (first - (width - span)).to(logits.device)]
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


def training_arguments(config: TrainConfig, loaded: LoadedModel, work_dir: Path, world_size: int) -> Any:
    """The Trainer's arguments: the config's optimisation settings, no checkpoints, logging at every step."""
    # transformers takes seconds to import: only once a run starts
    from transformers import TrainingArguments

    on_cpu = str(loaded.device).startswith("cpu")
    return TrainingArguments(
        output_dir=str(work_dir), per_device_train_batch_size=config.batch_size,
        gradient_accumulation_steps=config.grad_accumulation, num_train_epochs=config.epochs,
        learning_rate=config.learning_rate, warmup_steps=config.warmup, lr_scheduler_type="linear",
        weight_decay=0.0, logging_strategy="steps", logging_steps=1, save_strategy="no",
        eval_strategy="no", report_to="none", disable_tqdm=True, seed=config.seed, data_seed=config.seed,
        use_cpu=on_cpu, ddp_backend="gloo" if on_cpu and world_size > 1 else None,
        dataloader_num_workers=0, dataloader_pin_memory=not on_cpu, remove_unused_columns=False,
        label_names=["labels"], ddp_find_unused_parameters=False, average_tokens_across_devices=False)


def answer_loss_trainer(peft_model: Any, arguments: Any, loaded: LoadedModel, examples: Sequence[LabeledExample],
                        callback: Any) -> Any:
    """The Trainer over the labelled examples, with the run's callback and without transformers' console output."""
    # transformers takes seconds to import: only once a run starts
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    trainer = _make_trainer(
        model=peft_model, args=arguments, data_collator=_LeftPadCollator(_pad_id(loaded.tokenizer)),
        train_dataset=[{"input_ids": list(e.input_ids), "labels": list(e.labels)} for e in examples],
        callbacks=[callback])
    for noisy in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(noisy)
    return trainer


class Validator:
    """NDCG@10 / Recall@10 / MRR@10 of the in-training model on a fixed validation subset."""

    def __init__(self, dataset: Dataset, loaded: LoadedModel, peft_model: Any, config: TrainConfig,
                 cancel: CancelFlag | None) -> None:
        self.users = validation_users(dataset, config.eval_users, config.seed)
        self.settings = InspectSettings(
            preset=config.prompt_preset, strategy=config.strategy, text_field=config.text_field,
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
                raise RunCancelled

        self.inspector.cache = ScoreCache()  # weights changed since the last call
        was_training = self.peft_model.training
        self.peft_model.eval()
        try:
            frame = self.inspector.evaluate(self.users, self.settings, progress=check)
        finally:
            self.peft_model.train(was_training)
        return {name: float(frame[name].mean()) for name in VALIDATION_METRICS}


def run_callback(emit: EventSink, cancel: CancelFlag | None, validate: Callable[[], dict[str, float]] | None,
                 config: TrainConfig, report: TrainReport, started: float) -> Any:
    """The Trainer callback that turns steps into events, validates every eval_every steps and stops on cancel."""
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


def has_lora_layers(model: Any) -> bool:
    """Whether an adapter was already loaded into the model: training on top of it would publish a mixture."""
    # peft takes seconds to import: only once a run starts
    from peft.tuners.tuners_utils import BaseTunerLayer

    return any(isinstance(module, BaseTunerLayer) for module in model.modules())


def lora_digest(peft_model: Any) -> str:
    """A hash of the trained LoRA weights: equal on every replica of a correct data-parallel run."""
    # peft takes seconds to import: only once a run starts
    from peft import get_peft_model_state_dict

    digest = hashlib.sha256()
    for key, tensor in sorted(get_peft_model_state_dict(peft_model).items()):
        digest.update(key.encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def replica_values(value: str, world_size: int) -> list[str]:
    """Every process's value in rank order (the value alone in a single process)."""
    if world_size == 1 or not torch.distributed.is_initialized():
        return [value]
    gathered: list[Any] = [None] * world_size
    torch.distributed.all_gather_object(gathered, value)
    return [str(item) for item in gathered]


def _pad_id(tokenizer: Any) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0
