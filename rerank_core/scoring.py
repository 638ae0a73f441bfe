"""Batched forward passes that read the logits of the last prompt position only."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from cachetools import LRUCache

__all__ = ["LetterScores", "ScoreCache", "score_token_ids"]


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


def _pad_left(batch: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    longest = -(-max(len(ids) for ids in batch) // _LENGTH_BUCKET) * _LENGTH_BUCKET
    input_ids = torch.full((len(batch), longest), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), longest), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, longest - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, longest - len(ids):] = 1
    return input_ids, attention_mask


def _fp32_head_weight(head: torch.nn.Module) -> torch.Tensor:
    """An fp32 copy of the output projection, kept on the module and refreshed if the weight changes."""
    cached = getattr(head, "_rerank_fp32_weight", None)
    version = (head.weight.data_ptr(), head.weight._version)
    if cached is None or cached[0] != version:
        cached = (version, head.weight.detach().float())
        head._rerank_fp32_weight = cached
    return cached[1]


@torch.inference_mode()
def _last_position_logits(model: Any, batch: Sequence[Sequence[int]], pad_id: int) -> torch.Tensor:
    device = next(model.parameters()).device
    input_ids, attention_mask = _pad_left(batch, pad_id)
    # Left padding shifts positions; give each row positions counted from its first real token,
    # so a padded prompt sees exactly the positions it would see alone.
    position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)
    head = model.get_output_embeddings()
    handle = None
    # Only a plain Linear: a LoRA-wrapped or quantized head computes more than weight @ x.
    if type(head) is torch.nn.Linear and head.weight.dtype != torch.float32:
        # bf16 logits are off by ~0.1 at magnitudes ~20, enough to move letter probabilities by 0.03;
        # the last position's projection in fp32 costs one matrix-vector product and halves that.
        weight = _fp32_head_weight(head)
        bias = None if head.bias is None else head.bias.float()
        handle = head.register_forward_hook(
            lambda module, inputs, output: torch.nn.functional.linear(inputs[0].float(), weight, bias))
    try:
        output = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            logits_to_keep=1,
            use_cache=False,
        )
    finally:
        if handle is not None:
            handle.remove()
    return output.logits[:, -1, :].float()


def score_token_ids(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[Sequence[int]],
    letter_token_ids: Sequence[int],
    *,
    batch_size: int = 8,
    top_other: int = 5,
) -> list[LetterScores]:
    """Score tokenized prompts: letter logits, softmax over letters, letter mass, top other tokens."""
    if not letter_token_ids:
        raise ValueError("letter_token_ids is empty: resolve the letters first")
    if batch_size < 1:
        raise ValueError(f"batch_size must be at least 1, got {batch_size}")
    empty = [index for index, ids in enumerate(prompts) if len(ids) == 0]
    if empty:
        raise ValueError(f"prompt(s) {empty} have no tokens: nothing to score; check the rendered text")
    pad_id = tokenizer.pad_token_id
    if pad_id is None:
        pad_id = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    letter_index = torch.tensor(list(letter_token_ids), dtype=torch.long)
    unique_letter_ids = sorted(set(letter_token_ids))
    # Sort by length so each batch pads little; results go back in the caller's order.
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    results: list[LetterScores | None] = [None] * len(prompts)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        logits = _last_position_logits(model, [prompts[index] for index in chunk], pad_id).cpu()
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
