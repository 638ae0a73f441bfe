"""The answer letter's own token on every chat template family researchers use (see template_gallery.py)."""

from __future__ import annotations

import pytest
from conftest import make_toy_dataset, tiny_loaded
from template_gallery import FAMILIES, Family, build_tokenizer

from rerank_core.candidates import CandidateConfig
from rerank_core.diagnostics import template_consistency
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.labels import IGNORE_INDEX, label_example
from rerank_core.prompts import PromptPreset, build_prompt, get_preset, letters_for, with_template_kwargs
from rerank_core.verbalizer import resolve_letters

BY_NAME = {family.name: family for family in FAMILIES}
LETTERS = letters_for(26)
# Where a strategy's token is not the one training teaches (SentencePiece: a word-start letter or not).
EXPECTED_DIFFERS = {"Llama-2 chat": {"seed"}, "Mistral instruct v0.3": {"seed"}, "Phi-3": {"encode"}}
# The flags that say how the scored prompt was moved to the letter.
SLOT_FLAGS = {"inserted_before_answer", "generation_prompt_trimmed", "prompt_end_retokenized"}
EXPECTED_SLOT = {"Qwen3 (thinking)": ("inserted_before_answer", "<think>\n\n</think>\n\n"),
                 "DeepSeek-R1 distill": ("generation_prompt_trimmed", "<think>\n")}


@pytest.fixture(params=FAMILIES, ids=[family.name for family in FAMILIES])
def family(request) -> tuple[Family, object]:
    family = request.param
    llama2 = request.getfixturevalue("llama2_tokenizer") if family.vocabulary == "llama2" else None
    return family, build_tokenizer(family, request.getfixturevalue("smol_tokenizer"), llama2)


def _preset(family: Family) -> PromptPreset:
    return with_template_kwargs(get_preset("seed"), family.template_kwargs)


def _text(tokenizer, preset, count: int = 26) -> str:
    dataset = make_toy_dataset()
    items = sorted(dataset.items)
    return build_prompt(tokenizer, preset, [dataset.text(item) for item in items[:4]],
                        [dataset.text(item) for item in items[10:10 + count]]).text


def test_as_trained_token_is_the_letters_own_token(family) -> None:
    family, tokenizer = family
    rows = {row.letter: row for row in resolve_letters(tokenizer, _preset(family), LETTERS, "as_trained")}
    for letter in "ABZ":
        assert tokenizer.decode([rows[letter].token_id]).strip() == letter, (family.name, rows[letter])
    assert len({row.token_id for row in rows.values()}) == 26
    assert not any("shared_id" in row.flags or "template_not_prefix" in row.flags for row in rows.values())


def test_seed_and_encode_are_flagged_exactly_where_they_differ(family) -> None:
    family, tokenizer = family
    preset = _preset(family)
    trained = {row.letter: row.token_id for row in resolve_letters(tokenizer, preset, LETTERS, "as_trained")}
    differing = set()
    for strategy in ("seed", "encode"):
        for row in resolve_letters(tokenizer, preset, LETTERS, strategy):
            assert row.as_trained_id == trained[row.letter]
            assert ("differs_from_as_trained" in row.flags) == (row.token_id != trained[row.letter])
            if row.token_id != trained[row.letter]:
                differing.add(strategy)
    assert differing == EXPECTED_DIFFERS.get(family.name, set())


def test_training_label_carries_loss_first_on_the_letter(family) -> None:
    family, tokenizer = family
    preset = _preset(family)
    text = _text(tokenizer, preset)
    trained = {row.letter: row.token_id for row in resolve_letters(tokenizer, preset, LETTERS, "as_trained", text=text)}
    slot_span = EXPECTED_SLOT.get(family.name)
    for letter in "ABZ":
        example = label_example(tokenizer, preset, text, letter)
        first = example.loss_positions[0]
        assert first == example.prompt_length
        assert example.input_ids[first] == trained[letter]
        assert all(label == IGNORE_INDEX for label in example.labels[:first])
        trained_text = tokenizer.decode([example.input_ids[i] for i in example.loss_positions])
        assert "think" not in trained_text  # never loss on a think block
        if slot_span and slot_span[0] == "inserted_before_answer":
            # The inserted span is part of the prompt, right before the letter, carrying no loss.
            before = tokenizer.decode(list(example.input_ids[:first]))
            assert before.endswith("<|im_start|>assistant\n" + slot_span[1])


def test_template_diagnostic_explains_inserted_spans(family) -> None:
    family, tokenizer = family
    report = template_consistency(tokenizer, _preset(family))
    assert report.ok and report.is_prefix, report.explanation
    assert tokenizer.decode([report.answer_token[1]]).strip() == "A"
    kinds = [problem.kind for problem in report.problems]
    assert "answer_not_letter" not in kinds
    expected = EXPECTED_SLOT.get(family.name)
    assert [kind for kind in kinds if kind in SLOT_FLAGS] == ([expected[0]] if expected else [])
    if expected:
        message = next(problem.message for problem in report.problems if problem.kind == expected[0])
        assert repr(expected[1]) in message
        assert report.generation_prompt is not None


def test_qwen3_scoring_reads_distinct_letter_logits(smol_tokenizer) -> None:
    """The bug report: every letter resolved to '<' of the think block, so all candidates tied."""
    tokenizer = build_tokenizer(BY_NAME["Qwen3 (thinking)"], smol_tokenizer, None)
    inspector = Inspector(make_toy_dataset(), tiny_loaded(tokenizer))
    settings = InspectSettings(preset=get_preset("seed"), candidates=CandidateConfig(count=5))
    result = inspector.inspect(inspector.dataset.users[0], settings)
    ids = [token.token_id for token in result.prepared.letter_tokens]
    assert [tokenizer.decode([token_id]) for token_id in ids] == list("ABCDE")
    assert len(set(result.scores.letter_probs)) == 5
    # The scored prompt ends with the empty think block, in the training conversation's own tokens.
    slot = result.prepared.answer_slot
    assert result.prepared.token_ids[-len(slot.inserted_ids):] == slot.inserted_ids
    assert result.prepared.prompt.rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
    payload = result.to_json(inspector.dataset)
    assert payload["answer_slot"]["flags"] == ["inserted_before_answer"]


def test_qwen3_enable_thinking_false_moves_the_block_into_the_generation_prompt(smol_tokenizer) -> None:
    family = BY_NAME["Qwen3, enable_thinking=false"]
    tokenizer = build_tokenizer(family, smol_tokenizer, None)
    report = template_consistency(tokenizer, _preset(family))
    assert report.generation_prompt == "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert not [problem for problem in report.problems if problem.kind in SLOT_FLAGS]


def test_deepseek_r1_scores_where_finished_turns_put_the_letter(smol_tokenizer) -> None:
    tokenizer = build_tokenizer(BY_NAME["DeepSeek-R1 distill"], smol_tokenizer, None)
    inspector = Inspector(make_toy_dataset(), tokenizer=tokenizer)
    prepared = inspector.prepare(inspector.dataset.users[0], InspectSettings(preset=get_preset("seed")))
    assert prepared.prompt.rendered.endswith("<｜Assistant｜>")
    assert prepared.answer_slot.trimmed_text == "<think>\n"
    assert "generation_prompt_trimmed" in prepared.letter_tokens[0].flags


def test_prompt_end_split_differently_before_the_letter_uses_training_tokens(smol_tokenizer) -> None:
    """Llama-3's template on GPT-2's pre-tokenizer: '\\n\\n' alone is one token, before a letter two."""
    from dataclasses import replace

    family = replace(BY_NAME["Llama-3.1 instruct"], pattern=None)
    tokenizer = build_tokenizer(family, smol_tokenizer, None)
    inspector = Inspector(make_toy_dataset(), tokenizer=tokenizer)
    prepared = inspector.prepare(inspector.dataset.users[0], InspectSettings(preset=get_preset("seed")))
    newline = tokenizer.convert_tokens_to_ids("Ċ")
    assert prepared.answer_slot.flags == ("prompt_end_retokenized",)
    assert prepared.token_ids[-2:] == (newline, newline)
    assert tokenizer.decode([prepared.letter_tokens[0].token_id]) == "A"
    example = label_example(tokenizer, get_preset("seed"), prepared.prompt.text, "A")
    assert example.input_ids[:example.prompt_length] == prepared.token_ids
