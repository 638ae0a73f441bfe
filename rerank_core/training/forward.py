"""A training step's forward pass: bf16 LoRA under autocast, and eager attention on CPU where memory allows."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

import torch

__all__ = ["training_forward"]

# Eager attention keeps every layer's attention probabilities for the backward pass: about 10 bytes per
# score (batch x heads x length^2 x layers), measured as peak RSS 2.7 -> 3.8 GB on quick-preset batches of
# 4 x 336 tokens. Above this many bytes the step keeps sdpa (MovieLens' 4 x 492 tokens would need 2.4 GiB).
_EAGER_ATTENTION_BYTES = 1.5 * 2**30
_BYTES_PER_SCORE = 10


@contextmanager
def training_forward(model: Any, input_ids: torch.Tensor) -> Iterator[None]:
    """Wrap the forward pass of one training step (not validation, which scores as the Inspector does).

    peft casts each LoRA input to the adapter's fp32 weights and the sum back to bf16: copies of the widest
    activations per projection, forward and backward. Under autocast the small LoRA weights are cast instead,
    and they stay fp32 for the optimizer: a quick-preset CPU step is about a tenth faster (README, Benchmarks).
    fp16 would need a gradient scaler: left as peft runs it.
    """
    # Under torchrun the Trainer hands over the DistributedDataParallel wrapper: its module is the PeftModel.
    inner = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    base = inner.get_base_model() if hasattr(inner, "get_base_model") else inner
    weight = next(base.parameters())
    with ExitStack() as stack:
        if weight.dtype == torch.bfloat16:
            from peft.helpers import disable_input_dtype_casting  # peft takes seconds to import

            stack.enter_context(torch.autocast(weight.device.type, dtype=weight.dtype))
            stack.enter_context(disable_input_dtype_casting(inner))
        if weight.device.type == "cpu" and _eager_fits(getattr(base, "config", None), input_ids):
            # PyTorch's CPU flash-attention backward is slow at these lengths: eager attention makes a
            # quick-preset step about a tenth faster (README, Benchmarks).
            stack.enter_context(_attention(base, "eager"))
        yield


def _eager_fits(config: Any, input_ids: torch.Tensor) -> bool:
    heads, layers = getattr(config, "num_attention_heads", None), getattr(config, "num_hidden_layers", None)
    if getattr(config, "_attn_implementation", None) != "sdpa" or not heads or not layers:
        return False
    rows, length = input_ids.shape
    scores = rows * heads * length * length * layers
    return scores * _BYTES_PER_SCORE <= _EAGER_ATTENTION_BYTES


@contextmanager
def _attention(model: Any, implementation: str) -> Iterator[None]:
    """The model attends with `implementation` inside the block (about 1 ms to switch each way)."""
    if not getattr(model, "_can_set_attn_implementation", lambda: False)():
        yield
        return
    previous = model.config._attn_implementation
    model.set_attn_implementation(implementation)
    try:
        yield
    finally:
        model.set_attn_implementation(previous)
