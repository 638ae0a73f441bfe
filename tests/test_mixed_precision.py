"""bf16 forward passes with prepacked and fused matmuls: close to fp32, adapters kept, nothing left behind."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama, letter_ids, probabilities, toy_prompts

from rerank_core.mixed_precision import mixed_precision
from rerank_core.scoring import score_token_ids

needs_bf16_onednn = pytest.mark.skipif(
    not (torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    reason="this CPU has no bf16 oneDNN: the prepacked path is not taken")


def calls_of(modules: list[torch.nn.Module]) -> list[int]:
    """How many times each module is entered (forward hooks fire around a replaced forward too)."""
    counts = [0] * len(modules)
    for index, module in enumerate(modules):
        module.register_forward_hook(lambda *_, index=index: counts.__setitem__(index, counts[index] + 1))
    return counts


@needs_bf16_onednn
def test_llama_mlp_runs_fused_and_every_replacement_is_undone(smol_tokenizer) -> None:
    model = build_tiny_llama(smol_tokenizer, seed=7).to(torch.bfloat16)
    mlp = model.model.layers[0].mlp
    counts = calls_of([mlp, mlp.gate_proj, mlp.down_proj, model.model.layers[0].self_attn.q_proj])
    ids = torch.tensor([toy_prompts(smol_tokenizer, count=3)[2]])
    with torch.inference_mode(), mixed_precision(model):
        logits = model(input_ids=ids, logits_to_keep=1).logits
    # The MLP ran once as one fused block (its projections were not entered); attention's projections were.
    assert counts == [1, 0, 0, 1]
    assert logits.dtype == torch.float32  # the fp32 head
    assert not [name for name, module in model.named_modules() if "forward" in vars(module)]
    with torch.inference_mode():
        plain = model(input_ids=ids, logits_to_keep=1).logits
    assert plain.dtype == torch.bfloat16 and counts == [2, 1, 1, 2]


@needs_bf16_onednn
def test_prepacked_bf16_scores_stay_close_to_fp32(smol_tokenizer) -> None:
    prompts = toy_prompts(smol_tokenizer, count=6)
    exact = score_token_ids(build_tiny_llama(smol_tokenizer, seed=8), smol_tokenizer, prompts,
                            letter_ids(smol_tokenizer))
    fast = score_token_ids(build_tiny_llama(smol_tokenizer, seed=8).to(torch.bfloat16), smol_tokenizer, prompts,
                           letter_ids(smol_tokenizer))
    assert float((probabilities(fast) - probabilities(exact)).abs().max()) < 0.01


@needs_bf16_onednn
def test_lora_projections_keep_their_adapters_under_the_prepacked_path(smol_tokenizer) -> None:
    from peft import LoraConfig, get_peft_model

    def with_adapter(dtype: torch.dtype):
        torch.manual_seed(9)  # the same adapter weights for both precisions
        return get_peft_model(build_tiny_llama(smol_tokenizer, seed=9).to(dtype),
                              LoraConfig(r=4, target_modules=["q_proj", "v_proj", "up_proj"],
                                         init_lora_weights=False)).eval()

    prompts = toy_prompts(smol_tokenizer, count=4)
    ids = letter_ids(smol_tokenizer)
    fast_model = with_adapter(torch.bfloat16)
    counts = calls_of([fast_model.base_model.model.model.layers[0].mlp.gate_proj])
    fast = score_token_ids(fast_model, smol_tokenizer, prompts, ids)
    assert counts[0] > 0  # up_proj carries an adapter: that MLP is not fused, its projections run one by one
    exact = score_token_ids(with_adapter(torch.float32), smol_tokenizer, prompts, ids)
    assert float((probabilities(fast) - probabilities(exact)).abs().max()) < 0.01
    with fast_model.disable_adapter():
        base = score_token_ids(fast_model, smol_tokenizer, prompts, ids)
    assert float((probabilities(base) - probabilities(fast)).abs().max()) > 1e-3  # the adapter was applied


@needs_bf16_onednn
def test_attention_runs_in_fp32_unless_a_projection_carries_an_adapter(smol_tokenizer, monkeypatch) -> None:
    """fp32 queries, keys and values bring bf16 scores closer to fp32 (the 135M model: 0.0142 -> 0.0080)."""
    from peft import LoraConfig, get_peft_model

    real = torch.nn.functional.scaled_dot_product_attention
    dtypes: list[tuple[torch.dtype, ...]] = []

    def spy(query, key, value, *args, **kwargs):
        dtypes.append((query.dtype, key.dtype, value.dtype))
        return real(query, key, value, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    prompts = toy_prompts(smol_tokenizer, count=3)
    model = build_tiny_llama(smol_tokenizer, seed=10).to(torch.bfloat16)
    score_token_ids(model, smol_tokenizer, prompts, letter_ids(smol_tokenizer))
    assert dtypes and set(dtypes) == {(torch.float32,) * 3}
    assert not [name for name, module in model.named_modules() if "forward" in vars(module)]
    dtypes.clear()
    wrapped = get_peft_model(build_tiny_llama(smol_tokenizer, seed=10).to(torch.bfloat16),
                             LoraConfig(r=4, target_modules=["v_proj"], init_lora_weights=False)).eval()
    score_token_ids(wrapped, smol_tokenizer, prompts, letter_ids(smol_tokenizer))
    assert dtypes and set(dtypes) == {(torch.bfloat16,) * 3}


@needs_bf16_onednn
def test_rotary_angles_are_fp32_where_attention_is(smol_tokenizer) -> None:
    """cos/sin cast to bf16 rotate fp32 queries by rounded angles (the 135M model: Δp 0.0123 -> 0.0081)."""
    model = build_tiny_llama(smol_tokenizer, seed=11).to(torch.bfloat16)
    seen: list[torch.dtype] = []
    model.model.rotary_emb.register_forward_hook(lambda module, args, output: seen.append(output[0].dtype))
    ids = torch.tensor([toy_prompts(smol_tokenizer, count=3)[1]])
    with torch.inference_mode(), mixed_precision(model):
        model(input_ids=ids, logits_to_keep=1)
    with torch.inference_mode():
        model(input_ids=ids, logits_to_keep=1)
    assert seen == [torch.float32, torch.bfloat16]  # fp32 inside the block, the model's own dtype after it
