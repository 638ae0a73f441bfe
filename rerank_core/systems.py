"""A system (the base or one adapter) resolved once per request: its checked manifest, its weights stamp and the
settings it is scored with, so nothing below the entry point checks the adapter again."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING

from rerank_core.adapters import WEIGHTS_FILE, AdapterInfo, adapters_root, check_adapter, validate_adapter_name
from rerank_core.models import LoadedModel
from rerank_core.prompts import PromptPreset

if TYPE_CHECKING:  # inspector.py imports this module: the settings type is only named here
    from rerank_core.inspector import InspectSettings

__all__ = ["BASE", "ResolvedSystem", "WeightsStamp", "resolve_system"]

BASE = "base"
# (mtime_ns, size) of an adapter's weights file: an adapter overwritten under the same name is a new system.
WeightsStamp = tuple[int, int]


@dataclass(frozen=True)
class ResolvedSystem:
    """What one request scores: the system's name, its checked adapter, the settings asked for and those it is
    scored with (an adapter's own preset, template options and budget), and why they differ."""

    name: str
    adapter: AdapterInfo | None
    stamp: WeightsStamp | None
    requested: InspectSettings
    settings: InspectSettings
    notes: tuple[str, ...] = ()

    @property
    def note(self) -> str:
        """The notes as one line, as the app and the CLI print them ('' when scored as asked)."""
        return "; ".join(self.notes)

    @property
    def cache_key(self) -> tuple[str, WeightsStamp | None, InspectSettings]:
        """What a cached result of this system depends on (the manifest is read from the same folder)."""
        return self.name, self.stamp, self.settings

    def on_preset(self, preset: PromptPreset) -> ResolvedSystem:
        """The same system scored on another preset, as asked: Compare's reference on an adapter's preset."""
        settings = replace(self.settings, preset=preset, use_adapter_preset=False)
        return replace(self, requested=settings, settings=settings, notes=())


def resolve_system(loaded: LoadedModel | None, system: str, settings: InspectSettings,
                   root: str | os.PathLike[str] | None = None) -> ResolvedSystem:
    """The one place an adapter is checked and its training settings applied: an adapter loaded into the model
    with the same weights stamp was checked when loaded, any other is checked here."""
    if system == BASE:
        return ResolvedSystem(BASE, None, None, settings, settings)
    if loaded is None:
        raise ValueError(f"scoring adapter {system!r} needs a model; this Inspector was built with a tokenizer only")
    weights = adapters_root(root) / validate_adapter_name(system) / WEIGHTS_FILE
    try:
        stat = weights.stat()
    except FileNotFoundError:
        check_adapter(loaded, system, root)  # raises with the available names
        raise
    stamp = (stat.st_mtime_ns, stat.st_size)
    slots = loaded.adapters
    loaded_info = slots.infos.get(system)
    # Checked when it was loaded into the model, if that was this very file.
    unchanged = (loaded_info is not None and slots.versions.get(system) == stamp
                 and Path(loaded_info.path).parent == weights.parent.parent)
    info = loaded_info if unchanged else check_adapter(loaded, system, root)
    if not settings.use_adapter_preset:
        return ResolvedSystem(system, info, stamp, settings, settings)
    effective, notes = _as_trained(info, settings)
    return ResolvedSystem(system, info, stamp, settings, effective, notes)


def _as_trained(info: AdapterInfo, settings: InspectSettings) -> tuple[InspectSettings, tuple[str, ...]]:
    """An adapter is scored with the preset, template options and prompt budget it was trained with."""
    notes, effective, system = [], settings, info.name
    trained = info.preset
    if trained and trained != settings.preset:
        notes.append(f"adapter {system!r} was trained with preset {trained.name!r}; scored with it, not "
                     f"{settings.preset.name!r}")
        effective = replace(effective, preset=trained)
    options = info.template_kwargs
    if options is not None and options != settings.template_kwargs:
        notes.append(f"adapter {system!r} was trained with template_kwargs {options or '{}'}; scored with them, "
                     f"not {settings.template_kwargs or '{}'}")
        effective = replace(effective, template_kwargs=options)
    # Not switched like the preset: base and adapter then differ in item text, which Compare would credit to
    # the fine-tune; the note says which field to pick for both.
    if info.text_field and info.text_field != settings.text_field:
        notes.append(f"adapter {system!r} was trained with item text {info.text_field!r}, scored here with "
                     f"{settings.text_field!r}: pick {info.text_field!r} as the item text field to score it as "
                     "trained")
    # Not switched either: the candidates are the evaluation's, the same for every system of a comparison. An
    # adapter that learnt on random negatives meets harder ones on retriever candidates, and the reverse.
    learnt_on = info.candidate_source
    if learnt_on and learnt_on != settings.candidates.source:
        notes.append(f"adapter {system!r} learnt on {learnt_on} candidates, scored here on "
                     f"{settings.candidates.source} candidates")
    # The training budget was sized for the training candidate count: with another count it does not apply.
    budget = info.max_prompt_tokens
    same_count = info.candidate_count in (None, settings.candidates.count)
    if budget and same_count and budget != settings.max_prompt_tokens:
        notes.append(f"prompts cut to {budget} tokens, as in its training (not {settings.max_prompt_tokens})")
        effective = replace(effective, max_prompt_tokens=budget)
    return effective, tuple(notes)
