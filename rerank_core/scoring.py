"""Batched forward passes that read the logits of the last prompt position only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from cachetools import LRUCache
from transformers.cache_utils import DynamicCache, DynamicLayer

from rerank_core.limits import check_limit
from rerank_core.mixed_precision import mixed_precision

__all__ = ["LetterScores", "ScoreCache", "common_prefix_length", "score_token_ids"]


@dataclass(frozen=True)
class LetterScores:
    """What one forward pass says about the letters, and how much it wanted to say something else."""

    letter_logits: tuple[float, ...]
    letter_probs: tuple[float, ...]
    letter_mass: float
    top_other: tuple[tuple[str, int, float], ...]
    prompt_tokens: int

    def ranking(self) -> list[int]:
        """Candidate indices, most probable first (stable on ties)."""
        return sorted(range(len(self.letter_probs)), key=lambda index: -self.letter_probs[index])


# Batches are padded to a multiple of this many tokens. oneDNN (bf16 matmuls on CPU) compiles and caches kernels
# per input shape: every new prompt length cost seconds and ~3 MiB of RSS that was never given back.
_LENGTH_BUCKET = 32
# Suffixes run once per prompt (20 rotations of one user: 20 rows of ~170 tokens), so their padding costs 20
# times; a finer bucket wastes at most 7 tokens a row where 32 wasted up to 31 (24 of 168 for user u0001).
_SUFFIX_BUCKET = 8


# A common prefix shorter than this is not worth a forward pass of its own.
_MIN_SHARED_PREFIX = 32


def _pad_left(batch: Sequence[Sequence[int]], pad_id: int,
              bucket: int = _LENGTH_BUCKET) -> tuple[torch.Tensor, torch.Tensor]:
    longest = -(-max(len(ids) for ids in batch) // bucket) * bucket
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids):] = 1
    return input_ids, attention_mask


def _forward(model: Any, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
             cache: Any = None, *, keep_cache: bool = False) -> Any:
    """One forward pass returning the last position's logits (in fp32 for a bf16 model: see mixed_precision)."""
    device = next(model.parameters()).device
    with mixed_precision(model):
        # `cache` only when there is one: a model with its own code may not know the argument.
        return model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            logits_to_keep=1,
            use_cache=keep_cache or cache is not None,
            **({} if cache is None else {"cache": cache}),
        )


@torch.inference_mode()
def _last_position_logits(model: Any, batch: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    input_ids, attention_mask = _pad_left(batch, pad_id)
    # Left padding shifts positions; give each row positions counted from its first real token,
    # so a padded prompt sees exactly the positions it would see alone.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    return _forward(model, input_ids, attention_mask, position_ids).logits[:, -1, :].float()


@dataclass(frozen=True)
class _SharedPrefix:
    """A prefix's key/value cache (batch 1, left-padded to a length bucket) and its attention mask."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    attention_mask: torch.Tensor
    length: int


@torch.inference_mode()
def _run_prefix(model: Any, prefix: Sequence[int], pad_id: int) -> _SharedPrefix | None:
    """Run the prefix once; None when the model's cache is not the plain kind this path knows how to copy."""
    input_ids, attention_mask = _pad_left([prefix], pad_id)
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = getattr(_forward(model, input_ids, attention_mask, position_ids, keep_cache=True), "cache", None)
    # No cache, or sliding-window or quantized layers that keep other state than keys and values: from scratch.
    if cache is None or any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [None])):
        return None
    return _SharedPrefix(tuple((layer.keys, layer.values) for layer in cache.layers), attention_mask, len(prefix))


@torch.inference_mode()
def _suffix_logits(model: Any, shared: _SharedPrefix, suffixes: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """The suffixes run against one copy of the prefix cache per row; pads sit between prefix and suffix."""
    rows = len(suffixes)
    input_ids, suffix_mask = _pad_left(suffixes, pad_id, _SUFFIX_BUCKET)
    attention_mask = torch.cat([shared.attention_mask.expand(rows, -1), suffix_mask], dim=1)
    position_ids = shared.length + (suffix_mask.cumsum(dim=1) - 1).clamp(min=0)
    cache = DynamicCache(ddp_cache_data=[(keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1))
                                         for keys, values in shared.layers])
    return _forward(model, input_ids, attention_mask, position_ids, cache).logits[:, -1, :].float()


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    first, last = min(map(tuple, prompts)), max(map(tuple, prompts))  # lexicographic extremes bound the prefix
    length = 0
    limit = min(len(ids) for ids in prompts) - 1
    while length < limit and first[length] == last[length]:
        length += 1
    return length


def score_token_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    letter_token_ids: Sequence[int],
    *,
    batch_size: int = 8,
    top_other: int = 5,
    share_prefix: bool = True,
) -> list[LetterScores]:
    """Score tokenized prompts: letter logits, softmax over letters, letter mass, top other tokens.

    With `share_prefix`, a token prefix common to all prompts (system prompt, instruction, history) runs once
    and only the rest of each prompt runs against its key/value cache: the same scores, computed once.
    """
    if not letter_token_ids:
        raise ValueError("letter_token_ids is empty: resolve the letters first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_limit("top_other", top_other)
    empty = [index for index, ids in enumerate(prompts) if len(ids) == 0]
    if empty:
        raise ValueError(f"prompt(s) {empty} have no tokens: nothing to score; check the rendered text")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    letter_index = torch.tensor(list(letter_token_ids), dtype=torch.long)
    unique_letter_ids = sorted(set(letter_token_ids))
    shared = None
    if share_prefix and len(prompts) > 1:
        length = common_prefix_length(prompts)
        if length >= _MIN_SHARED_PREFIX:
            shared = _run_prefix(model, prompts[0][:length], pad_id)
    # Sort by length so each batch pads little; results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    results: list[LetterScores | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        if shared is None:
            logits = _last_position_logits(model, [prompts[index] for index in chunk], pad_id).cpu()
        else:
            logits = _suffix_logits(model, shared, [prompts[index][shared.length:] for index in chunk], pad_id).cpu()
        full_probs = torch.softmax(logits, dim=-1)
        letter_logits = logits[:, letter_index]
        letter_probs = torch.softmax(letter_logits, dim=-1)
        letter_mass = full_probs[:, unique_letter_ids].sum(dim=-1)
        others = full_probs.clone()
        others[:, unique_letter_ids] = -1.0
        top_values, top_ids = others.topk(top_other, dim=-1)
        for row, index in enumerate(chunk):
            results[index] = LetterScores(
                letter_logits=tuple(letter_logits[row].tolist()),
                letter_probs=tuple(letter_probs[row].tolist()),
                letter_mass=float(letter_mass[row]),
                top_other=tuple(
                    (tokenizer.convert_ids_to_tokens(int(token_id)), int(token_id), float(value))
                    for token_id, value in zip(top_ids[row].tolist(), top_values[row].tolist())),
                prompt_tokens=len(prompts[index]),
            )
    return [result for result in results if result is not None]


class ScoreCache(LRUCache):
    """Scores keyed by (model, adapter, prompt token IDs, letter IDs), least recently used dropped first."""

    def __init__(self, capacity: int = 4096) -> None:
        super().__init__(maxsize=capacity)

    def put(self, key: tuple[Any, ...], value: LetterScores) -> None:
        self[key] = value
