"""One session over a dataset and a model: every value the app and the CLI show comes from here."""

from __future__ import annotations

import functools
import hashlib
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import pandas as pd
from cachetools import LRUCache, cachedmethod
from cachetools.keys import hashkey

from rerank_core.adapters import AdapterError, AdapterInfo, list_adapters
from rerank_core.answer_slot import AnswerSlot
from rerank_core.candidates import CandidateConfig, CandidateSampler, CandidateSet
from rerank_core.data.dataset import Dataset, UserSplit
from rerank_core.data.item_text import item_text_spelling
from rerank_core.distributed import ProcessShard
from rerank_core.limits import check_limit
from rerank_core.metrics import METRIC_NAMES, metrics_at, rank_of_truth
from rerank_core.models import LoadedModel
from rerank_core.progress import CancelCheck, checkpoint
from rerank_core.prompts import (
    PRESETS,
    Prompt,
    PromptPreset,
    answer_slot,
    build_prompt,
    letters_for,
    parse_template_kwargs,
    with_template_kwargs,
)
from rerank_core.scoring import LetterScores, ScoreCache, score_token_ids
from rerank_core.systems import BASE, ResolvedSystem, resolve_system
from rerank_core.verbalizer import STRATEGIES, LetterToken, VerbalizerError, resolve_letters

__all__ = ["BASE", "PER_USER_COLUMNS", "InspectSettings", "Inspector", "ResolvedSystem", "UserInspection"]

log = logging.getLogger(__name__)

# Each candidate seed or source is a new CandidateConfig, and a sampler holds the dataset's training sequences
# (megabytes on MovieLens): a client walking through seeds kept one per seed, without end.
MAX_SAMPLERS = 8
# Letter tokens per (preset, strategy, count): the preset carries the chat-template options, any JSON text.
MAX_LETTER_SETS = 64

ProgressCallback = Callable[[int, int], None]
# The columns of every per-user evaluation frame (Inspector.evaluate, baselines.evaluate_baseline). A target not
# among the candidates has rank None and every metric 0; target_in_candidates says so, so a summary can also
# average over the users whose target is there (metrics.AMONG_CANDIDATES) and report the candidate recall.
PER_USER_COLUMNS = ("user_id", "system", "preset", "rank", "target_in_candidates", "truth_probability",
                    "letter_mass", "top1_letter", "prompt_tokens", *METRIC_NAMES)


@dataclass(frozen=True)
class InspectSettings:
    """Everything that decides a prompt and its letter tokens, besides the user and the model."""

    preset: PromptPreset = PRESETS["seed"]
    strategy: str = "as_trained"
    text_field: str = "title"
    split: str = "test"
    candidates: CandidateConfig = field(default_factory=CandidateConfig)
    max_prompt_tokens: int | None = 1536
    use_adapter_preset: bool = True
    # Chat-template options as JSON text (e.g. '{"enable_thinking": false}'); '' for none.
    template_kwargs: str = ""

    def __post_init__(self) -> None:
        if not isinstance(self.preset, PromptPreset):  # a name here would be resolved again in every function below
            raise TypeError(f"InspectSettings.preset must be a PromptPreset, not {type(self.preset).__name__} "
                            f"{self.preset!r}; resolve a name once with prompts.get_preset at the entry point")
        for name in ("strategy", "text_field", "split"):  # a list or an object from a JSON request, named here
            if not isinstance(getattr(self, name), str):
                raise ValueError(f"{name} must be a name (text), got {type(getattr(self, name)).__name__} "
                                 f"{getattr(self, name)!r:.60}")
        if self.strategy not in STRATEGIES:
            raise VerbalizerError(f"verbalizer strategy {self.strategy!r:.60} is not one of {', '.join(STRATEGIES)}")
        if self.max_prompt_tokens is not None:
            object.__setattr__(self, "max_prompt_tokens", check_limit("max_prompt_tokens", self.max_prompt_tokens))
        object.__setattr__(self, "template_kwargs", parse_template_kwargs(self.template_kwargs))
        # One spelling ("title + count" → "title+count"), so an adapter's recorded item text compares equal.
        object.__setattr__(self, "text_field", item_text_spelling(self.text_field))

    def to_json(self) -> dict[str, Any]:
        """Plain values, the preset by its name (how settings are stored and shown)."""
        return {**asdict(self), "preset": self.preset.name}

    @functools.cached_property
    def prompt_preset(self) -> PromptPreset:
        """The preset with the chat-template options: what every rendering of these settings uses."""
        return with_template_kwargs(self.preset, self.template_kwargs)


@dataclass(frozen=True)
class PreparedUser:
    """A user's prompt before any forward pass: what the model will read and which tokens are letters."""

    split: UserSplit
    candidates: CandidateSet
    candidate_texts: tuple[str, ...]
    prompt: Prompt
    letter_tokens: tuple[LetterToken, ...]
    # What the scored prompt adds to or cuts from the generation prompt.
    answer_slot: AnswerSlot = field(default_factory=AnswerSlot)

    @property
    def token_ids(self) -> tuple[int, ...]:
        """What the model reads: the prompt's rendering, encoded once when it was fitted to the budget."""
        return self.prompt.token_ids

    @property
    def shown_history(self) -> tuple[str, ...]:
        """The history items the prompt actually shows (the oldest may have been dropped to fit)."""
        return self.split.history[self.prompt.dropped_history:]


@dataclass(frozen=True)
class UserInspection:
    """Everything the Inspect view shows for one user and one system (base or adapter)."""

    system: str
    settings: InspectSettings
    prepared: PreparedUser
    scores: LetterScores
    rank: int | None
    metrics: dict[str, float]
    preset_note: str = ""

    @property
    def user_id(self) -> str:
        return self.prepared.split.user_id

    def candidates_frame(self, dataset: Dataset) -> pd.DataFrame:
        """One row per candidate: letter, text, ground-truth marker, probability and rank."""
        prepared = self.prepared
        ranking = self.scores.ranking()
        rank_of = {index: position + 1 for position, index in enumerate(ranking)}
        rows = []
        for index, item_id in enumerate(prepared.candidates.item_ids):
            rows.append({
                "letter": prepared.prompt.letters[index],
                "item_id": item_id,
                "text": prepared.candidate_texts[index],
                "truth": index == prepared.candidates.target_index,
                "probability": self.scores.letter_probs[index],
                "logit": self.scores.letter_logits[index],
                "rank": rank_of[index],
            })
        return pd.DataFrame(rows)

    def history_frame(self, dataset: Dataset) -> pd.DataFrame:
        """The history oldest first, with which items the prompt kept."""
        history = self.prepared.split.history
        dropped = len(history) - len(self.prepared.prompt.history_texts)
        return pd.DataFrame([
            {"position": position + 1, "item_id": item_id,
             "text": dataset.text(item_id, self.settings.text_field), "in_prompt": position >= dropped}
            for position, item_id in enumerate(history)])

    def audit_frame(self) -> pd.DataFrame:
        return pd.DataFrame([token.to_json() for token in self.prepared.letter_tokens])

    def to_json(self, dataset: Dataset) -> dict[str, Any]:
        """A plain-JSON view, the same fields the app shows."""
        prepared = self.prepared
        return {
            "user_id": self.user_id,
            "split": prepared.split.split,
            "system": self.system,
            "settings": self.settings.to_json(),
            "preset_note": self.preset_note,
            "history": self.history_frame(dataset).to_dict(orient="records"),
            "dropped_history": prepared.prompt.dropped_history,
            "candidates": self.candidates_frame(dataset).to_dict(orient="records"),
            "target_id": prepared.split.target,
            "target_index": prepared.candidates.target_index,
            "rendered_prompt": prepared.prompt.rendered,
            "answer_slot": prepared.answer_slot.to_json(),
            "prompt_tokens": len(prepared.token_ids),
            "audit": [token.to_json() for token in prepared.letter_tokens],
            "letter_mass": self.scores.letter_mass,
            "top_other": [{"token": token, "token_id": token_id, "probability": probability}
                          for token, token_id, probability in self.scores.top_other],
            "rank": self.rank,
            "metrics": self.metrics,
        }


class Inspector:
    """A dataset, a tokenizer and optionally a model with adapters; caches samplers, letters and scores."""

    def __init__(self, dataset: Dataset, loaded: LoadedModel | None = None, *, tokenizer: Any = None,
                 adapters_root: str | None = None, batch_size: int = 8, shard: ProcessShard | None = None) -> None:
        if loaded is None and tokenizer is None:
            raise ValueError("an Inspector needs a loaded model or at least a tokenizer")
        self.dataset = dataset
        self.loaded = loaded
        self.tokenizer = tokenizer if tokenizer is not None else loaded.tokenizer
        self.adapters_root = adapters_root
        self.batch_size = check_limit("batch_size", batch_size)
        # Under torchrun / accelerate launch: every process prepares all prompts, scores its share, gets all.
        self.shard = shard
        self._samplers: LRUCache = LRUCache(MAX_SAMPLERS)
        self._letters: LRUCache = LRUCache(MAX_LETTER_SETS)
        self._caches_lock = threading.Lock()  # app handlers share an Inspector across threads
        self.cache = ScoreCache()
        # Prompts of one call that share a token prefix run it once (scoring.py); off only to measure the gain.
        self.share_prefix = True

    # -- prompts -----------------------------------------------------------------------------

    def cache_sizes(self) -> dict[str, tuple[int, int]]:
        """Entries and bound of each cache, for the app's and the load benchmark's memory report."""
        return {"samplers": (len(self._samplers), MAX_SAMPLERS), "letter sets": (len(self._letters), MAX_LETTER_SETS),
                "scores": (len(self.cache), int(self.cache.maxsize))}

    @cachedmethod(lambda self: self._samplers, lock=lambda self: self._caches_lock)
    def sampler(self, config: CandidateConfig) -> CandidateSampler:
        """The candidate sampler of this config, built once (it indexes the dataset) while it is in use."""
        return CandidateSampler(self.dataset, config)

    # The whole frozen preset is the key: a custom preset named like a built-in one renders differently.
    @cachedmethod(lambda self: self._letters, lock=lambda self: self._caches_lock,
                  key=lambda self, settings, count: hashkey(settings.prompt_preset, settings.strategy, count))
    def letter_tokens(self, settings: InspectSettings, count: int) -> tuple[LetterToken, ...]:
        """Letters resolved once per (preset, strategy, count): they do not depend on the items."""
        return tuple(resolve_letters(self.tokenizer, settings.prompt_preset, letters_for(count), settings.strategy))

    def prepare(self, user_id: str, settings: InspectSettings) -> PreparedUser:
        """History, candidates, the rendered prompt, its token IDs and the letter tokens; no model needed."""
        split = self.dataset.split_user(user_id, settings.split)
        candidates = self.sampler(settings.candidates).for_split(split)
        history_texts = [self.dataset.text(item, settings.text_field) for item in split.history]
        candidate_texts = tuple(self.dataset.text(item, settings.text_field) for item in candidates.item_ids)
        prompt = build_prompt(self.tokenizer, settings.prompt_preset, history_texts, candidate_texts,
                              max_prompt_tokens=self._prompt_budget(settings))
        letters = self.letter_tokens(settings, len(candidate_texts))
        return PreparedUser(split, candidates, candidate_texts, prompt, letters,
                            answer_slot(self.tokenizer, settings.prompt_preset))

    def variant(self, prepared: PreparedUser, settings: InspectSettings, *, history_ids: Sequence[str] | None = None,
                order: Sequence[int] | None = None, candidate_texts: Sequence[str] | None = None) -> PreparedUser:
        """The prepared user with another history (leave-one-out), the candidates in another order (rotations) or
        other candidate texts (blanked); not re-truncated, so a variant differs from the original only there."""
        history_ids = prepared.shown_history if history_ids is None else tuple(history_ids)
        order = range(len(prepared.candidates.item_ids)) if order is None else order
        item_ids = tuple(prepared.candidates.item_ids[index] for index in order)
        texts = (tuple(prepared.candidate_texts[index] for index in order) if candidate_texts is None
                 else tuple(candidate_texts))
        target = prepared.candidates.target_index
        history_texts = [self.dataset.text(item, settings.text_field) for item in history_ids]
        prompt = build_prompt(self.tokenizer, settings.prompt_preset, history_texts, texts, max_prompt_tokens=None)
        candidates = CandidateSet(item_ids, None if target is None else list(order).index(target))
        return replace(prepared, candidates=candidates, candidate_texts=texts, prompt=prompt)

    def _prompt_budget(self, settings: InspectSettings) -> int | None:
        """The setting, capped at the model's context: positions past it read garbage or fail to index."""
        config = getattr(self.loaded.model, "config", None) if self.loaded is not None else None
        context = getattr(config, "max_position_embeddings", None)
        if not isinstance(context, int) or context <= 0:
            return settings.max_prompt_tokens
        return context if settings.max_prompt_tokens is None else min(settings.max_prompt_tokens, context)

    # -- adapters ----------------------------------------------------------------------------

    def adapters(self) -> list[AdapterInfo]:
        return list_adapters(self.adapters_root)

    def resolve(self, system: str | ResolvedSystem, settings: InspectSettings) -> ResolvedSystem:
        """The system as this request scores it (systems.resolve_system); one already resolved passes through, so
        a caller that resolved it once hands it down and nothing below checks the adapter again."""
        if isinstance(system, ResolvedSystem):
            if system.requested != settings:
                raise ValueError(f"system {system.name!r} was resolved for other settings than these: resolve it "
                                 "again with Inspector.resolve")
            return system
        return resolve_system(self.loaded, system, settings, self.adapters_root)

    def _activate(self, system: ResolvedSystem) -> Any:
        """The model to run for `system`: the base (adapters disabled) or one loaded adapter."""
        if self.loaded is None:
            raise ValueError("scoring needs a model; this Inspector was built with a tokenizer only")
        slots = self.loaded.adapters
        if system.adapter is None:
            return slots.peft_model or self.loaded.model
        name, info = system.name, system.adapter
        if name in slots.infos and slots.versions.get(name) != system.stamp:
            slots.peft_model.delete_adapter(name)
            del slots.infos[name]
        if name not in slots.infos:
            # peft takes seconds to import: only when an adapter is first scored
            from peft import PeftModel

            try:
                if slots.peft_model is not None:
                    slots.peft_model.load_adapter(info.path, adapter_name=name)
                else:
                    slots.peft_model = PeftModel.from_pretrained(self.loaded.model, info.path, adapter_name=name)
            except Exception as error:  # PEFT's KeyError/TypeError for a damaged config names no adapter
                raise AdapterError(f"adapter {name!r} in {info.path} cannot be loaded ({type(error).__name__}: "
                                   f"{error}); delete the folder and train it again") from error
            slots.peft_model.eval()
            slots.infos[name] = info
            slots.versions[name] = system.stamp
        slots.peft_model.set_adapter(name)
        return slots.peft_model

    # -- scoring -----------------------------------------------------------------------------

    def score_prepared(self, system: ResolvedSystem, prepared: Sequence[PreparedUser], *,
                       batch_size: int | None = None) -> list[LetterScores]:
        """Score prompts built outside `prepare` (diagnostics reorder or edit them), via the same cache."""
        return self._score(system, prepared, batch_size=batch_size)

    def _score(self, system: ResolvedSystem, prepared: Sequence[PreparedUser], *,
               batch_size: int | None = None) -> list[LetterScores]:
        # The weights stamp is in the key: an adapter replaced under its name is scored anew.
        keys = [(self.loaded.fingerprint if self.loaded else None, system.name, system.stamp,
                 _prompt_digest(item.token_ids), tuple(token.token_id for token in item.letter_tokens))
                for item in prepared]
        results: list[LetterScores | None] = [self.cache.get(key) for key in keys]
        missing = [index for index, result in enumerate(results) if result is None]
        shared = self.shard is not None and self.shard.world_size > 1
        # Every process sees the same misses (same calls, same cache), so the shares partition them.
        mine = [missing[i] for i in self.shard.share(len(missing))] if shared else missing
        # Group by letter IDs: one batch shares one letter set.
        groups: dict[tuple[int, ...], list[int]] = {}
        for index in mine:
            groups.setdefault(keys[index][4], []).append(index)
        for letter_ids, indices in groups.items():
            model = self._activate(system)
            if system.adapter is None and hasattr(model, "disable_adapter"):
                with model.disable_adapter():
                    scored = score_token_ids(model, self.tokenizer, [prepared[i].token_ids for i in indices],
                                             letter_ids, batch_size=batch_size or self.batch_size,
                                             share_prefix=self.share_prefix)
            else:
                scored = score_token_ids(model, self.tokenizer, [prepared[i].token_ids for i in indices],
                                         letter_ids, batch_size=batch_size or self.batch_size,
                                         share_prefix=self.share_prefix)
            for index, result in zip(indices, scored):
                results[index] = result
        if shared and missing:
            for part in self.shard.gather({index: results[index] for index in mine}):
                for index, result in part.items():
                    results[index] = result
        for index in missing:
            self.cache.put(keys[index], results[index])
        return [result for result in results if result is not None]

    def inspect(self, user_id: str, settings: InspectSettings,
                system: str | ResolvedSystem = BASE) -> UserInspection:
        """Prepare and score one user with one system (a name, or a system resolved for these settings)."""
        resolved = self.resolve(system, settings)
        prepared = self.prepare(user_id, resolved.settings)
        (scores,) = self._score(resolved, [prepared])
        rank = rank_of_truth(scores.letter_probs, prepared.candidates.target_index)
        return UserInspection(resolved.name, resolved.settings, prepared, scores, rank, metrics_at(rank),
                              resolved.note)

    def evaluate(self, users: Iterable[str], settings: InspectSettings, system: str | ResolvedSystem = BASE,
                 progress: ProgressCallback | None = None, cancel: CancelCheck = None,
                 chunk_size: int | None = None) -> pd.DataFrame:
        """Per-user rank, ground-truth probability, letter mass and metrics, in batches.

        `cancel` is checked before every chunk of `chunk_size` users (default: four batches): a stop request
        raises progress.Cancelled there, and a shared app gives the model to waiting requests there.
        """
        resolved = self.resolve(system, settings)
        effective, system = resolved.settings, resolved.name
        users = list(users)
        rows = []
        chunk_size = max(chunk_size or self.batch_size * 4, 1)
        for start in range(0, len(users), chunk_size):
            checkpoint(f"scoring {system}", start, len(users), cancel=cancel)
            chunk = users[start:start + chunk_size]
            prepared = [self.prepare(user, effective) for user in chunk]
            for user, item, scores in zip(chunk, prepared, self._score(resolved, prepared)):
                target_index = item.candidates.target_index
                rank = rank_of_truth(scores.letter_probs, target_index)
                rows.append({
                    "user_id": user, "system": system, "preset": effective.preset.name,
                    "rank": rank, "target_in_candidates": target_index is not None, "truth_probability":
                        None if target_index is None else scores.letter_probs[target_index],
                    "letter_mass": scores.letter_mass, "top1_letter": item.prompt.letters[scores.ranking()[0]],
                    "prompt_tokens": scores.prompt_tokens, **metrics_at(rank)})
            if progress is not None:
                progress(min(start + chunk_size, len(users)), len(users))
        return pd.DataFrame(rows, columns=list(PER_USER_COLUMNS))


def _prompt_digest(token_ids: Sequence[int]) -> bytes:
    """A score-cache key for a prompt: the tuple of a 1,500-token prompt is ~50 KB of Python ints, so 4,096 cached
    scores kept ~200 MB of keys alive; 32 bytes of BLAKE2b stand for it (a collision is out of reach)."""
    return hashlib.blake2b(",".join(map(str, token_ids)).encode(), digest_size=32).digest()
