"""Batched forward passes that read the logits of the last prompt position only."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from cachetools import LRUCache
from transformers.cache_utils import DynamicCache, DynamicLayer

from rerank_core.answer_slot import common_prefix
from rerank_core.compute import on_compute_thread
from rerank_core.heap import reuse_freed_activations
from rerank_core.limits import check_limit
from rerank_core.mixed_precision import each_row_at, mixed_precision
from rerank_core.placement import input_device

__all__ = ["DEFAULT_TOKEN_BUDGET", "LetterScores", "ScoreCache", "common_prefix_length", "score_token_ids"]


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
# ... nor one that is a small part of the prompts. Through a cache the suffixes attend behind an explicit mask, which
# PyTorch's CPU attention runs ~1.7x slower than its plain causal path; on the bf16 fast path they attend to the
# prefix apart (mixed_precision._attention_after_prefix), whose short blocks and join cost more than a short
# prefix saves: 40 MovieLens users sharing only their 54-token chat header took 15.6 s shared, 14.0 s from scratch.
_MIN_SHARED_SHARE = 0.25

# Padded tokens per forward pass by default: long prompts go in small batches, short ones up to batch_size.
# From ~512 tokens a pass keeps the matmuls busy by itself; more rows only add activation memory.
DEFAULT_TOKEN_BUDGET = 4096


def _pad_right(batch: Sequence[Sequence[int]], pad_id: int, bucket: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows padded on the right to a length bucket, and each row's last real position.

    Causal attention never lets a real token see the pads after it, so no padding mask is needed: the model
    takes PyTorch's plain causal attention path, faster than a masked one, and positions count from 0 as alone.
    """
    longest = -(-max(len(ids) for ids in batch) // bucket) * bucket
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return input_ids, torch.tensor([len(ids) - 1 for ids in batch], dtype=torch.long)


@contextmanager
def _head_reads(head: torch.nn.Module, last: torch.Tensor, kept: torch.Tensor) -> Iterator[None]:
    """The head projects each row's own last position only (of the `kept` positions the model hands it)."""
    column = torch.searchsorted(kept, last)

    def pick(module: torch.nn.Module, args: tuple[Any, ...]) -> tuple[Any, ...]:
        hidden = args[0]
        return (hidden[each_row_at(hidden, column)].unsqueeze(1), *args[1:])

    handle = head.register_forward_pre_hook(pick)
    try:
        yield
    finally:
        handle.remove()


def _forward(model: Any, input_ids: torch.Tensor, last: torch.Tensor, position_ids: torch.Tensor | None = None,
             prefix: _SharedPrefix | None = None, *, keep_cache: bool = False) -> Any:
    """One forward pass returning each row's logits at `last` (in fp32 for a bf16 model: see mixed_precision);
    with `prefix`, every row continues it (positions count from its end)."""
    reuse_freed_activations()
    device = input_device(model)  # a model split over devices has no single device: inputs go to the embedding's
    kept = torch.unique(last)  # sorted; the model keeps these positions, the head reads one per row
    if position_ids is None:
        position_ids = torch.arange(input_ids.shape[1]).expand_as(input_ids)
    rows = input_ids.shape[0]
    with (mixed_precision(model, last, None if prefix is None else prefix.layers) as attends_prefix,
          _head_reads(model.get_output_embeddings(), last, kept)):
        # All ones: the model's mask helper then asks SDPA for its causal path. A prefix the fast path does not
        # attend itself goes in a cache, one copy per row, behind a mask that covers it.
        cached = prefix is not None and not attends_prefix
        attention_mask = torch.ones((rows, (prefix.length if cached else 0) + input_ids.shape[1]), dtype=torch.long)
        extra = {} if not cached else {"cache": DynamicCache(ddp_cache_data=[
            (keys.expand(rows, -1, -1, -1), values.expand(rows, -1, -1, -1)) for keys, values in prefix.layers])}
        # `cache` only when there is one: a model with its own code may not know the argument.
        return model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            logits_to_keep=kept.to(device),
            use_cache=keep_cache or cached,
            **extra,
        )


@torch.inference_mode()
def _last_position_logits(model: Any, batch: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    input_ids, last = _pad_right(batch, pad_id, _LENGTH_BUCKET)
    return _forward(model, input_ids, last).logits[:, -1, :].float()


@dataclass(frozen=True)
class _SharedPrefix:
    """A prefix's key/value cache (batch 1, its exact length) and its length."""

    layers: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    length: int


@torch.inference_mode()
def _run_prefix(model: Any, prefix: Sequence[int], pad_id: int) -> _SharedPrefix | None:
    """Run the prefix once; None when the model's cache is not the plain kind this path knows how to copy."""
    # Unpadded: pads in the cache would need a mask on every suffix pass. One shape per prefix length is fine:
    # a prefix runs once per scoring call.
    input_ids = torch.tensor([list(prefix)], dtype=torch.long)
    cache = getattr(_forward(model, input_ids, torch.tensor([len(prefix) - 1]), keep_cache=True), "cache", None)
    # No cache, or sliding-window or quantized layers that keep other state than keys and values: from scratch.
    if cache is None or any(type(layer) is not DynamicLayer for layer in getattr(cache, "layers", [None])):
        return None
    return _SharedPrefix(tuple((layer.keys, layer.values) for layer in cache.layers), len(prefix))


@torch.inference_mode()
def _suffix_logits(model: Any, shared: _SharedPrefix, suffixes: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    """The suffixes, right-padded, run after the prefix."""
    input_ids, last = _pad_right(suffixes, pad_id, _SUFFIX_BUCKET)
    position_ids = shared.length + torch.arange(input_ids.shape[1]).expand_as(input_ids)
    return _forward(model, input_ids, last, position_ids, shared).logits[:, -1, :].float()


def _batches(lengths: Sequence[int], order: Sequence[int], batch_size: int, token_budget: int,
             bucket: int) -> list[list[int]]:
    """Consecutive runs of `order` (shortest first), each at most batch_size rows and token_budget padded
    tokens (a prompt longer than the budget goes alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        padded = -(-lengths[index] // bucket) * bucket  # the longest so far: the order is by length
        if current and (len(current) >= batch_size or (len(current) + 1) * padded > token_budget):
            batches.append(current)
            current = []
        current.append(index)
    if current:
        batches.append(current)
    return batches


def common_prefix_length(prompts: Sequence[Sequence[int]]) -> int:
    """Tokens every prompt starts with, leaving each prompt at least one token of its own."""
    return min(len(common_prefix(prompts)), min(len(ids) for ids in prompts) - 1)


@on_compute_thread
def score_token_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    letter_token_ids: Sequence[int],
    *,
    batch_size: int = 8,
    top_other: int = 5,
    share_prefix: bool = True,
    token_budget: int = DEFAULT_TOKEN_BUDGET,
) -> list[LetterScores]:
    """Score tokenized prompts: letter logits, softmax over letters, letter mass, top other tokens.

    Prompts are sorted by length and batched up to `batch_size` rows and `token_budget` padded tokens a pass.
    With `share_prefix`, a token prefix common to all prompts (system prompt, instruction, history) runs once
    and only the rest of each prompt runs against its key/value cache: the same scores, computed once.
    """
    if not letter_token_ids:
        raise ValueError("letter_token_ids is empty: resolve the letters first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    check_limit("top_other", top_other)
    check_limit("token_budget", token_budget)
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
        if length >= max(_MIN_SHARED_PREFIX, _MIN_SHARED_SHARE * min(len(ids) for ids in prompts)):
            shared = _run_prefix(model, prompts[0][:length], pad_id)
    # Sort by length so each batch pads little; results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    skipped = 0 if shared is None else shared.length
    lengths = [len(ids) - skipped for ids in prompts]
    results: list[LetterScores | None] = [None] * len(prompts)
    for chunk in _batches(lengths, order, batch_size, token_budget,
                          _LENGTH_BUCKET if shared is None else _SUFFIX_BUCKET):
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
