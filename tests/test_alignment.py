"""Is the inference rendering a token prefix of the training rendering? On ChatML yes; where training is not, no."""

from __future__ import annotations

import pytest
from conftest import inference_only_system

from rerank_core.alignment import TemplateMismatch, align
from rerank_core.prompts import build_prompt, encode_rendered, get_preset, render_generation_prompt, render_inference


def test_smollm2_chatml_is_a_prefix(smol_tokenizer) -> None:
    text = build_prompt(smol_tokenizer, get_preset("seed"), ["Old Film"], ["Cand One", "Cand Two"]).text
    alignment = align(smol_tokenizer, get_preset("seed"), text, "B")
    assert alignment.is_prefix and alignment.diverge_at is None
    assert alignment.prompt_ids == tuple(encode_rendered(
        smol_tokenizer, get_preset("seed"), render_inference(smol_tokenizer, get_preset("seed"), text)))
    assert alignment.full_ids[:len(alignment.prompt_ids)] == alignment.prompt_ids
    # After the prompt: the letter, end of turn, newline.
    assert smol_tokenizer.convert_ids_to_tokens(list(alignment.completion_ids)) == ["B", "<|im_end|>", "Ċ"]
    assert "is a token prefix" in alignment.describe(smol_tokenizer)


def test_llamarec_text_preset_completion_is_letter_then_eos(smol_tokenizer) -> None:
    text = build_prompt(smol_tokenizer, get_preset("llamarec"), ["t1"], ["c1", "c2"]).text
    alignment = align(smol_tokenizer, get_preset("llamarec"), text, "A")
    assert alignment.is_prefix
    assert alignment.completion_ids == (smol_tokenizer.convert_tokens_to_ids("A"), smol_tokenizer.eos_token_id)


def test_inference_only_system_turn_is_not_a_prefix(smol_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(smol_tokenizer, "chat_template", inference_only_system(smol_tokenizer.chat_template))
    text = build_prompt(smol_tokenizer, get_preset("seed"), ["Old Film"], ["Cand One", "Cand Two"]).text
    alignment = align(smol_tokenizer, get_preset("seed"), text, "A")
    assert not alignment.is_prefix
    # They part right after `<|im_start|>system\n`: the inference-only "Answer" against SmolLM's system line.
    position = alignment.diverge_at
    assert smol_tokenizer.convert_ids_to_tokens(alignment.prompt_ids[position - 2:position]) == ["system", "Ċ"]
    assert alignment.prompt_ids[:position] == alignment.full_ids[:position]
    assert smol_tokenizer.convert_ids_to_tokens(alignment.prompt_ids[position]) == "Answer"
    assert smol_tokenizer.convert_ids_to_tokens(alignment.full_ids[position]) == "You"
    with pytest.raises(TemplateMismatch):
        _ = alignment.completion_ids

    message = alignment.describe(smol_tokenizer)
    assert f"differ at token {position}" in message
    inference_line = next(line for line in message.splitlines() if line.strip().startswith("inference:"))
    training_line = next(line for line in message.splitlines() if line.strip().startswith("training:"))
    assert "'Answer'" in inference_line and "'Answer'" not in training_line
    assert "'You'" in training_line
    assert "'system'" in inference_line and "'system'" in training_line
    assert "Fix the chat template" in message


def test_thinking_generation_prompt_is_trimmed_to_where_training_puts_the_letter(
        smol_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation prompt that opens `<think>` the finished turn never has (DeepSeek-R1): scored before it."""
    plain_text = build_prompt(smol_tokenizer, get_preset("seed"), ["Old Film"], ["Cand One", "Cand Two"]).text
    plain = align(smol_tokenizer, get_preset("seed"), plain_text, "A")
    thinking = smol_tokenizer.chat_template.replace(
        "{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant\n<think>\n' }}")
    assert thinking != smol_tokenizer.chat_template
    monkeypatch.setattr(smol_tokenizer, "chat_template", thinking)
    assert render_generation_prompt(smol_tokenizer, get_preset("seed"), plain_text).endswith("assistant\n<think>\n")
    alignment = align(smol_tokenizer, get_preset("seed"), plain_text, "A")
    assert alignment.is_prefix and alignment.prompt_ids == plain.prompt_ids
    assert smol_tokenizer.convert_ids_to_tokens(list(alignment.completion_ids)) == ["A", "<|im_end|>", "Ċ"]


def test_template_that_drops_the_answer_has_nothing_to_train(smol_tokenizer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A template that renders only user turns: the training conversation equals the prompt.
    template = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}")
    monkeypatch.setattr(smol_tokenizer, "chat_template", template)
    alignment = align(smol_tokenizer, get_preset("seed"), "hello", "A")
    assert alignment.diverge_at == len(alignment.prompt_ids)
    assert not alignment.is_prefix
    message = alignment.describe(smol_tokenizer)
    training_line = next(line for line in message.splitlines() if line.strip().startswith("training:"))
    assert training_line.endswith("'<|im_end|>'(2) 'Ċ'(198) (end)")
