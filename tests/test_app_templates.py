"""The app's view of chat templates: inserted spans marked, three coloured runs, the template-options control."""

from __future__ import annotations

import gradio as gr
import pytest
from app_helpers import make_context
from template_gallery import FAMILIES, build_tokenizer

from rerank_app.jobs import TrainRequest
from rerank_app.pickers import Pickers, endpoint
from rerank_app.tabs import diagnose, finetune
from rerank_app.tabs import inspect as inspect_tab
from rerank_core.inspector import BASE
from rerank_core.prompts import get_preset

QWEN3 = next(family for family in FAMILIES if family.name == "Qwen3 (thinking)")
NO_THINKING = '{"enable_thinking": false}'
PICKERS = Pickers(dataset="toy", model="tiny-llama", count=5)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    """The app over a tiny model whose tokenizer carries the Qwen3 thinking template."""
    return make_context(tmp_path_factory.mktemp("qwen3-app"), build_tokenizer(QWEN3, smol_tokenizer, None))


def _outputs(context, pickers: Pickers) -> dict:
    return dict(zip(inspect_tab.OUTPUT_NAMES, inspect_tab.inspect(context, pickers, BASE, "u03"), strict=True))


def test_inspect_marks_the_inserted_span_apart_from_prompt_and_letter(context) -> None:
    shown = _outputs(context, PICKERS)
    prompt = shown["prompt"]
    # The span the template puts before the letter has its own mark, after the prompt and before the letter.
    inserted = prompt.index('<span class="ri-inserted" title=')
    letter = prompt.index('<span class="ri-letter-slot" title=')
    assert inserted < letter and "think" in prompt[inserted:letter]
    assert "A…E" in prompt[letter:]
    assert "left out" not in prompt  # nothing of this generation prompt is cut
    assert "think" not in prompt[:inserted].rsplit("assistant", 1)[-1]
    # In the token view the span's four tokens (<think>, \n\n, </think>, \n\n) are marked too.
    assert shown["tokens"].count("ri-inserted-tok") == 4 + 1  # four tokens and the legend
    assert "the chat template puts" in shown["audit_note"]


def test_template_options_move_the_block_into_the_prompt(context) -> None:
    shown = _outputs(context, Pickers(**{**PICKERS.__dict__, "template_kwargs": NO_THINKING}))
    assert "ri-inserted" not in shown["prompt"] and "ri-letter-slot" not in shown["prompt"]
    assert "think" in shown["prompt"].rsplit("assistant", 1)[-1]  # now the generation prompt's own text
    assert "ri-inserted-tok" not in shown["tokens"]
    assert "the chat template puts" not in shown["audit_note"]


def test_bad_template_options_are_a_toast_and_the_app_keeps_serving(context) -> None:
    handler = endpoint(inspect_tab.inspect, context)
    values = {**PICKERS.__dict__, "adapter": BASE, "user_id": "u03"}
    with pytest.raises(gr.Error, match="template_kwargs is not valid JSON"):
        handler(**{**values, "template_kwargs": "enable_thinking=false"})
    with pytest.raises(gr.Error, match="template_kwargs must be a JSON object"):
        handler(**{**values, "template_kwargs": "[true]"})
    assert len(handler(**values)) == len(inspect_tab.OUTPUT_NAMES)
    with pytest.raises(gr.Error, match="template_kwargs is not valid JSON"):
        endpoint(diagnose.diagnose_template, context)("tiny-llama", "seed", 5, "{")


def test_template_diagnostic_shows_three_coloured_runs(context) -> None:
    note, _, letters = diagnose.diagnose_template(context, "tiny-llama", "seed", 5)
    assert letters["as-trained token"].tolist() == list("ABCDE")
    prompt, inserted, letter = (note.index(f'class="ri-run-{kind}"') for kind in ("prompt", "inserted", "letter"))
    assert prompt < inserted < letter
    assert "&lt;think&gt;↵↵&lt;/think&gt;↵↵" in note[inserted:letter]
    assert note[letter:].split(">", 1)[1].startswith("A</code>")
    assert "inserted_before_answer" in note and "`seed`: warnings" in note
    note, _, _ = diagnose.diagnose_template(context, "tiny-llama", "seed", 5, NO_THINKING)
    assert 'class="ri-run-prompt"' in note and 'class="ri-run-letter"' in note
    assert 'class="ri-run-inserted"' not in note and "`seed`: OK, consistent" in note


def test_fine_tune_form_passes_template_options_to_the_run(context) -> None:
    assert "template_kwargs" in finetune.FORM_FIELDS
    assert finetune.fill_preset("quick")[finetune.FORM_FIELDS.index("template_kwargs")] == ""
    preview = finetune.training_preview(context, "toy", "tiny-llama", candidates=5, template_kwargs=NO_THINKING)
    loss_tokens = [row["token"] for row in preview["tokens"] if row["loss"]]
    assert loss_tokens[0] in "ABCDE" and "<think>" not in loss_tokens
    config = TrainRequest(name="run", model_path="m", data_path="d", options={"template_kwargs": NO_THINKING}).config()
    assert config.template_kwargs == '{"enable_thinking":false}'  # canonical JSON, handed over in the config file
    with pytest.raises(ValueError, match="template_kwargs is not valid JSON"):
        TrainRequest(name="run", model_path="m", data_path="d", options={"template_kwargs": "--overwrite"}).config()


def test_prompt_view_strikes_out_generation_prompt_text_left_out(smol_tokenizer) -> None:
    """DeepSeek-R1: the generation prompt's `<think>\\n` is not in the scored prompt; the view says so."""
    from rerank_app import views
    from rerank_core.prompts import answer_slot, render_inference

    tokenizer = build_tokenizer(next(family for family in FAMILIES if family.name == "DeepSeek-R1 distill"),
                                smol_tokenizer, None)
    slot = answer_slot(tokenizer, get_preset("seed"))
    shown = views.prompt_html(tokenizer, render_inference(tokenizer, get_preset("seed"), "hello"), slot, letters="A…E")
    struck = shown.index('<span class="ri-trimmed" title=')
    assert "think" in shown[struck:] and shown.index('<span class="ri-letter-slot" title=') > struck
    assert "left out" in shown and "inserted before the letter" not in shown
