"""bench_precision's instrument: unrounded it computes what the model computes, and it leaves the model as it was."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from conftest import build_tiny_llama, letter_ids, toy_prompts

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import bench_precision


def test_the_simulation_matches_the_model_unrounded_and_undoes_every_rounding(smol_tokenizer) -> None:
    model = build_tiny_llama(smol_tokenizer)
    assert model.config._attn_implementation == "sdpa"  # the implementation the simulation stands in for
    prompts, letters = toy_prompts(smol_tokenizer, 4), letter_ids(smol_tokenizer)
    own = bench_precision.score(model, smol_tokenizer, prompts, letters)
    weights = {name: parameter.clone() for name, parameter in model.named_parameters()}
    with bench_precision.simulated(model, set()):
        unrounded = bench_precision.score(model, smol_tokenizer, prompts, letters)
    assert bench_precision.gaps(own, unrounded)[2] < 1e-5
    for name in bench_precision.ROUNDINGS:
        with bench_precision.simulated(model, {name}):
            rounded = bench_precision.score(model, smol_tokenizer, prompts, letters)
        assert bench_precision.gaps(unrounded, rounded)[2] > 0, f"{name} rounded nothing"
    assert all(torch.equal(parameter, weights[name]) for name, parameter in model.named_parameters())
    assert bench_precision.score(model, smol_tokenizer, prompts, letters) == own
    with pytest.raises(ValueError, match="unknown rounding"), bench_precision.simulated(model, {"fp8"}):
        pass


def test_roundings_confined_to_some_layers_touch_those_layers_only(smol_tokenizer) -> None:
    model = build_tiny_llama(smol_tokenizer)
    prompts, letters = toy_prompts(smol_tokenizer, 4), letter_ids(smol_tokenizer)
    everything = set(bench_precision.ROUNDINGS)
    with bench_precision.simulated(model, set()):
        unrounded = bench_precision.score(model, smol_tokenizer, prompts, letters)
    with bench_precision.simulated(model, everything, layers=[]):  # no layer: nothing rounds, the embeddings neither
        assert bench_precision.score(model, smol_tokenizer, prompts, letters) == unrounded
    weights = {name: parameter.clone() for name, parameter in model.named_parameters()}
    with bench_precision.simulated(model, everything, layers=[0]):
        changed = [name for name, parameter in model.named_parameters() if not torch.equal(parameter, weights[name])]
        first_layer = bench_precision.score(model, smol_tokenizer, prompts, letters)
    assert changed and all(name.startswith("model.layers.0.") for name in changed), changed
    assert bench_precision.gaps(unrounded, first_layer)[2] > 0
    assert all(torch.equal(parameter, weights[name]) for name, parameter in model.named_parameters())
