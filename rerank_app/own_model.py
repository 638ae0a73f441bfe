"""The page's way to a model of one's own: a model reference typed beside the picker, and a chat template (a .jinja
upload or pasted text) that overrides the model's own. Layout and wiring only; the checks live in the registry."""

from __future__ import annotations

import html
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from rerank_app.context import AppContext, SessionError
from rerank_app.pickers import endpoint
from rerank_core.chat_templates import read_chat_template

__all__ = ["OwnModelControls", "add_model", "build", "use_template", "wire"]

# Events that follow a new model value (the adapter picker, then the page's re-score): (handler, inputs, outputs,
# options), in order.
FollowUp = tuple[Callable[..., Any], Sequence[Any], Sequence[Any], dict[str, Any]]


@dataclass
class OwnModelControls:
    """The components beside the model picker."""

    reference: gr.Textbox
    add_button: gr.Button
    template_file: gr.File
    template_text: gr.Textbox
    template_button: gr.Button
    message: gr.Markdown


def add_model(context: AppContext, reference: str) -> tuple[Any, str]:
    """Check a typed model reference (no weights read) and offer it in the picker, selected."""
    name = context.models.add_reference(reference)
    return (gr.Dropdown(choices=context.models.names, value=name),
            f"**{html.escape(name)}** is in the model picker; it loads on first use (a GGUF is converted once).")


def use_template(context: AppContext, model: str, template_file: str | None, template_text: str, preset: str,
                 template_kwargs: str, strategy: str) -> tuple[Any, str]:
    """The picked model under an uploaded or pasted chat template, as a picker entry of its own (selected), with
    what the template changes in the letter audit."""
    if template_file:
        template = read_chat_template(template_file)  # the size and encoding checks of --chat-template
        text, source = template.text, Path(template_file).name
    elif str(template_text or "").strip():
        text, source = str(template_text), "pasted"
    else:
        raise SessionError("upload a .jinja file or paste a chat template first")
    name = context.models.with_template(model, text, source)
    effect = "\n".join(f"- {html.escape(line, quote=False)}" for line in
                       context.models.template_effect(name, preset, template_kwargs, strategy))
    return (gr.Dropdown(choices=context.models.names, value=name),
            f"**{html.escape(name)}** is selected: Inspect, Compare, Diagnose and fine-tunes use this template "
            f"(pick **{html.escape(context.models.entry(name).base or name)}** for the model's own).\n\n"
            f"Letter audit:\n{effect}")


def build() -> OwnModelControls:
    """Lay out the reference field and the template field, folded under the pickers."""
    with gr.Accordion("Your own model and chat template", open=False, elem_id="own-model"):
        with gr.Row(equal_height=True):
            reference = gr.Textbox(label="Model: a folder, a hub id org/name[@revision] from the local Hugging Face "
                                         "cache, or a .gguf file", placeholder="Qwen/Qwen2.5-0.5B-Instruct",
                                   max_lines=1, scale=4, elem_id="model-reference")
            add_button = gr.Button("Add to the model picker", scale=1, elem_id="add-model")
        with gr.Row(equal_height=True):
            template_file = gr.File(label="Chat template file (.jinja)", file_types=[".jinja", ".j2", ".txt"],
                                    type="filepath", scale=1, elem_id="chat-template-file")
            template_text = gr.Textbox(label="…or paste a chat template (Jinja)", lines=3, max_lines=12, scale=3,
                                       elem_id="chat-template-text")
            template_button = gr.Button("Use this template", scale=1, elem_id="use-chat-template")
        message = gr.Markdown(elem_id="own-model-message")
    return OwnModelControls(reference, add_button, template_file, template_text, template_button, message)


def wire(context: AppContext, own: OwnModelControls, model: gr.Dropdown, settings: Sequence[Any],
         follow_ups: Sequence[FollowUp]) -> None:
    """Adding a model or a template selects the new entry, then the follow-ups run (as a picked model's do).
    `settings` are the preset, template-options and strategy components the audit note reads."""
    options = {"api_visibility": "private", "concurrency_limit": 2, "concurrency_id": "score"}
    adding = endpoint(add_model, context)
    templating = endpoint(use_template, context)
    events = [trigger(adding, [own.reference], [model, own.message], **options)
              for trigger in (own.add_button.click, own.reference.submit)]
    events.append(own.template_button.click(templating, [model, own.template_file, own.template_text, *settings],
                                            [model, own.message], **options))
    for event in events:
        for handler, inputs, outputs, extra in follow_ups:
            event = event.success(handler, inputs, outputs, **extra)
