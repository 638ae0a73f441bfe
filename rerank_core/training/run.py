"""One fine-tune from start to published adapter, as a short sequence of named steps with its events and clean-up."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rerank_core.adapters import adapters_root, new_staging_folder, publish_adapter, remove_stale, validate_adapter_name
from rerank_core.data.dataset import Dataset
from rerank_core.distributed import launched_rank, launched_world_size
from rerank_core.labels import LabeledExample
from rerank_core.models import LoadedModel
from rerank_core.progress import CancelFlag
from rerank_core.training.config import RunCancelled, TrainConfig, TrainingError
from rerank_core.training.manifest import build_manifest, check_adapter_target, write_manifest
from rerank_core.training.samples import build_training_samples, label_samples, with_prompt_budget
from rerank_core.training.trainer import (
    LOSS_TOKENS,
    EventSink,
    TrainReport,
    Validator,
    answer_loss_trainer,
    has_lora_layers,
    lora_digest,
    replica_values,
    run_callback,
    training_arguments,
)

__all__ = ["train_adapter"]


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
    validate_adapter_name(name)  # before remove_stale touches the folder
    run = _TrainingRun(loaded, dataset, config, name, adapters_root(root), overwrite, on_event, cancel,
                       training_preset)
    run.check_target()
    run.emit_start()
    try:
        examples = run.prepare_examples()
        run.attach_lora()
        run.validate("before")
        run.train(examples)
        run.validate("after")
        run.check_replicas()
        run.publish()
        return run.finish("done", path=run.report.path)
    except (RunCancelled, KeyboardInterrupt):
        return run.finish("cancelled", reason=cancel.reason if cancel is not None else None)
    except BaseException as error:
        run.finish("failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        run.clean_up()


class _TrainingRun:
    """The state one train_adapter call carries from step to step: the config, the report, the folders, the model."""

    def __init__(self, loaded: LoadedModel, dataset: Dataset, config: TrainConfig, name: str, folder: Path,
                 overwrite: bool, on_event: EventSink | None, cancel: CancelFlag | None,
                 training_preset: str | None) -> None:
        self.loaded, self.dataset, self.config, self.name = loaded, dataset, config, name
        self.folder, self.overwrite, self.on_event, self.cancel = folder, overwrite, on_event, cancel
        self.training_preset = training_preset
        self.world_size = launched_world_size()
        self.is_main = launched_rank() == 0
        self.started = time.monotonic()
        self.report = TrainReport(adapter=name, world_size=self.world_size, uniform_loss=config.uniform_loss,
                                  loss_tokens=LOSS_TOKENS[config.train_on_eos])
        self.work_dir: Path | None = None  # the Trainer's output_dir; it saves nothing there (save_strategy "no")
        self.staging: Path | None = None
        self.peft_model: Any = None
        self.validator: Validator | None = None

    def emit(self, event: dict[str, Any]) -> None:
        """Rank 0 alone reports, every event stamped with the time and the adapter's name."""
        if self.is_main and self.on_event is not None:
            self.on_event({"time": time.time(), "adapter": self.name, **event})

    def check_target(self) -> None:
        """Refuse a taken name or a model that already carries LoRA layers before any work."""
        if self.is_main:
            remove_stale(self.folder)
        check_adapter_target(self.name, self.folder, overwrite=self.overwrite)
        if has_lora_layers(self.loaded.model):
            raise TrainingError("the loaded model already carries LoRA layers (an adapter was loaded into it); "
                                "load a fresh base model to train a new adapter")

    def emit_start(self) -> None:
        """The start event: the settings, the model and the data this run uses."""
        self.emit({"event": "start", "pid": os.getpid(), "world_size": self.world_size,
                   "config": self.config.to_json(), "training_preset": self.training_preset,
                   "model": {"name": self.loaded.name, "fingerprint": self.loaded.fingerprint},
                   "dataset": {"name": self.dataset.name, "fingerprint": self.dataset.fingerprint()},
                   "uniform_loss": self.config.uniform_loss})

    def prepare_examples(self) -> list[LabeledExample]:
        """The prompt budget, the samples and their labels; the config gains the data-sized budget."""
        self.emit({"event": "stage", "stage": "samples"})
        tokenizer, report = self.loaded.tokenizer, self.report
        self.config, budget = with_prompt_budget(self.dataset, tokenizer, self.config)
        if budget is not None:
            report.prompt_budget = asdict(budget)
            self.emit({"event": "stage", "stage": "prompt budget", "max_prompt_tokens": budget.tokens,
                       "detail": budget.describe()})
        samples, dropped = build_training_samples(self.dataset, tokenizer, self.config, cancel=self.cancel)
        context = getattr(self.loaded.model.config, "max_position_embeddings", None)
        examples, unlabelled = label_samples(tokenizer, samples, self.config, max_length=context)
        report.dropped = {**dropped, **unlabelled}
        report.samples = len(examples)
        report.users_without_samples = sum(1 for user in self.dataset.users
                                           if len(self.dataset.training_sequence(user)) < 2)
        self.emit({"event": "stage", "stage": "samples ready", "samples": report.samples,
                   "dropped": report.dropped})
        if not examples:
            raise TrainingError(
                f"no training example is left (dropped: {report.dropped}); users need at least 4 "
                "interactions, prompts must fit max_prompt_tokens (raise it or use fewer candidates) and, on "
                "retriever candidates, the target must be among them (more candidates or random ones)")
        if self.cancel is not None and self.cancel.requested:
            raise RunCancelled
        return examples

    def attach_lora(self) -> None:
        """The staging folder and fresh LoRA layers on the model (seeded), with the validator over them."""
        # peft and transformers take seconds to import: only once a run starts
        from peft import LoraConfig, get_peft_model
        from transformers import set_seed

        config = self.config
        if self.is_main:
            self.staging = new_staging_folder(self.folder)
        set_seed(config.seed)
        self.peft_model = get_peft_model(self.loaded.model, LoraConfig(
            r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=config.lora_dropout,
            target_modules=list(config.target_modules), bias="none", task_type="CAUSAL_LM"))
        if self.is_main and config.eval_users > 0:
            self.validator = Validator(self.dataset, self.loaded, self.peft_model, config, self.cancel)

    def validate(self, when: str) -> None:
        """Validation metrics "before" (step 0: LoRA's B matrices start at zero, so the base model) or "after"."""
        if self.validator is None:
            return
        step = 0 if when == "before" else self.report.steps
        self.emit({"event": "stage", "stage": "validation", "step": step})
        self.report.validation[when] = self.validator()
        self.emit({"event": "validation", "step": step, "elapsed": time.monotonic() - self.started,
                   **self.report.validation[when]})

    def train(self, examples: list[LabeledExample]) -> None:
        """The Trainer's loop over the examples; a cancel seen at a step boundary ends the run here."""
        config, report = self.config, self.report
        self.work_dir = Path(tempfile.mkdtemp(prefix="rerank-train-"))
        callback = run_callback(self.emit, self.cancel, self.validator, config, report, self.started)
        trainer = answer_loss_trainer(
            self.peft_model, training_arguments(config, self.loaded, self.work_dir, self.world_size),
            self.loaded, examples, callback)
        train_started = time.monotonic()
        trainer.train()
        report.train_time_s = time.monotonic() - train_started
        trained_share = report.steps / max(report.total_steps, 1)
        report.samples_per_s = report.samples * config.epochs * trained_share / max(report.train_time_s, 1e-9)
        if callback.cancelled:
            raise RunCancelled

    def check_replicas(self) -> None:
        """Every process of a data-parallel run must end with the same LoRA weights."""
        self.report.replica_digests = replica_values(lora_digest(self.peft_model), self.world_size)
        if len(set(self.report.replica_digests)) > 1:
            raise TrainingError(f"the {self.world_size} training processes ended with different LoRA weights "
                                f"({self.report.replica_digests}): the data-parallel setup is broken")

    def publish(self) -> None:
        """Rank 0 saves the weights and the manifest into staging, then renames the folder into place."""
        if not self.is_main:
            return
        self.emit({"event": "stage", "stage": "saving"})
        self.peft_model.save_pretrained(str(self.staging))
        self.report.wall_time_s = time.monotonic() - self.started
        self.report.status = "done"
        self.report.path = str(self.folder / self.name)
        write_manifest(self.staging, build_manifest(self.loaded, self.dataset, self.config, self.name, self.report,
                                                    self.training_preset))
        publish_adapter(self.staging, self.name, self.folder, overwrite=self.overwrite)
        self.staging = None

    def finish(self, status: str, **details: Any) -> TrainReport:
        """The report's final status and time, and the closing event (done, cancelled or failed)."""
        self.report.status = status
        self.report.wall_time_s = time.monotonic() - self.started
        self.emit({"event": status, **details, "report": self.report.to_json()})
        return self.report

    def clean_up(self) -> None:
        """Staging and work folders removed; the caller's model gets its LoRA layers taken out again."""
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
        if self.peft_model is not None:
            self.peft_model.unload()  # gives the caller its base model back, LoRA layers removed
            self.loaded.model.eval()
