"""Chat-template options (template_kwargs): validation, ignored and failing options, training and the CLI."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from conftest import make_toy_dataset, tiny_loaded
from template_gallery import FAMILIES, QWEN3, build_tokenizer

from rerank_core.adapters import MANIFEST_FILE
from rerank_core.diagnostics import template_consistency
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.prompts import (
    PromptError,
    answer_slot,
    get_preset,
    letters_for,
    parse_template_kwargs,
    render_inference,
    with_template_kwargs,
)
from rerank_core.training.config import TRAINING_PRESETS, TrainConfig
from rerank_core.training.run import train_adapter
from rerank_core.training.samples import build_training_samples, label_samples
from rerank_core.verbalizer import resolve_letters

BY_NAME = {family.name: family for family in FAMILIES}
NO_THINKING = '{"enable_thinking":false}'


@pytest.fixture(scope="module")
def qwen3(smol_tokenizer):
    return build_tokenizer(BY_NAME["Qwen3 (thinking)"], smol_tokenizer, None)


@pytest.mark.parametrize("given, message", [
    ("{enable_thinking: false}", "template_kwargs is not valid JSON"),
    ("[1, 2]", "template_kwargs must be a JSON object"),
    ('"enable_thinking"', "template_kwargs must be a JSON object"),
    ("7", "template_kwargs must be a JSON object"),
    ('{"add_generation_prompt": false}', "template_kwargs may not set add_generation_prompt"),
    ('{"system": "' + "x" * 2_000 + '"}', "template_kwargs length must be from 0 to 2000"),
])
def test_bad_template_kwargs_are_refused_naming_the_option(given: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):  # PromptError, or LimitError for the length
        parse_template_kwargs(given)
    with pytest.raises(ValueError, match="template_kwargs"):
        InspectSettings(template_kwargs=given)
    with pytest.raises(ValueError, match="template_kwargs"):
        replace(TRAINING_PRESETS["quick"], template_kwargs=given)


def test_template_kwargs_are_kept_as_canonical_json() -> None:
    assert parse_template_kwargs('{ "b": 1, "a": [true, null] }') == '{"a":[true,null],"b":1}'
    assert parse_template_kwargs({"enable_thinking": False}) == NO_THINKING
    assert parse_template_kwargs("  ") == parse_template_kwargs(None) == parse_template_kwargs("{}") == ""
    assert InspectSettings(template_kwargs='{"enable_thinking": false}').template_kwargs == NO_THINKING
    assert TrainConfig(template_kwargs={"enable_thinking": False}).template_kwargs == NO_THINKING


def test_template_that_raises_names_the_option_and_its_message(smol_tokenizer) -> None:
    strict = QWEN3.replace("{% if add_generation_prompt %}", (
        "{% if thinking_budget is defined and thinking_budget is not number %}"
        "{{ raise_exception('thinking_budget must be a number') }}{% endif %}{% if add_generation_prompt %}"), 1)
    tokenizer = build_tokenizer(replace(BY_NAME["Qwen3 (thinking)"], template=strict), smol_tokenizer, None)
    preset = with_template_kwargs(get_preset("seed"), {"thinking_budget": "lots"})
    with pytest.raises(PromptError, match=r'template_kwargs \{"thinking_budget":"lots"\}.*thinking_budget must be '
                                          r"a number"):
        render_inference(tokenizer, preset, "hello")
    assert render_inference(tokenizer, with_template_kwargs(get_preset("seed"), {"thinking_budget": 5}), "hello")


def test_options_the_template_does_not_read_are_reported(smol_tokenizer, qwen3) -> None:
    llama3 = build_tokenizer(BY_NAME["Llama-3.1 instruct"], smol_tokenizer, None)
    ignored = with_template_kwargs(get_preset("seed"), {"enable_thinking": False})
    assert answer_slot(llama3, ignored).flags == ("template_kwargs_ignored",)
    assert "do not change the rendering" in answer_slot(llama3, ignored).notes()[0]
    rows = resolve_letters(llama3, ignored, letters_for(3), "as_trained")
    assert all(row.flags == ("template_kwargs_ignored",) for row in rows)
    report = template_consistency(llama3, ignored)
    assert [problem.kind for problem in report.problems] == ["template_kwargs_ignored"] and report.ok
    # A text preset never reaches the chat template: the options are ignored there too, and said so.
    text_preset = with_template_kwargs(get_preset("llamarec"), {"enable_thinking": False})
    assert answer_slot(qwen3, text_preset).flags == ("template_kwargs_ignored",)
    # Qwen3 reads enable_thinking: no note, and no inserted span left to move.
    assert answer_slot(qwen3, with_template_kwargs(get_preset("seed"), {"enable_thinking": False})).flags == ()


def test_adapter_trained_with_template_kwargs_is_evaluated_with_them(qwen3, tmp_path) -> None:
    loaded, dataset = tiny_loaded(qwen3), make_toy_dataset()
    config = replace(TRAINING_PRESETS["quick"], max_samples=8, candidates=5, batch_size=4, eval_users=0,
                     eval_every=0, max_prompt_tokens=200, warmup=0.0, template_kwargs=NO_THINKING)
    samples, _ = build_training_samples(dataset, qwen3, config)
    examples, _ = label_samples(qwen3, samples, config)
    for sample, example in zip(samples, examples, strict=True):
        assert sample.prompt.rendered.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")
        assert qwen3.decode([example.input_ids[example.prompt_length]]) == sample.answer_letter
    train_adapter(loaded, dataset, config, "no-thinking", root=tmp_path)
    manifest = json.loads((tmp_path / "no-thinking" / MANIFEST_FILE).read_text())
    assert manifest["template_kwargs"] == NO_THINKING and manifest["training"]["template_kwargs"] == NO_THINKING

    inspector = Inspector(dataset, loaded, adapters_root=str(tmp_path))
    adapted = inspector.inspect("u02", InspectSettings(preset=get_preset("seed_after")), system="no-thinking")
    assert adapted.settings.template_kwargs == NO_THINKING
    assert "template_kwargs" in adapted.preset_note
    assert adapted.prepared.prompt.rendered.endswith("<think>\n\n</think>\n\n")
    assert adapted.prepared.answer_slot.flags == ()
    base = inspector.inspect("u02", InspectSettings(preset=get_preset("seed_after")))
    assert base.prepared.answer_slot.flags == ("inserted_before_answer",)
    # The same scored tokens either way: the option only moves the block from the answer into the prompt.
    assert base.prepared.token_ids == adapted.prepared.token_ids


def test_cli_audit_and_template_diagnosis_take_template_kwargs(qwen3, tmp_path, capsys) -> None:
    from rerank_core.cli.main import main

    qwen3.save_pretrained(tmp_path)
    assert main(["audit", "--tokenizer", str(tmp_path), "--candidates", "3", "--format", "json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert [row["token"] for row in payload["letters"]] == ["A", "B", "C"]
    assert payload["answer_slot"]["flags"] == ["inserted_before_answer"]
    assert payload["answer_slot"]["inserted_text"] == "<think>\n\n</think>\n\n"
    assert all(row["flags"] == ["inserted_before_answer"] for row in payload["letters"])

    assert main(["audit", "--tokenizer", str(tmp_path), "--candidates", "3"]) == 0
    assert "note: the chat template puts '<think>\\n\\n</think>\\n\\n'" in capsys.readouterr().out

    assert main(["audit", "--tokenizer", str(tmp_path), "--candidates", "3", "--format", "json",
                 "--template-kwargs", '{"enable_thinking": false}']) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["template_kwargs"] == NO_THINKING and payload["answer_slot"]["flags"] == []

    assert main(["audit", "--tokenizer", str(tmp_path), "--template-kwargs", "enable_thinking=false"]) == 2
    assert "template_kwargs is not valid JSON" in capsys.readouterr().err

    assert main(["diagnose", "template", "--tokenizer", str(tmp_path), "--format", "json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["answer_token"]["token"] == "A"
    assert [problem["kind"] for problem in report["problems"]] == ["inserted_before_answer"]
