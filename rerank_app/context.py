"""The app's registry: datasets and models by name, one Inspector per pair sharing one copy of each model, cached
results, safe uploads, and the diagnostics under the same name checks, with a per-model gate that serves Inspect
before long runs."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import tempfile
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from rerank_app.gate import ModelGate, StopRegistry
from rerank_app.jobs import TrainRequest
from rerank_core.adapters import WEIGHTS_FILE, AdapterError, list_adapters
from rerank_core.candidates import CandidateConfig
from rerank_core.data import DataError, Dataset, load_dataset
from rerank_core.diagnostics import (
    HistoryInfluence,
    LetterMass,
    LetterPrior,
    OrderSpec,
    PositionBias,
    PositionBiasSummary,
    history_influence,
    letter_mass,
    letter_prior,
    position_bias,
    position_bias_over_users,
)
from rerank_core.inspector import BASE, Inspector, InspectSettings, UserInspection
from rerank_core.limits import LimitError, whole_number
from rerank_core.models import LoadedModel, load_model
from rerank_core.prompts import with_template_kwargs
from rerank_core.template_check import TemplateConsistency, template_consistency

__all__ = ["AppConfig", "AppContext", "DatasetEntry", "ModelEntry", "SessionError", "make_settings"]

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# A dropdown with every user of a large dataset would be megabytes of JSON; the rest can be typed.
MAX_USER_CHOICES = 2000
# Prompts a long run scores between two looks at the gate: an Inspect request waits for at most this many.
BACKGROUND_CHUNK = 5
MAX_COMPARE_SYSTEMS = 4


class SessionError(ValueError):
    """A request the app cannot serve as asked (unknown name, too many systems), with what to pick instead."""


@dataclass(frozen=True)
class AppConfig:
    """Where the app reads and writes, and its limits."""

    adapters_root: Path = _REPO_ROOT / "adapters"
    upload_root: Path = _REPO_ROOT / "uploads"
    runs_root: Path = _REPO_ROOT / "runs"
    max_upload_bytes: int = 100 * 1024**2
    batch_size: int = 8
    max_compare_users: int = 500
    device: str = "auto"
    dtype: str = "auto"


@dataclass
class DatasetEntry:
    """A dataset the pickers offer; path is what a fine-tune subprocess loads (None: in memory only)."""

    name: str
    dataset: Dataset
    path: Path | None = None


@dataclass
class ModelEntry:
    """A base model the pickers offer; loaded on first use from path, or given already loaded."""

    name: str
    path: str | None = None
    loaded: LoadedModel | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)


def make_settings(*, split: str = "test", source: str = "random", preset: str = "seed",
                  strategy: str = "as_trained", text_field: str = "title", count: int = 20, seed: int = 0,
                  use_adapter_preset: bool = True, template_kwargs: str = "") -> InspectSettings:
    """InspectSettings from the pickers' values; the core makes 20.0 an int and refuses an empty or 1.5 seed."""
    candidates = CandidateConfig(source=source, count=count, seed=seed)
    return InspectSettings(preset=preset, strategy=strategy, text_field=text_field, split=split,
                           candidates=candidates, use_adapter_preset=bool(use_adapter_preset),
                           template_kwargs=template_kwargs or "")


class _Lru:
    """A small thread-safe least-recently-used cache: handlers run on several threads at once."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: OrderedDict[Any, Any] = OrderedDict()
        self._lock = threading.Lock()

    def remember(self, key: Any, value: Any) -> Any:
        with self._lock:
            self._entries[key] = value
            self._entries.move_to_end(key)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
        return value

    def recall(self, key: Any) -> Any:
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
            return value


class AppContext:
    """Everything one app process serves: registries, inspectors, caches, the fine-tune runner."""

    def __init__(self, config: AppConfig, datasets: Sequence[DatasetEntry], models: Sequence[ModelEntry],
                 *, jobs: Any = None) -> None:
        if not datasets or not models:
            raise SessionError("the app needs at least one dataset and one model")
        self.config = config
        self.jobs = jobs
        self._datasets: dict[str, DatasetEntry] = {entry.name: entry for entry in datasets}
        self._models: dict[str, ModelEntry] = {entry.name: entry for entry in models}
        # One Inspector per (dataset, model), all Inspectors of a model sharing its one loaded copy (and its
        # adapter slots); one gate per model decides who runs it next.
        self._inspectors: dict[tuple[str, str], Inspector] = {}
        self._gates: dict[str, ModelGate] = {entry.name: ModelGate() for entry in models}
        self.stops = StopRegistry()
        self._inspections = _Lru(256)
        self._comparisons = _Lru(16)
        self._registry_lock = threading.Lock()

    # -- registries --------------------------------------------------------------------------

    @property
    def dataset_names(self) -> list[str]:
        return list(self._datasets)

    @property
    def model_names(self) -> list[str]:
        return list(self._models)

    def dataset(self, name: str) -> DatasetEntry:
        try:
            return self._datasets[name]
        except KeyError:
            raise SessionError(f"no dataset named {name!r}; choose one of {', '.join(self._datasets)} "
                               "or load one in the Data tab") from None

    def model_entry(self, name: str) -> ModelEntry:
        try:
            return self._models[name]
        except KeyError:
            raise SessionError(f"no model named {name!r}; choose one of {', '.join(self._models)} "
                               "(start the app with --model PATH to add one)") from None

    def loaded(self, name: str) -> LoadedModel:
        """The model, loaded on first use."""
        entry = self.model_entry(name)
        with entry.lock:
            if entry.loaded is None:
                entry.loaded = load_model(entry.path, device=self.config.device, dtype=self.config.dtype)
            return entry.loaded

    def model_path(self, name: str) -> str:
        entry = self.model_entry(name)
        path = entry.path or (entry.loaded.path if entry.loaded is not None else None)
        if not path or not Path(path).is_dir():
            raise SessionError(f"model {name!r} has no folder on disk, so a fine-tune subprocess cannot load it")
        return str(path)

    def users(self, dataset: str) -> list[str]:
        return self.dataset(dataset).dataset.users

    def user_choices(self, dataset: str) -> list[str]:
        return self.users(dataset)[:MAX_USER_CHOICES]

    def random_user(self, dataset: str, rng: random.Random | None = None) -> str:
        return (rng or random).choice(self.users(dataset))

    def adapter_names(self, model: str) -> list[str]:
        """Published adapters made for this base model (and plain PEFT adapters, which are shape-checked)."""
        entry = self.model_entry(model)
        fingerprint = entry.loaded.fingerprint if entry.loaded is not None else None
        names = []
        for info in list_adapters(self.config.adapters_root):
            base = (info.manifest or {}).get("base_model") or {}
            if fingerprint is None or info.manifest is None or base.get("fingerprint") == fingerprint:
                names.append(info.name)
        return names

    # -- inspectors --------------------------------------------------------------------------

    def _inspector(self, dataset: str, model: str) -> Inspector:
        key = (dataset, model)
        data = self.dataset(dataset).dataset
        loaded = self.loaded(model)
        with self._registry_lock:
            if key not in self._inspectors:
                self._inspectors[key] = Inspector(data, loaded, adapters_root=str(self.config.adapters_root),
                                                  batch_size=self.config.batch_size)
            return self._inspectors[key]

    @contextmanager
    def using(self, dataset: str, model: str) -> Iterator[Inspector]:
        """The Inspector for (dataset, model), its model held for one interactive request (served first)."""
        inspector = self._inspector(dataset, model)
        with self._gates[model].interactive():
            yield inspector

    def gate(self, model: str) -> ModelGate:
        self.model_entry(model)  # an unknown name says which ones exist
        return self._gates[model]

    @contextmanager
    def running(self, dataset: str, model: str, stop: threading.Event | None) -> Iterator[tuple[Inspector, Any]]:
        """The Inspector for a long run and its stop check: at every chunk boundary the run steps aside for
        waiting interactive requests, then stops if `stop` is set."""
        inspector = self._inspector(dataset, model)
        with self._gates[model].background() as step_aside:
            def check() -> bool:
                step_aside()
                return stop is not None and stop.is_set()

            yield inspector, check

    def tokenizer(self, model: str) -> Any:
        return self.loaded(model).tokenizer

    # -- results -----------------------------------------------------------------------------

    def inspect(self, dataset: str, model: str, system: str, user_id: str,
                settings: InspectSettings) -> UserInspection:
        """One user scored by one system; cached, so switching back is instant."""
        user_id = self._check_user(dataset, user_id)
        system = self._check_system(model, system)
        key = ("inspect", dataset, model, system, self._adapter_stamp(system), user_id, settings)
        found = self._inspections.recall(key)
        if found is not None:
            return found
        with self.using(dataset, model) as inspector:
            result = inspector.inspect(user_id, settings, system)
        return self._inspections.remember(key, result)

    def compare_user(self, dataset: str, model: str, adapters: Sequence[str], user_id: str,
                     settings: InspectSettings) -> list[UserInspection]:
        """The base and up to three adapters on the same user and candidates."""
        systems = self._systems(model, adapters)
        return [self.inspect(dataset, model, system, user_id, settings) for system in systems]

    def compare_users(self, dataset: str, model: str, adapters: Sequence[str], settings: InspectSettings,
                      count: int, progress: Callable[[int, int], None] | None = None,
                      stop: threading.Event | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Per-user results and the paired summary over the first `count` users, the baselines (random,
        popularity, retriever) scored on the same candidates beside the LLM systems; cached per request."""
        from rerank_core.baselines import BASELINES, with_baselines
        from rerank_core.compare import compare_systems

        systems = self._systems(model, adapters)
        users = self.first_users(dataset, count)
        key = ("compare", dataset, model, tuple((system, self._adapter_stamp(system)) for system in systems),
               tuple(users), settings)
        found = self._comparisons.recall(key)
        if found is not None:
            return found
        with self.running(dataset, model, stop) as (inspector, check):
            per_user, summary = compare_systems(inspector, users, settings, systems, progress=progress,
                                                cancel=check)
            result = with_baselines(inspector, per_user, summary, users, settings, BASELINES)
        return self._comparisons.remember(key, result)

    def _systems(self, model: str, adapters: Sequence[str]) -> list[str]:
        chosen = [name for name in dict.fromkeys(adapters or []) if name and name != BASE]
        if len(chosen) > MAX_COMPARE_SYSTEMS - 1:
            raise SessionError(f"compare the base with at most {MAX_COMPARE_SYSTEMS - 1} adapters at once; "
                               f"{len(chosen)} were chosen")
        return [BASE, *(self._check_system(model, name) for name in chosen)]

    def _adapter_stamp(self, system: str) -> tuple[int, int] | None:
        """The adapter's weights file stamp, so results of an adapter replaced under its name are not reused."""
        if system == BASE:
            return None
        stat = (self.config.adapters_root / system / WEIGHTS_FILE).stat()
        return stat.st_mtime_ns, stat.st_size

    def _check_user(self, dataset: str, user_id: str) -> str:
        user_id = str(user_id or "").strip()
        data = self.dataset(dataset).dataset
        if user_id not in data.sequences:
            hint = " (it has fewer than 3 interactions)" if user_id in data.short_users else ""
            raise SessionError(f"user {user_id!r} is not in dataset {dataset}{hint}; pick one from the list "
                               "or press Random user")
        return user_id

    def _check_system(self, model: str, system: str | None) -> str:
        if not system or system == BASE:
            return BASE
        available = self.adapter_names(model)
        if system not in available:
            raise AdapterError(f"no adapter named {system!r} for model {model}; available: "
                               f"{', '.join(available) or 'none (train one in the Fine-tune tab)'}")
        return system

    # -- diagnostics -------------------------------------------------------------------------

    def first_users(self, dataset: str, count: int) -> list[str]:
        """The first `count` users of the dataset; a count outside 1..max_compare_users is refused by name."""
        count = whole_number("users", count)
        if not 1 <= count <= self.config.max_compare_users:
            raise LimitError(f"users must be from 1 to {self.config.max_compare_users} in this app, got {count}",
                             field="users")
        return self.users(dataset)[:count]

    def position_bias(self, dataset: str, model: str, system: str | None, user_id: str, settings: InspectSettings,
                      spec: OrderSpec, progress: Callable[[int, int], None] | None = None,
                      stop: threading.Event | None = None) -> PositionBias:
        """One user's candidates in other orders (diagnostics.position_bias)."""
        user_id = self._check_user(dataset, user_id)
        system = self._check_system(model, system)
        with self.running(dataset, model, stop) as (inspector, check):
            return position_bias(inspector, user_id, settings, system, spec, batch_size=BACKGROUND_CHUNK,
                                 progress=progress, cancel=check)

    def position_bias_users(self, dataset: str, model: str, system: str | None, count: int,
                            settings: InspectSettings, spec: OrderSpec,
                            progress: Callable[[int, int], None] | None = None,
                            stop: threading.Event | None = None) -> PositionBiasSummary:
        """Position bias over the first `count` users (diagnostics.position_bias_over_users)."""
        system = self._check_system(model, system)
        users = self.first_users(dataset, count)
        with self.running(dataset, model, stop) as (inspector, check):
            return position_bias_over_users(inspector, users, settings, system, spec, batch_size=BACKGROUND_CHUNK,
                                            progress=progress, cancel=check)

    def letter_prior(self, dataset: str, model: str, system: str | None, count: int, settings: InspectSettings,
                     mode: str, placeholder: str, progress: Callable[[int, int], None] | None = None,
                     stop: threading.Event | None = None) -> LetterPrior:
        """The letter prior (candidate texts hidden) over the first `count` users."""
        system = self._check_system(model, system)
        users = self.first_users(dataset, count)
        with self.running(dataset, model, stop) as (inspector, check):
            return letter_prior(inspector, users, settings, system, mode, placeholder=placeholder, progress=progress,
                                cancel=check)

    def history_influence(self, dataset: str, model: str, system: str | None, user_id: str,
                          settings: InspectSettings, stop: threading.Event | None = None) -> HistoryInfluence:
        """Leave one history item out, for one user."""
        user_id = self._check_user(dataset, user_id)
        system = self._check_system(model, system)
        with self.running(dataset, model, stop) as (inspector, check):
            return history_influence(inspector, user_id, settings, system, batch_size=BACKGROUND_CHUNK, cancel=check)

    def template_consistency(self, model: str, preset: str, count: int,
                             template_kwargs: str = "") -> TemplateConsistency:
        """Is the inference prompt a token prefix of the training conversation (tokenizer only, no lock)."""
        return template_consistency(self.tokenizer(model), with_template_kwargs(preset, template_kwargs),
                                    count=int(count))

    def letter_mass(self, dataset: str, model: str, adapters: Sequence[str] | None, count: int,
                    settings: InspectSettings, progress: Callable[[int, int], None] | None = None,
                    stop: threading.Event | None = None) -> LetterMass:
        """The letters' share of the full distribution, base and up to three adapters, over the first users."""
        systems = self._systems(model, adapters or [])
        users = self.first_users(dataset, count)
        with self.running(dataset, model, stop) as (inspector, check):
            return letter_mass(inspector, users, settings, systems, progress=progress, cancel=check)

    # -- fine-tune ---------------------------------------------------------------------------

    @staticmethod
    def train_config(training_preset: str, overrides: dict[str, Any]) -> Any:
        """The training preset with the form's values; raises ValueError naming a bad setting."""
        from rerank_core.training import training_config

        cleaned = {key: _plain_number(value) for key, value in overrides.items() if value not in (None, "")}
        # As on the command line, max_samples 0 means every sample; a 0 (or empty) prompt budget is sized from
        # the data (the form shows an unset budget as 0).
        unset = {name: None for name in ("max_samples", "max_prompt_tokens") if cleaned.get(name) == 0}
        config = training_config(training_preset, **{**cleaned, **unset})
        return replace(config, **unset)

    def start_finetune(self, name: str, dataset: str, model: str, training_preset: str,
                       overrides: dict[str, Any]) -> Any:
        """Start `python -m rerank_core train` for this dataset and model; only settings that differ from
        the preset go on its command line."""
        from rerank_core.training import TRAINING_PRESETS

        if self.jobs is None:
            raise SessionError("this app was started without a fine-tune runner")
        config = self.train_config(training_preset, overrides)
        entry = self.dataset(dataset)
        if entry.path is None:
            raise SessionError(f"dataset {dataset!r} exists only in memory; a fine-tune subprocess needs it on disk")
        preset = TRAINING_PRESETS[training_preset]
        options = {key: getattr(config, key) for key in overrides if getattr(config, key) != getattr(preset, key)}
        if "max_samples" in options and options["max_samples"] is None:
            options["max_samples"] = 0  # the train command's "all samples"
        request = TrainRequest(name=str(name or "").strip(), model_path=self.model_path(model),
                               data_path=str(entry.path), training_preset=training_preset, options=options)
        return self.jobs.start(request)

    def training_preview(self, dataset: str, model: str, training_preset: str,
                         overrides: dict[str, Any]) -> tuple[Any, list[int], list[bool], str]:
        """One training sample of these settings: tokenizer, token IDs, loss flags (labels.mask_preview), caption."""
        from rerank_core.labels import mask_preview
        from rerank_core.training import build_training_samples, label_samples

        config = self.train_config(training_preset, overrides)
        data = self.dataset(dataset).dataset
        tokenizer = self.tokenizer(model)
        samples, _ = build_training_samples(data, tokenizer, replace(config, max_samples=1))
        examples, _ = label_samples(tokenizer, samples, config)
        if not examples:
            raise SessionError("no training sample fits these settings: raise max prompt tokens, use fewer "
                               "candidates, or check that users have at least 4 interactions")
        sample = samples[0]
        masked = mask_preview(tokenizer, examples[0])
        caption = (f"User {sample.user_id}, target = training item {sample.position + 1}, answer letter "
                   f"{sample.answer_letter!r}, preset {config.prompt_preset!r}, {len(masked)} tokens.")
        return tokenizer, [token.token_id for token in masked], [token.loss for token in masked], caption

    # -- uploads -----------------------------------------------------------------------------

    def restore_uploads(self) -> list[str]:
        """Datasets uploaded in earlier runs of the app, registered again from their folders in upload_root.

        A folder that no longer loads is skipped with a warning: the others still come back."""
        root = self.config.upload_root
        restored = []
        folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")) \
            if root.is_dir() else []
        for folder in folders:
            if folder.name in self._datasets:
                continue
            try:
                dataset = load_dataset(folder)
            except (DataError, ValueError, OSError) as error:
                log.warning("upload %s is not offered again: %s", folder.name, error)
                continue
            with self._registry_lock:
                self._datasets[folder.name] = DatasetEntry(name=folder.name, dataset=dataset, path=folder)
            restored.append(folder.name)
        return restored

    def add_upload(self, files: Sequence[str | os.PathLike[str]], name: str,
                   data_format: str | None = None) -> DatasetEntry:
        """Copy uploaded files into the upload area under safe names, load them, and register the dataset."""
        if not files:
            raise DataError("no file was uploaded: add the dataset's files (e.g. items.csv and interactions.csv)")
        root = self.config.upload_root
        root.mkdir(parents=True, exist_ok=True)
        sources = [Path(file) for file in files]
        for source in sources:
            size = source.stat().st_size
            if size > self.config.max_upload_bytes:
                raise DataError(f"the file is {size / 1024**2:.1f} MiB, over the "
                                f"{self.config.max_upload_bytes / 1024**2:g} MiB upload limit: upload a subset",
                                file=_safe_name(source.name, "file"))
        base = _safe_name(name, "upload")
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
        try:
            for source in sources:
                shutil.copyfile(source, staging / _safe_name(source.name, "file"))
            with self._registry_lock:
                final = _unique_folder(root, base, taken=set(self._datasets))
                os.rename(staging, final)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        try:
            dataset = load_dataset(final, data_format or None)
        except (DataError, ValueError) as error:
            shutil.rmtree(final, ignore_errors=True)
            # Name the file as the user knows it, not by the server's upload folder.
            message = (str(error).replace(f"{final}{os.sep}", "").replace(f"file {final}", "the uploaded files")
                       .replace(str(final), "the upload"))
            raise DataError(message) from None
        entry = DatasetEntry(name=final.name, dataset=dataset, path=final)
        with self._registry_lock:
            self._datasets[entry.name] = entry
        return entry


def _plain_number(value: Any) -> Any:
    """Gradio numbers arrive as floats: 300.0 becomes 300 so integer settings stay integers."""
    return int(value) if isinstance(value, float) and value.is_integer() and abs(value) >= 1 else value


def _safe_name(name: str, fallback: str) -> str:
    """A plain file or folder name: no separators, no leading dot, printable ASCII, at most 64 characters."""
    cleaned = _SAFE_NAME.sub("_", Path(str(name)).name).strip("._-")[:64]
    return cleaned or fallback


def _unique_folder(root: Path, base: str, taken: set[str]) -> Path:
    """A new folder name: never an existing folder, never the name of a dataset already registered."""
    candidate, number = root / base, 2
    while candidate.exists() or candidate.name in taken:
        candidate, number = root / f"{base}-{number}", number + 1
    return candidate
