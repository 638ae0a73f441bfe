"""What one app process serves, split by responsibility: the models and their adapters, the datasets (with safe
uploads), the cached inspection service (one Inspector per pair sharing one copy of each model, a per-model gate
that serves Inspect before long runs) and the hand-over to the fine-tune runner."""

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
from rerank_app.jobs import JobRunner, JobStatus, TrainRequest
from rerank_core.adapters import AdapterError, list_adapters, new_staging_folder, remove_stale
from rerank_core.adapters import adapters_root as default_adapters_root
from rerank_core.baselines import BASELINES, with_baselines
from rerank_core.chat_templates import ChatTemplateOverride, chat_template_from_text, check_chat_template
from rerank_core.compare import compare_systems
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
from rerank_core.fsutil import atomic_write_text, data_home
from rerank_core.inspector import BASE, Inspector, InspectSettings, ResolvedSystem, UserInspection
from rerank_core.labels import mask_preview
from rerank_core.limits import LimitError, check_limit, whole_number
from rerank_core.model_refs import check_model_ref, parse_model_ref
from rerank_core.models import LoadedModel, load_model, load_tokenizer
from rerank_core.prompts import answer_slot, get_preset, letters_for, with_template_kwargs
from rerank_core.template_check import TemplateConsistency, template_consistency
from rerank_core.training.config import training_config
from rerank_core.training.samples import build_training_samples, item_text_cost, label_samples
from rerank_core.verbalizer import resolve_letters

__all__ = ["AppConfig", "AppContext", "DatasetEntry", "DatasetRegistry", "FineTuneHandover", "InspectionService",
           "ModelEntry", "ModelRegistry", "SessionError"]

log = logging.getLogger(__name__)

_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]+")
# A dropdown with every user of a large dataset would be megabytes of JSON; the rest can be typed.
MAX_USER_CHOICES = 2000
# Prompts a long run scores between two looks at the gate: an Inspect request waits for at most this many.
BACKGROUND_CHUNK = 5
MAX_COMPARE_SYSTEMS = 4
# Scored users kept for switching back (a UserInspection is a few KB beside its prompt's tokens) and whole
# comparisons kept for the report button (per-user frames of up to max_compare_users users each).
MAX_CACHED_INSPECTIONS = 256
MAX_CACHED_COMPARISONS = 16
# Picker entries at most: each model typed into the page or template variant may hold a copy of its weights.
MAX_MODEL_ENTRIES = 64
# Datasets the picker holds at most: each upload keeps its dataset and Inspectors in memory until a restart.
MAX_DATASET_ENTRIES = 32
# Letters the template-effect note shows under each template: enough to see a pattern, short enough to read.
_EFFECT_LETTERS = 5


class SessionError(ValueError):
    """A request the app cannot serve as asked (unknown name, too many systems), with what to pick instead."""


@dataclass(frozen=True)
class AppConfig:
    """Where the app reads and writes, and its limits."""

    # Read when the config is made, so the environment then counts ($RERANK_ADAPTERS_DIR, $RERANK_INSPECTOR_HOME);
    # never inside site-packages (fsutil.data_home).
    adapters_root: Path = field(default_factory=default_adapters_root)
    upload_root: Path = field(default_factory=lambda: data_home() / "uploads")
    runs_root: Path = field(default_factory=lambda: data_home() / "runs")
    max_upload_bytes: int = 100 * 1024**2
    batch_size: int = 8
    max_compare_users: int = 500
    device: str = "auto"
    dtype: str = "auto"
    # --chat-template FILE and --max-memory BUDGETS, applied to every model the app loads.
    chat_template: str | None = None
    max_memory: str | None = None
    # Folders a model path typed into the page may lie in; None: anywhere (an app bound to this machine only).
    # An app others can reach must not let them probe or load the server's files by path.
    typed_model_roots: tuple[Path, ...] | None = None


@dataclass
class DatasetEntry:
    """A dataset the pickers offer; path is what a fine-tune subprocess loads (None: in memory only)."""

    name: str
    dataset: Dataset
    path: Path | None = None


@dataclass
class ModelEntry:
    """A base model the pickers offer; loaded on first use from path (any model reference), or given already loaded.

    A variant (`base` set) is that model's weights and adapters under a chat template given in the app: it shares
    the loaded model, its adapter slots and its gate, with a tokenizer of its own."""

    name: str
    path: str | None = None
    loaded: LoadedModel | None = None
    lock: threading.Lock = field(default_factory=threading.Lock)
    base: str | None = None
    chat_template: ChatTemplateOverride | None = None


class ModelRegistry:
    """Base models by name, each loaded once on first use, the adapters made for each, and one gate per model."""

    def __init__(self, config: AppConfig, entries: Sequence[ModelEntry]) -> None:
        self.config = config
        self._entries: dict[str, ModelEntry] = {entry.name: entry for entry in entries}
        self._gates: dict[str, ModelGate] = {entry.name: ModelGate() for entry in entries}
        self._adding = threading.Lock()
        self._reserved = 0  # places held by templates being checked (with_template), under _adding

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def _check_room(self) -> None:
        """Refuse a new entry past MAX_MODEL_ENTRIES, places reserved included (the caller holds _adding)."""
        if len(self._entries) + self._reserved >= MAX_MODEL_ENTRIES:
            raise SessionError(f"the model picker holds {MAX_MODEL_ENTRIES} entries already: restart the app to add "
                               "more")

    def _register(self, entry: ModelEntry) -> str:
        """Offer a new entry (the caller holds _adding), refused past MAX_MODEL_ENTRIES."""
        self._check_room()
        if entry.base is None:
            self._gates[entry.name] = ModelGate()
        self._entries[entry.name] = entry
        return entry.name

    def add_reference(self, reference: str) -> str:
        """A model typed into the page (a folder, a cached hub id, a .gguf file), checked without loading weights
        (model_refs.check_model_ref) and offered in the picker from now on; returns the name it is offered under."""
        text = str(reference or "").strip()
        if not text:
            raise SessionError("type a model folder, a hub id (org/name[@revision]) from the local Hugging Face "
                               "cache, or a .gguf file path")
        ref = parse_model_ref(text)
        roots = self.config.typed_model_roots
        if ref.path is not None and roots is not None and not _inside_any(ref.path, roots):
            # The same answer whether the path exists or not: the page cannot probe the server's disk.
            folders = ", ".join(root.name for root in roots) or "none: start the app with --models-dir"
            raise SessionError("this app takes typed model paths only inside its --models-dir folders "
                               f"({folders}); pick a listed model or a hub id from the cache")
        ref = check_model_ref(text)
        with self._adding:
            for entry in self._entries.values():
                if entry.base is None and entry.path == ref.text:
                    return entry.name
            name = ref.display_name if ref.display_name not in self._entries else ref.text
            return self._register(ModelEntry(name, ref.text))

    def with_template(self, model: str, text: str, source: str) -> str:
        """The model (a variant's base) under a chat template given in the page: checked to render with the model's
        own tokenizer, saved so a fine-tune subprocess can read it, offered in the picker; returns its name."""
        base = self.entry(model).base or model
        override = check_chat_template(chat_template_from_text(text, _safe_name(source, "pasted")))
        name = f"{base} + template {override.path} {override.sha256[:8]}"
        with self._adding:
            if name in self._entries:
                return name
            # A place is held before the template is saved: a refused one, even one racing another for the last
            # place, leaves no file behind.
            self._check_room()
            self._reserved += 1
        try:
            base_loaded = self.loaded(base)  # loaded now: a template that does not render with it is refused here
            saved = self.config.upload_root / ".templates" / f"{override.sha256}.jinja"
            saved.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(saved, override.text)
            override = ChatTemplateOverride(str(saved), override.text)
            tokenizer = load_tokenizer(base_loaded.path, chat_template=override)
            variant = replace(base_loaded, tokenizer=tokenizer, chat_template=override)  # same weights and adapters
        except BaseException:
            with self._adding:
                self._reserved -= 1
            raise
        with self._adding:
            self._reserved -= 1
            if name not in self._entries:
                self._register(ModelEntry(name, base_loaded.path, loaded=variant, base=base, chat_template=override))
        return name

    def template_effect(self, model: str, preset: str, template_kwargs: str = "", strategy: str = "as_trained"
                        ) -> list[str]:
        """What a variant's template changes in the letter audit: the answer slot and the first letters' tokens
        under it and under the base model's own template, one line each."""
        entry = self.entry(model)
        if entry.base is None:
            return [f"{model} uses its tokenizer's own chat template"]
        prompt_preset = with_template_kwargs(get_preset(preset), template_kwargs)
        lines = []
        for label, name in ((f"template {entry.chat_template.path}", model), ("the model's own template", entry.base)):
            tokenizer = self.tokenizer(name)
            slot = answer_slot(tokenizer, prompt_preset)
            letters = resolve_letters(tokenizer, prompt_preset, letters_for(_EFFECT_LETTERS), strategy)
            shown = ", ".join(f"{token.letter} → {token.token!r} {token.token_id}"
                              + (f" ({', '.join(token.flags)})" if token.flags else "") for token in letters)
            where = ", ".join(slot.flags) or "right after the generation prompt"
            lines.append(f"{label}: letter slot {where}; {shown}")
        return lines

    def entry(self, name: str) -> ModelEntry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: a list or an object from a JSON request
            raise SessionError(f"no model named {name!r}; choose one of {', '.join(self._entries)} "
                               "(start the app with --model PATH to add one)") from None

    def loaded(self, name: str) -> LoadedModel:
        """The model, loaded on first use (a variant is made with it, so it is always loaded)."""
        entry = self.entry(name)
        with entry.lock:
            if entry.loaded is None:
                entry.loaded = load_model(entry.path, device=self.config.device, dtype=self.config.dtype,
                                          chat_template=self.config.chat_template, max_memory=self.config.max_memory)
            return entry.loaded

    def path(self, name: str) -> str:
        """The model's folder, which a fine-tune subprocess loads."""
        entry = self.entry(name)
        # Loaded: the folder its reference resolved to (a hub snapshot, a converted GGUF), the same weights.
        path = (entry.loaded.path if entry.loaded is not None else None) or entry.path
        if not path or not Path(path).is_dir():
            raise SessionError(f"model {name!r} has no folder on disk, so a fine-tune subprocess cannot load it")
        return str(path)

    def train_reference(self, name: str) -> tuple[str, str | None]:
        """What a fine-tune subprocess loads: the model reference as registered (a folder made absolute, a hub id,
        a .gguf file, so the manifest records it as the user knows it) and the chat-template file it trains with
        (a variant's, else the app's --chat-template, else None)."""
        entry = self.entry(name)
        base = self.entry(entry.base) if entry.base else entry
        # The run works in its own folder: every path it gets is absolute.
        template = (entry.chat_template.path if entry.chat_template else
                    str(Path(self.config.chat_template).expanduser().resolve()) if self.config.chat_template else None)
        if not base.path:
            return self.path(name), template
        ref = parse_model_ref(base.path)
        return (str(ref.path.resolve()) if ref.path is not None else ref.text), template

    def tokenizer(self, name: str) -> Any:
        return self.loaded(name).tokenizer

    def gate(self, name: str) -> ModelGate:
        entry = self.entry(name)  # an unknown name says which ones exist
        return self._gates[entry.base or name]  # a variant runs on its base's weights: one gate for both

    def adapter_names(self, model: str) -> list[str]:
        """Published adapters made for this base model (and plain PEFT adapters, which are shape-checked)."""
        entry = self.entry(model)
        fingerprint = entry.loaded.fingerprint if entry.loaded is not None else None
        names = []
        for info in list_adapters(self.config.adapters_root):
            base = (info.manifest or {}).get("base_model") or {}
            if fingerprint is None or info.manifest is None or base.get("fingerprint") == fingerprint:
                names.append(info.name)
        return names

    def check_system(self, model: str, system: str | None) -> str:
        """The base, or an adapter the pickers offer for this model (refused by name, with the choices)."""
        if not system or system == BASE:
            return BASE
        return _offered(system, model, self.adapter_names(model))

    def systems(self, model: str, adapters: Sequence[str] | None) -> list[str]:
        """The base and up to MAX_COMPARE_SYSTEMS - 1 adapters, each named once."""
        if isinstance(adapters, str) or not all(isinstance(name, str) for name in adapters or []):
            raise SessionError(f"adapters must be a list of adapter names, got {str(adapters)[:80]}")
        chosen = [name for name in dict.fromkeys(adapters or []) if name and name != BASE]
        if len(chosen) > MAX_COMPARE_SYSTEMS - 1:
            raise SessionError(f"compare the base with at most {MAX_COMPARE_SYSTEMS - 1} adapters at once; "
                               f"{len(chosen)} were chosen")
        available = self.adapter_names(model) if chosen else []  # the adapters folder read once, not per name
        return [BASE, *(_offered(name, model, available) for name in chosen)]


def _offered(system: str, model: str, available: Sequence[str]) -> str:
    """The adapter name when the pickers offer it for this model; refused by name, with the choices."""
    if system not in available:
        raise AdapterError(f"no adapter named {system!r} for model {model}; available: "
                           f"{', '.join(available) or 'none (train one in the Fine-tune tab)'}")
    return system


class DatasetRegistry:
    """Datasets by name: the built-in ones, and uploads copied under safe names and restored at the next start."""

    def __init__(self, config: AppConfig, entries: Sequence[DatasetEntry]) -> None:
        self.config = config
        remove_stale(config.upload_root)  # an upload interrupted by a crash left its staging folder
        self._entries: dict[str, DatasetEntry] = {entry.name: entry for entry in entries}
        self._lock = threading.Lock()

    @property
    def names(self) -> list[str]:
        return list(self._entries)

    def get(self, name: str) -> DatasetEntry:
        try:
            return self._entries[name]
        except (KeyError, TypeError):  # TypeError: a list or an object from a JSON request
            raise SessionError(f"no dataset named {name!r}; choose one of {', '.join(self._entries)} "
                               "or load one in the Data tab") from None

    def add(self, entry: DatasetEntry) -> None:
        """Offer a dataset already loaded (a built-in one added after the start)."""
        with self._lock:
            self._entries[entry.name] = entry

    def users(self, dataset: str) -> list[str]:
        return self.get(dataset).dataset.users

    def user_choices(self, dataset: str) -> list[str]:
        return self.users(dataset)[:MAX_USER_CHOICES]

    def random_user(self, dataset: str, rng: random.Random | None = None) -> str:
        return (rng or random).choice(self.users(dataset))

    def check_user(self, dataset: str, user_id: str) -> str:
        """The user id stripped, refused by name when the dataset has no such user."""
        user_id = str(user_id or "").strip()
        data = self.get(dataset).dataset
        if user_id not in data.sequences:
            hint = " (it has fewer than 3 interactions)" if user_id in data.short_users else ""
            raise SessionError(f"user {user_id!r} is not in dataset {dataset}{hint}; pick one from the list "
                               "or press Random user")
        return user_id

    def first_users(self, dataset: str, count: int) -> list[str]:
        """The first `count` users of the dataset; a count outside 1..max_compare_users is refused by name."""
        count = whole_number("users", count)
        if not 1 <= count <= self.config.max_compare_users:
            raise LimitError(f"users must be from 1 to {self.config.max_compare_users} in this app, got {count}",
                             field="users")
        return self.users(dataset)[:count]

    def restore_uploads(self) -> list[str]:
        """Datasets uploaded in earlier runs of the app, registered again from their folders in upload_root.

        A folder that no longer loads is skipped with a warning: the others still come back."""
        root = self.config.upload_root
        restored = []
        folders = sorted(path for path in root.iterdir() if path.is_dir() and not path.name.startswith(".")) \
            if root.is_dir() else []
        for folder in folders:
            if folder.name in self._entries:
                continue
            try:
                dataset = load_dataset(folder)
            except (DataError, ValueError, OSError) as error:
                log.warning("upload %s is not offered again: %s", folder.name, error)
                continue
            with self._lock:
                self._entries[folder.name] = DatasetEntry(name=folder.name, dataset=dataset, path=folder)
            restored.append(folder.name)
        return restored

    def add_upload(self, files: Sequence[str | os.PathLike[str]], name: str,
                   data_format: str | None = None) -> DatasetEntry:
        """Copy uploaded files into the upload area under safe names, load them, and register the dataset."""
        if not files:
            raise DataError("no file was uploaded: add the dataset's files (e.g. items.csv and interactions.csv)")
        if len(self._entries) >= MAX_DATASET_ENTRIES:
            raise DataError(f"the app holds {MAX_DATASET_ENTRIES} datasets already: restart it to upload more "
                            "(uploads are offered again after a restart)")
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
            with self._lock:
                final = _unique_folder(root, base, taken=set(self._entries))
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
        with self._lock:
            self._entries[entry.name] = entry
        return entry




class InspectionService:
    """Every scored result the app shows: one Inspector per (dataset, model), each system resolved once per
    request and handed down, results cached by the resolved system's weights stamp, and the model's gate
    deciding who runs it next."""

    def __init__(self, config: AppConfig, datasets: DatasetRegistry, models: ModelRegistry) -> None:
        self.config = config
        self.datasets = datasets
        self.models = models
        # One Inspector per (dataset, model), all Inspectors of a model sharing its one loaded copy (and its
        # adapter slots).
        self._inspectors: dict[tuple[str, str], Inspector] = {}
        self._lock = threading.Lock()
        # Handlers run on several threads at once: the caches' bookkeeping is locked, the scoring is not.
        self._inspections: LRUCache = LRUCache(MAX_CACHED_INSPECTIONS)
        self._comparisons: LRUCache = LRUCache(MAX_CACHED_COMPARISONS)
        self._cache_lock = threading.Lock()

    def clear_cache(self) -> None:
        """Forget every cached inspection, as if each were scored anew (a retrained adapter is)."""
        with self._cache_lock:
            self._inspections.clear()

    def cache_sizes(self) -> dict[str, tuple[int, int]]:
        """Entries and bound of every cache behind the results, the Inspectors' summed (their own count is at most
        datasets × models)."""
        with self._lock:
            inspectors = list(self._inspectors.values())
        sizes = {"inspections": (len(self._inspections), MAX_CACHED_INSPECTIONS),
                 "comparisons": (len(self._comparisons), MAX_CACHED_COMPARISONS)}
        for inspector in inspectors:
            for name, (entries, bound) in inspector.cache_sizes().items():
                summed = sizes.get(name, (0, 0))
                sizes[name] = (summed[0] + entries, summed[1] + bound)
        return sizes

    def _inspector(self, dataset: str, model: str) -> Inspector:
        key = (dataset, model)
        data = self.datasets.get(dataset).dataset
        loaded = self.models.loaded(model)
        with self._lock:
            if key not in self._inspectors:
                self._inspectors[key] = Inspector(data, loaded, adapters_root=str(self.config.adapters_root),
                                                  batch_size=self.config.batch_size)
            return self._inspectors[key]

    @contextmanager
    def using(self, dataset: str, model: str) -> Iterator[Inspector]:
        """The Inspector for (dataset, model), its model held for one interactive request (served first)."""
        inspector = self._inspector(dataset, model)
        with self.models.gate(model).interactive():
            yield inspector

    @contextmanager
    def running(self, dataset: str, model: str,
                stop: threading.Event | None) -> Iterator[tuple[Inspector, Callable[[], bool]]]:
        """The Inspector for a long run and its stop check: at every chunk boundary the run steps aside for
        waiting interactive requests, then stops if `stop` is set."""
        inspector = self._inspector(dataset, model)
        with self.models.gate(model).background() as step_aside:
            def check() -> bool:
                step_aside()
                return stop is not None and stop.is_set()

            yield inspector, check

    # -- systems -----------------------------------------------------------------------------

    def resolve(self, dataset: str, model: str, system: str | ResolvedSystem | None,
                settings: InspectSettings) -> ResolvedSystem:
        """The system as this request scores it (Inspector.resolve); one already resolved passes through."""
        if not isinstance(system, ResolvedSystem):
            system = self.models.check_system(model, system)
        return self._inspector(dataset, model).resolve(system, settings)

    def resolve_systems(self, dataset: str, model: str, adapters: Sequence[str] | None,
                        settings: InspectSettings) -> list[ResolvedSystem]:
        """The base and the chosen adapters, each resolved once for this request (their notes included)."""
        return [self.resolve(dataset, model, system, settings) for system in self.models.systems(model, adapters)]

    # -- results -----------------------------------------------------------------------------

    def inspect(self, dataset: str, model: str, system: str | ResolvedSystem | None, user_id: str,
                settings: InspectSettings) -> UserInspection:
        """One user scored by one system; cached, so switching back is instant."""
        user_id = self.datasets.check_user(dataset, user_id)
        return self._inspect(dataset, model, self.resolve(dataset, model, system, settings), user_id)

    @cachedmethod(lambda self: self._inspections, lock=lambda self: self._cache_lock,
                  key=lambda self, dataset, model, system, user_id: hashkey(
                      dataset, model, system.name, system.stamp, system.requested, user_id))
    def _inspect(self, dataset: str, model: str, system: ResolvedSystem, user_id: str) -> UserInspection:
        """The adapter's weights stamp is part of the cache key, so an adapter replaced under its name is scored
        anew."""
        with self.using(dataset, model) as inspector:
            return inspector.inspect(user_id, system.requested, system)

    def compare_user(self, dataset: str, model: str, adapters: Sequence[str], user_id: str,
                     settings: InspectSettings) -> list[UserInspection]:
        """The base and up to three adapters on the same user and candidates."""
        return [self.inspect(dataset, model, system, user_id, settings)
                for system in self.resolve_systems(dataset, model, adapters, settings)]

    def compare_users(self, dataset: str, model: str, systems: Sequence[str] | Sequence[ResolvedSystem],
                      settings: InspectSettings, count: int, progress: Callable[[int, int], None] | None = None,
                      stop: threading.Event | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """Per-user results and the paired summary over the first `count` users, the baselines (random,
        popularity, retriever) scored on the same candidates beside the LLM systems; cached per request.

        `systems` are adapter names (the base is added) or what resolve_systems returned for these settings."""
        resolved = (list(systems) if systems and all(isinstance(system, ResolvedSystem) for system in systems)
                    else self.resolve_systems(dataset, model, systems, settings))
        users = tuple(self.datasets.first_users(dataset, count))
        return self._compare_users(dataset, model, tuple(resolved), users, settings, progress, stop)

    @cachedmethod(lambda self: self._comparisons, lock=lambda self: self._cache_lock,
                  key=lambda self, dataset, model, systems, users, settings, progress, stop: hashkey(
                      dataset, model, tuple((system.name, system.stamp) for system in systems), users, settings))
    def _compare_users(self, dataset: str, model: str, systems: tuple[ResolvedSystem, ...], users: tuple[str, ...],
                       settings: InspectSettings, progress: Callable[[int, int], None] | None,
                       stop: threading.Event | None) -> tuple[pd.DataFrame, pd.DataFrame]:
        """The systems' weights stamps are part of the cache key like the users and the settings; a stopped run
        raises, so nothing half-done is cached."""
        with self.running(dataset, model, stop) as (inspector, check):
            per_user, summary = compare_systems(inspector, list(users), settings, systems, progress=progress,
                                                cancel=check, chunk_size=BACKGROUND_CHUNK)
            return with_baselines(inspector, per_user, summary, list(users), settings, BASELINES)

    # -- diagnostics -------------------------------------------------------------------------

    def position_bias(self, dataset: str, model: str, system: str | None, user_id: str, settings: InspectSettings,
                      spec: OrderSpec, progress: Callable[[int, int], None] | None = None,
                      stop: threading.Event | None = None) -> PositionBias:
        """One user's candidates in other orders (diagnostics.position_bias)."""
        user_id = self.datasets.check_user(dataset, user_id)
        system = self.models.check_system(model, system)
        with self.running(dataset, model, stop) as (inspector, check):
            return position_bias(inspector, user_id, settings, system, spec, batch_size=BACKGROUND_CHUNK,
                                 progress=progress, cancel=check)

    def position_bias_users(self, dataset: str, model: str, system: str | None, count: int,
                            settings: InspectSettings, spec: OrderSpec,
                            progress: Callable[[int, int], None] | None = None,
                            stop: threading.Event | None = None) -> PositionBiasSummary:
        """Position bias over the first `count` users (diagnostics.position_bias_over_users)."""
        system = self.models.check_system(model, system)
        users = self.datasets.first_users(dataset, count)
        with self.running(dataset, model, stop) as (inspector, check):
            return position_bias_over_users(inspector, users, settings, system, spec, batch_size=BACKGROUND_CHUNK,
                                            progress=progress, cancel=check)

    def letter_prior(self, dataset: str, model: str, system: str | None, count: int, settings: InspectSettings,
                     mode: str, placeholder: str, progress: Callable[[int, int], None] | None = None,
                     stop: threading.Event | None = None) -> LetterPrior:
        """The letter prior (candidate texts hidden) over the first `count` users."""
        system = self.models.check_system(model, system)
        users = self.datasets.first_users(dataset, count)
        with self.running(dataset, model, stop) as (inspector, check):
            return letter_prior(inspector, users, settings, system, mode, placeholder=placeholder, progress=progress,
                                cancel=check, batch_size=BACKGROUND_CHUNK)

    def history_influence(self, dataset: str, model: str, system: str | None, user_id: str,
                          settings: InspectSettings, stop: threading.Event | None = None) -> HistoryInfluence:
        """Leave one history item out, for one user."""
        user_id = self.datasets.check_user(dataset, user_id)
        system = self.models.check_system(model, system)
        with self.running(dataset, model, stop) as (inspector, check):
            return history_influence(inspector, user_id, settings, system, batch_size=BACKGROUND_CHUNK, cancel=check)

    def template_consistency(self, model: str, preset: str, count: int,
                             template_kwargs: str = "") -> TemplateConsistency:
        """Is the inference prompt a token prefix of the training conversation (tokenizer only, no lock)."""
        return template_consistency(self.models.tokenizer(model),
                                    with_template_kwargs(get_preset(preset), template_kwargs),
                                    count=check_limit("candidates", count))

    def letter_mass(self, dataset: str, model: str, adapters: Sequence[str] | None, count: int,
                    settings: InspectSettings, progress: Callable[[int, int], None] | None = None,
                    stop: threading.Event | None = None) -> LetterMass:
        """The letters' share of the full distribution, base and up to three adapters, over the first users."""
        systems = self.models.systems(model, adapters)
        users = self.datasets.first_users(dataset, count)
        with self.running(dataset, model, stop) as (inspector, check):
            return letter_mass(inspector, users, settings, systems, progress=progress, cancel=check,
                               chunk_size=BACKGROUND_CHUNK)


class FineTuneHandover:
    """The Fine-tune tab's side of the app: a training subprocess started on a registered dataset and model, and
    a preview of one training sample before it starts."""

    def __init__(self, jobs: JobRunner | None, datasets: DatasetRegistry, models: ModelRegistry) -> None:
        self.jobs = jobs
        self.datasets = datasets
        self.models = models

    def runner(self) -> JobRunner:
        """The fine-tune runner, refused by name when the app was started without one."""
        if self.jobs is None:
            raise SessionError("this app was started without a fine-tune runner")
        return self.jobs

    def start(self, name: str, dataset: str, model: str, training_preset: str,
              overrides: dict[str, Any]) -> JobStatus:
        """Start `python -m rerank_core train` for this dataset and model; a bad setting raises ValueError naming it
        before anything starts (the runner checks the request, then hands the settings over as a JSON file)."""
        runner = self.runner()
        entry = self.datasets.get(dataset)
        if entry.path is None:
            raise SessionError(f"dataset {dataset!r} exists only in memory; a fine-tune subprocess needs it on disk")
        # A field the dataset lacks is named now, not by the subprocess after it loaded the data.
        entry.dataset.item_text(training_config(training_preset, **overrides).text_field)
        reference, template = self.models.train_reference(model)
        request = TrainRequest(name=str(name or "").strip(), model_path=reference, data_path=str(entry.path.resolve()),
                               training_preset=training_preset, options=overrides, chat_template=template)
        try:
            return runner.start(request)
        except AdapterError as error:  # "already exists in /srv/...": the client is not told where the server keeps it
            root = str(runner.adapters)
            if root not in str(error):
                raise
            raise AdapterError(str(error).replace(root, "the adapters folder")) from None

    def preview(self, dataset: str, model: str, training_preset: str,
                overrides: dict[str, Any]) -> tuple[Any, list[int], list[bool], str]:
        """One training sample of these settings: tokenizer, token IDs, loss flags (labels.mask_preview), caption."""
        config = training_config(training_preset, **overrides)
        data = self.datasets.get(dataset).dataset
        tokenizer = self.models.tokenizer(model)
        # What the item text costs, shown before a run; its longest prompt is the budget the run would size.
        cost = item_text_cost(data, tokenizer, config)
        budget = cost.tokens if config.max_prompt_tokens is None else config.max_prompt_tokens
        samples, _ = build_training_samples(data, tokenizer, replace(config, max_samples=1, max_prompt_tokens=budget))
        examples, _ = label_samples(tokenizer, samples, config)
        if not examples:
            raise SessionError("no training sample fits these settings: raise max prompt tokens, use fewer "
                               "candidates, or check that users have at least 4 interactions")
        sample = samples[0]
        masked = mask_preview(tokenizer, examples[0])
        caption = (f"User {sample.user_id}, target = training item {sample.position + 1}, answer letter "
                   f"{sample.answer_letter!r}, preset {config.preset!r}, {len(masked)} tokens. "
                   f"{cost.describe_cost(config.text_field)}.")
        return tokenizer, [token.token_id for token in masked], [token.loss for token in masked], caption


class AppContext:
    """One app process: its settings, the registries, the inspection service, the fine-tune hand-over and the
    page sessions' stop flags, each its own object (handlers name the one they need)."""

    def __init__(self, config: AppConfig, datasets: Sequence[DatasetEntry], models: Sequence[ModelEntry],
                 *, jobs: JobRunner | None = None) -> None:
        if not datasets or not models:
            raise SessionError("the app needs at least one dataset and one model")
        self.config = config
        self.datasets = DatasetRegistry(config, datasets)
        self.models = ModelRegistry(config, models)
        self.inspections = InspectionService(config, self.datasets, self.models)
        self.finetune = FineTuneHandover(jobs, self.datasets, self.models)
        self.stops = StopRegistry()


def _inside_any(path: Path, roots: Sequence[Path]) -> bool:
    """Whether the path, with links and '..' resolved, lies in one of the folders."""
    resolved = path.expanduser().resolve()
    return any(resolved.is_relative_to(root.expanduser().resolve()) for root in roots)


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
