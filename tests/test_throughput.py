"""The matmul probe and the FLOP count that bench scripts divide by: right counts, bounded inputs."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama

from rerank_core.throughput import ForwardShape, forward_shape, matmul_probe


def test_forward_shape_counts_the_decoder_linears_without_the_head(smol_tokenizer) -> None:
    model = build_tiny_llama(smol_tokenizer, layers=2, hidden=32)
    shape = forward_shape(model)
    # per layer: q 32x32, k and v 32x16 (2 of 4 heads of 8), o 32x32, gate/up/down 32x64
    assert shape == ForwardShape(linear_params=2 * (32 * 32 * 2 + 32 * 16 * 2 + 32 * 64 * 3), attention_width=32,
                                 layers=2)


def test_attention_flops_count_causal_pairs_and_cached_context() -> None:
    shape = ForwardShape(linear_params=10, attention_width=4, layers=3)
    assert shape.attention_flops(2) == 4.0 * 4 * 3 * 3  # pairs (0,0), (1,0), (1,1)
    assert shape.attention_flops(2, context=5) == 4.0 * 4 * 3 * (10 + 3)
    assert shape.flops([2, 1]) == shape.linear_flops(3) + shape.attention_flops(2) + shape.attention_flops(1)


def test_matmul_probe_reports_its_dtype_and_refuses_unbounded_sizes() -> None:
    probe = matmul_probe(torch.float32, size=64, repeats=1)
    assert probe.dtype == torch.float32 and probe.size == 64 and probe.gflops > 0
    assert probe.share(probe.gflops / 2) == pytest.approx(0.5)
    for size, repeats in ((32, 1), (9000, 1), (64, 0)):
        with pytest.raises(ValueError, match="matmul_probe"):
            matmul_probe(torch.float32, size=size, repeats=repeats)
