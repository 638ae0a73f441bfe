"""The app's registry: datasets and models by name, one Inspector per pair sharing one copy of each model, cached
results, safe uploads, and the diagnostics under the same name checks, with a per-model gate that serves Inspect
before long runs."""

from __future__ import annotations

import logging
import os
import random
import re
import shutil
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd
from cachetools import LRUCache, cachedmethod
from cachetools.keys import hashkey

from rerank_app.gate import ModelGate, StopRegistry
from rerank_app.jobs import TrainRequest
from rerank_core.adapters import WEIGHTS_FILE, AdapterError, list_adapters, new_staging_folder, remove_stale
from rerank_core.baselines import BASELINES, with_baselines
from rerank_core.compare import adapter_notes, compare_systems
from rerank_core.data.dataset import DataError, Dataset
from rerank_core.data.loaders import load_dataset
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
from rerank_core.labels import mask_preview
from rerank_core.limits import LimitError, whole_number
from rerank_core.models import LoadedModel, load_model
from rerank_core.prompts import get_preset, with_template_kwargs
from rerank_core.template_check import TemplateConsistency, template_consistency
from rerank_core.training.trainer import build_training_samples, label_samples, training_config

__all__ = ["AppConfig", "AppContext", "DatasetEntry", "ModelEntry", "SessionError"]

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




class AppContext:
    """Everything one app process serves: registries, inspectors, caches, the fine-tune runner."""

    def __init__(self, config: AppConfig, datasets: Sequence[DatasetEntry], models: Sequence[ModelEntry],
                 *, jobs: Any = None) -> None:
        if not datasets or not models:
            raise SessionError("the app needs at least one dataset and one model")
        self.config = config
        self.jobs = jobs
        remove_stale(config.upload_root)  # an upload interrupted by a crash left its staging folder
        self._datasets: dict[str, DatasetEntry] = {entry.name: entry for entry in datasets}
        self._models: dict[str, ModelEntry] = {entry.name: entry for entry in models}
        # One Inspector per (dataset, model), all Inspectors of a model sharing its one loaded copy (and its
        # adapter slots); one gate per model decides who runs it next.
        self._inspectors: dict[tuple[str, str], Inspector] = {}
        self._gates: dict[str, ModelGate] = {entry.name: ModelGate() for entry in models}
        self.stops = StopRegistry()
        # Handlers run on several threads at once: the caches' bookkeeping is locked, the scoring is not.
        self._inspections: LRUCache = LRUCache(256)
        self._comparisons: LRUCache = LRUCache(16)
        self._cache_lock = threading.Lock()
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
        return self._inspect(dataset, model, system, self._adapter_stamp(system), user_id, settings)

    @cachedmethod(lambda self: self._inspections, lock=lambda self: self._cache_lock)
    def _inspect(self, dataset: str, model: str, system: str, stamp: tuple[int, int] | None, user_id: str,
                 settings: InspectSettings) -> UserInspection:
        """The adapter's stamp is part of the cache key, so an adapter replaced under its name is scored anew."""
        with self.using(dataset, model) as inspector:
            return inspector.inspect(user_id, settings, system)

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
        systems = self._systems(model, adapters)
        stamped = tuple((system, self._adapter_stamp(system)) for system in systems)
        users = tuple(self.first_users(dataset, count))
        return self._compare_users(dataset, model, stamped, users, settings, progress, stop)

    @cachedmethod(lambda self: self._comparisons, lock=lambda self: self._cache_lock,
                  key=lambda self, dataset, model, stamped, users, settings, progress, stop: hashkey(
                      dataset, model, stamped, users, settings))
    def _compare_users(self, dataset: str, model: str, stamped: tuple[tuple[str, Any], ...], users: tuple[str, ...],
                       settings: InspectSettings, progress: Callable[[int, int], None] | None,
                       stop: threading.Event | None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Systems come with their adapter stamps, part of the cache key like the users and the settings; a
        stopped run raises, so nothing half-done is cached."""
        systems = [system for system, _ in stamped]
        with self.running(dataset, model, stop) as (inspector, check):
            per_user, summary = compare_systems(inspector, list(users), settings, systems, progress=progress,
                                                cancel=check, chunk_size=BACKGROUND_CHUNK)
            return with_baselines(inspector, per_user, summary, list(users), settings, BASELINES)

    def adapter_notes(self, dataset: str, model: str, adapters: Sequence[str], settings: InspectSettings) -> list[str]:
        """What Compare scores each adapter with unlike the chosen settings (reads manifests, not the model)."""
        return adapter_notes(self._inspector(dataset, model), settings, self._systems(model, adapters))

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
                                cancel=check, batch_size=BACKGROUND_CHUNK)

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
        return template_consistency(self.tokenizer(model), with_template_kwargs(get_preset(preset), template_kwargs),
                                    count=int(count))

    def letter_mass(self, dataset: str, model: str, adapters: Sequence[str] | None, count: int,
                    settings: InspectSettings, progress: Callable[[int, int], None] | None = None,
                    stop: threading.Event | None = None) -> LetterMass:
        """The letters' share of the full distribution, base and up to three adapters, over the first users."""
        systems = self._systems(model, adapters or [])
        users = self.first_users(dataset, count)
        with self.running(dataset, model, stop) as (inspector, check):
            return letter_mass(inspector, users, settings, systems, progress=progress, cancel=check,
                               chunk_size=BACKGROUND_CHUNK)

    # -- fine-tune ---------------------------------------------------------------------------

    def start_finetune(self, name: str, dataset: str, model: str, training_preset: str,
                       overrides: dict[str, Any]) -> Any:
        """Start `python -m rerank_core train` for this dataset and model; a bad setting raises ValueError naming it
        before anything starts (the runner checks the request, then hands the settings over as a JSON file)."""
        if self.jobs is None:
            raise SessionError("this app was started without a fine-tune runner")
        entry = self.dataset(dataset)
        if entry.path is None:
            raise SessionError(f"dataset {dataset!r} exists only in memory; a fine-tune subprocess needs it on disk")
        request = TrainRequest(name=str(name or "").strip(), model_path=self.model_path(model),
                               data_path=str(entry.path), training_preset=training_preset, options=overrides)
        return self.jobs.start(request)

    def training_preview(self, dataset: str, model: str, training_preset: str,
                         overrides: dict[str, Any]) -> tuple[Any, list[int], list[bool], str]:
        """One training sample of these settings: tokenizer, token IDs, loss flags (labels.mask_preview), caption."""
        config = training_config(training_preset, **overrides)
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
        # Named by this process, like an adapter's: remove_stale clears it at the next start if we die mid-copy.
        staging = new_staging_folder(root)
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
