"""The fast training forward pass computes the same loss and gradients as peft's own, and undoes itself."""

from __future__ import annotations

import pytest
import torch
from conftest import build_tiny_llama, make_toy_dataset, tiny_config

from rerank_core.training.forward import training_forward
from rerank_core.training.samples import build_training_samples, label_samples
from rerank_core.training.trainer import _answer_loss, _LeftPadCollator


def lora_model(tokenizer, dtype: torch.dtype):
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama(tokenizer, hidden=64).to(dtype)
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
                                             target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    torch.manual_seed(1)
    with torch.no_grad():  # B starts at zero: give it values, so the LoRA path changes the output
        for name, parameter in model.named_parameters():
            if ".lora_B." in name:
                parameter.normal_(std=0.05)
    return model.train()


def loss_and_gradients(model, batch, labels):
    model.zero_grad()
    loss, _, _ = _answer_loss(model, dict(batch), labels)
    loss.backward()
    gradients = {name: parameter.grad.detach().clone() for name, parameter in model.named_parameters()
                 if parameter.requires_grad}
    return loss.item(), gradients


@pytest.fixture
def batch(smol_tokenizer):
    samples, _ = build_training_samples(make_toy_dataset(), smol_tokenizer, tiny_config(max_samples=4))
    examples, _ = label_samples(smol_tokenizer, samples, tiny_config())
    batch = _LeftPadCollator(0)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    return batch, batch.pop("labels")


def test_bf16_model_trains_fp32_lora_weights_with_the_same_loss_and_gradients(smol_tokenizer, batch):
    inputs, labels = batch
    model = lora_model(smol_tokenizer, torch.bfloat16)
    plain_loss, plain_gradients = loss_and_gradients(model, inputs, labels)
    with training_forward(model, inputs["input_ids"]):
        assert model.config._attn_implementation == "eager"  # a small batch: its attention fits in memory
        fast_loss, fast_gradients = loss_and_gradients(model, inputs, labels)
    assert model.config._attn_implementation == "sdpa"  # validation scores as the Inspector does
    assert fast_loss == pytest.approx(plain_loss, rel=2e-2)
    assert all(model.get_parameter(name).dtype == torch.float32 for name in fast_gradients)  # for AdamW
    for name, plain in plain_gradients.items():
        fast = fast_gradients[name]
        assert fast.dtype == torch.float32
        cosine = torch.nn.functional.cosine_similarity(fast.flatten(), plain.flatten(), dim=0)
        assert cosine > 0.98, name
    # Outside the block peft casts LoRA inputs again: a forward without autocast still runs.
    loss_and_gradients(model, inputs, labels)


def test_fp32_model_gets_the_same_loss_to_rounding(smol_tokenizer, batch):
    inputs, labels = batch
    model = lora_model(smol_tokenizer, torch.float32)
    plain_loss, plain_gradients = loss_and_gradients(model, inputs, labels)
    with training_forward(model, inputs["input_ids"]):
        fast_loss, fast_gradients = loss_and_gradients(model, inputs, labels)
    assert fast_loss == pytest.approx(plain_loss, rel=1e-5)
    for name, plain in plain_gradients.items():
        torch.testing.assert_close(fast_gradients[name], plain, rtol=1e-4, atol=1e-6)


def test_long_batches_keep_sdpa_whose_attention_needs_no_stored_probabilities(smol_tokenizer):
    model = lora_model(smol_tokenizer, torch.bfloat16)
    # 2 layers x 4 heads x 6000^2 scores x 10 bytes: 2.9 GB of attention probabilities, over the 1.5 GiB bound.
    with training_forward(model, torch.zeros((1, 6000), dtype=torch.long)):
        assert model.config._attn_implementation == "sdpa"
    with training_forward(model, torch.zeros((1, 2000), dtype=torch.long)):  # 0.32 GB
        assert model.config._attn_implementation == "eager"
    assert model.config._attn_implementation == "sdpa"
