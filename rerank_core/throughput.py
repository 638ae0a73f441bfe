"""How fast this machine multiplies matrices, and how much of that a scoring run got: one yardstick for benches.

A forward pass's speed means little across machines; its share of a plain matrix multiply measured in the same
process, in the dtype the core runs, says how much is left to gain here (the house target is 85%).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["ForwardShape", "MatmulProbe", "forward_shape", "matmul_probe"]

# 2048² is large enough that the multiply runs at the library's peak and short enough (~20 ms in bf16, ~80 ms in
# fp32 on 2 cores) that a probe of a few repeats costs well under a second.
PROBE_SIZE = 2048
PROBE_REPEATS = 5


@dataclass(frozen=True)
class MatmulProbe:
    """A square matmul's median speed in one dtype, with the thread count it ran on."""

    dtype: torch.dtype
    size: int
    threads: int
    gflops: float

    def share(self, gflops: float) -> float:
        """`gflops` as a share of this probe."""
        return gflops / self.gflops

    def describe(self) -> str:
        """One line for a bench's output."""
        return (f"matmul probe: {self.size}² {str(self.dtype).replace('torch.', '')}, {self.threads} threads: "
                f"{self.gflops:.0f} GFLOP/s")


def matmul_probe(dtype: torch.dtype, size: int = PROBE_SIZE, repeats: int = PROBE_REPEATS) -> MatmulProbe:
    """Time `repeats` products of two size×size matrices in `dtype` (after one warm-up); the median speed."""
    if not 64 <= size <= 8192 or not 1 <= repeats <= 100:
        raise ValueError(f"matmul_probe: size must be 64-8192 and repeats 1-100, got {size} and {repeats}")
    generator = torch.Generator().manual_seed(0)
    left = torch.randn(size, size, generator=generator).to(dtype)
    right = torch.randn(size, size, generator=generator).to(dtype)
    torch.mm(left, right)
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        torch.mm(left, right)
        seconds.append(time.perf_counter() - start)
    return MatmulProbe(dtype, size, torch.get_num_threads(), 2 * size**3 / statistics.median(seconds) / 1e9)


@dataclass(frozen=True)
class ForwardShape:
    """What one token costs in a decoder: its linear layers' weights and its attention's width and depth."""

    linear_params: int
    attention_width: int  # heads × head dimension
    layers: int

    def linear_flops(self, tokens: int) -> float:
        """Multiply-adds of the decoder's linear layers over `tokens` tokens (the head, at one position, aside)."""
        return 2.0 * self.linear_params * tokens

    def attention_flops(self, tokens: int, context: int = 0) -> float:
        """Scores and weighted values of causal attention: each of `tokens` new tokens reads `context` cached
        tokens and the new ones up to itself."""
        pairs = tokens * context + tokens * (tokens + 1) / 2
        return 4.0 * self.attention_width * pairs * self.layers

    def flops(self, lengths: Iterable[int]) -> float:
        """A from-scratch forward pass over prompts of these lengths (padding not counted: it is waste)."""
        return sum(self.linear_flops(length) + self.attention_flops(length) for length in lengths)


def forward_shape(model: Any) -> ForwardShape:
    """The decoder's cost per token, from its Linear layers (the output head excluded) and its config."""
    head = model.get_output_embeddings()
    linear_params = sum(module.weight.numel() for module in model.modules()
                        if isinstance(module, torch.nn.Linear) and module is not head)
    config = model.config
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return ForwardShape(linear_params, heads * head_dim, config.num_hidden_layers)
