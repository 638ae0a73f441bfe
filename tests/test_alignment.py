"""Is the inference rendering a token prefix of the training rendering? On ChatML yes; on a thinking template no."""

from __future__ import annotations

import pytest

from rerank_core.alignment import TemplateMismatch, align
from rerank_core.prompts import build_prompt, encode_rendered, render_inference


def test_smollm2_chatml_is_a_prefix(smol_tokenizer) -> None:
    text = build_prompt(smol_tokenizer, "seed", ["Old Film"], ["Cand One", "Cand Two"]).text
    alignment = align(smol_tokenizer, "seed", text, "B")
    assert alignment.is_prefix and alignment.diverge_at is None
    assert alignment.prompt_ids == tuple(encode_rendered(
        smol_tokenizer, "seed", render_inference(smol_tokenizer, "seed", text)))
    assert alignment.full_ids[:len(alignment.prompt_ids)] == alignment.prompt_ids
    # After the prompt: the letter, end of turn, newline.
    assert smol_tokenizer.convert_ids_to_tokens(list(alignment.completion_ids)) == ["B", "<|im_end|>", "Ċ"]
    assert "is a token prefix" in alignment.describe(smol_tokenizer)


def test_llamarec_text_preset_completion_is_letter_then_eos(smol_tokenizer) -> None:
    text = build_prompt(smol_tokenizer, "llamarec", ["t1"], ["c1", "c2"]).text
    alignment = align(smol_tokenizer, "llamarec", text, "A")
    assert alignment.is_prefix
    assert alignment.completion_ids == (smol_tokenizer.convert_tokens_to_ids("A"), smol_tokenizer.eos_token_id)


def test_thinking_generation_prompt_is_not_a_prefix(smol_tokenizer, monkeypatch: pytest.MonkeyPatch) -> None:
    broken = smol_tokenizer.chat_template.replace(
        "{{ '<|im_start|>assistant\n' }}", "{{ '<|im_start|>assistant\n<think>\n' }}")
    assert broken != smol_tokenizer.chat_template
    monkeypatch.setattr(smol_tokenizer, "chat_template", broken)
    text = build_prompt(smol_tokenizer, "seed", ["Old Film"], ["Cand One", "Cand Two"]).text
    alignment = align(smol_tokenizer, "seed", text, "A")
    assert not alignment.is_prefix
    # They part right after `<|im_start|>assistant\n`: `<` of `<think>` against the letter.
    position = alignment.diverge_at
    assert smol_tokenizer.convert_ids_to_tokens(alignment.prompt_ids[position - 3:position]) == [
        "ass", "istant", "Ċ"]
    assert alignment.prompt_ids[:position] == alignment.full_ids[:position]
    assert smol_tokenizer.convert_ids_to_tokens(alignment.full_ids[position]) == "A"
    assert smol_tokenizer.convert_ids_to_tokens(alignment.prompt_ids[position]) == "<"
    with pytest.raises(TemplateMismatch):
        _ = alignment.completion_ids

    message = alignment.describe(smol_tokenizer)
    assert f"differ at token {position}" in message
    inference_line = next(line for line in message.splitlines() if line.strip().startswith("inference:"))
    training_line = next(line for line in message.splitlines() if line.strip().startswith("training:"))
    assert "'think'" in inference_line and "'think'" not in training_line
    assert f"'A'({smol_tokenizer.convert_tokens_to_ids('A')})" in training_line
    assert "'istant'" in inference_line and "'istant'" in training_line
    assert "Fix the chat template" in message


def test_template_that_drops_the_answer_has_nothing_to_train(smol_tokenizer,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    # A template that renders only user turns: the training conversation equals the prompt.
    template = ("{% for message in messages %}{% if message['role'] == 'user' %}"
                "{{ '<|im_start|>user\n' + message['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}")
    monkeypatch.setattr(smol_tokenizer, "chat_template", template)
    alignment = align(smol_tokenizer, "seed", "hello", "A")
    assert alignment.diverge_at == len(alignment.prompt_ids)
    assert not alignment.is_prefix
    message = alignment.describe(smol_tokenizer)
    training_line = next(line for line in message.splitlines() if line.strip().startswith("training:"))
    assert training_line.endswith("'<|im_end|>'(2) 'Ċ'(198) (end)")
