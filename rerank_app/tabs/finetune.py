"""The Fine-tune tab: a LoRA run as a subprocess; form, sample preview, live progress, cancel, result card."""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable, Sequence
from typing import Any

import gradio as gr

from rerank_app import views
from rerank_app.context import AppContext
from rerank_app.pickers import PickerControls, adapter_choices, endpoint, text_field_choices
from rerank_core.training.config import TRAINING_PRESETS
from rerank_core.training.settings import SETTINGS, setting

__all__ = ["FORM_FIELDS", "build", "cancel", "cancel_finetune", "fill_preset", "finetune_status", "show_preview",
           "start", "start_finetune", "status_json", "tick", "training_preview"]

# The form shows every setting training.settings gives a place in it: "main" ones first, the rest under "Advanced".
_MAIN_FIELDS = tuple(item.name for item in SETTINGS if item.form == "main")
_ADVANCED_FIELDS = tuple(item.name for item in SETTINGS if item.form == "advanced")
FORM_FIELDS = _MAIN_FIELDS + _ADVANCED_FIELDS
# Outputs of tick() before the adapter pickers and the seen-state.
_TICK_OUTPUTS = 6


def status_json(status: Any) -> dict[str, Any]:
    """A job status for the API; gradio_client takes any dict with a "path" string for a file to download."""
    payload = status.to_json()
    if payload.get("result"):
        payload["result"] = {("adapter_path" if key == "path" else key): value
                             for key, value in payload["result"].items()}
    return payload


def _overrides(values: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(FORM_FIELDS, values, strict=True))


def start(context: AppContext, name: str, preset: str, dataset: str, model: str, *values: Any) -> tuple[Any, ...]:
    """Start from the form (values in FORM_FIELDS order); polling begins."""
    status = context.finetune.start(name, dataset, model, preset, _overrides(values))
    return f"Started **{status.name}** (pid {status.pid}).", views.progress_html(status), gr.Timer(active=True)


def cancel(context: AppContext) -> str:
    status = context.finetune.jobs.cancel()
    return f"**{status.name}**: {status.message}"


def show_preview(context: AppContext, preset: str, dataset: str, model: str, *values: Any) -> str:
    return views.training_sample_html(*context.finetune.preview(dataset, model, preset, _overrides(values)))


def tick(context: AppContext, model: str, last: Any) -> tuple[Any, ...]:
    """Progress, charts, result and log of the current run; a finished run refreshes the Inspect and Compare
    adapter pickers. Nothing is sent while nothing changed."""
    status = context.finetune.jobs.status()
    key = (status.job_id, status.state, status.events)
    if key == last:
        return (gr.skip(),) * (_TICK_OUTPUTS + 2) + (last,)
    refreshed = [gr.skip(), gr.skip()]
    if status.state == "done":
        refreshed = [gr.Dropdown(choices=adapter_choices(context, model)),
                     gr.Dropdown(choices=context.models.adapter_names(model))]
    return (views.progress_html(status), views.loss_chart(status), views.eval_chart(status),
            views.result_markdown(status), status.log_tail and f"```\n{status.log_tail}\n```",
            gr.Timer(active=status.active), *refreshed, key)


def fill_preset(preset: str) -> list[Any]:
    """The form's values of a training preset."""
    config = TRAINING_PRESETS[preset]
    return [getattr(config, name) for name in FORM_FIELDS]


def _with_settings(function: Callable[..., dict]) -> Callable[..., dict]:
    """Give an API handler that takes **settings one optional keyword per form setting (what gradio_client shows
    and checks), each defaulting to None: left out, it keeps the training preset's value."""
    signature = inspect.signature(function)
    fixed = [parameter for parameter in signature.parameters.values()
             if parameter.kind is not inspect.Parameter.VAR_KEYWORD]
    settings = [inspect.Parameter(item.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                                  annotation=item.kind | None) for item in map(setting, FORM_FIELDS)]
    function.__signature__ = signature.replace(parameters=[*fixed, *settings])  # type: ignore[attr-defined]
    function.__annotations__ = {**typing.get_type_hints(function),
                                **{parameter.name: parameter.annotation for parameter in settings}}
    return function


@_with_settings
def start_finetune(context: AppContext, name: str, dataset: str = "", model: str = "",
                   training_preset: str = "quick", **settings: Any) -> dict:
    """Start a fine-tune (one at a time); settings left out keep the training preset's values."""
    status = context.finetune.start(name, dataset or context.datasets.names[0], model or context.models.names[0],
                                    training_preset, settings)
    return status_json(status)


@_with_settings
def training_preview(context: AppContext, dataset: str = "", model: str = "", training_preset: str = "quick",
                     **settings: Any) -> dict:
    """One training sample of these settings: every token with its ID and whether it carries loss."""
    tokenizer, token_ids, loss_mask, caption = context.finetune.preview(
        dataset or context.datasets.names[0], model or context.models.names[0], training_preset, settings)
    tokens = tokenizer.convert_ids_to_tokens(token_ids)
    return {"caption": caption, "tokens": [{"token": token, "token_id": token_id, "loss": loss}
                                           for token, token_id, loss in zip(tokens, token_ids, loss_mask)]}


def cancel_finetune(context: AppContext) -> dict:
    """Ask the running fine-tune to stop at its next step boundary."""
    return status_json(context.finetune.jobs.cancel())


def finetune_status(context: AppContext) -> dict:
    """The running or most recent fine-tune: state, step, losses, validation metrics, result."""
    return status_json(context.finetune.jobs.status())


def _form_component(name: str, value: Any) -> gr.components.Component:
    """The input for one setting, from its declaration: a list for choices, a box for a flag, else a number."""
    item = setting(name)
    label = name.replace("_", " ") + (f" (0: {item.zero_means.split(',')[0]})" if item.zero_means else "")
    elem_id = f"finetune-{name.replace('_', '-')}"
    if item.choices or item.offered:
        # An open-ended setting (the item text) offers its named values and takes any other the core accepts.
        return gr.Dropdown(list(item.choices or item.offered), value=value, label=label, elem_id=elem_id,
                           allow_custom_value=bool(item.offered))
    if item.kind is bool:
        return gr.Checkbox(value, label=label, elem_id=elem_id)
    if item.kind is str:
        return gr.Textbox(value, label=label, max_lines=1, elem_id=elem_id)
    return gr.Number(value, precision=0 if item.kind is int else None, label=label, elem_id=elem_id,
                     minimum=0 if item.zero_means else item.low, maximum=item.high)


def build(context: AppContext, controls: PickerControls, compare_adapters: gr.Dropdown, demo: gr.Blocks) -> None:
    """Lay out and wire the tab; a finished run refreshes the Inspect and Compare adapter pickers."""
    quick = TRAINING_PRESETS["quick"]
    gr.Markdown("Trains a LoRA adapter on the dataset and model chosen in the **Inspect** tab, in a separate "
                "process (`python -m rerank_core train`); the page can be reloaded and re-attaches to the run.")
    with gr.Row():
        name_box = gr.Textbox(label="Adapter name (letters, digits, . _ -)", placeholder="my-adapter", scale=3,
                              elem_id="adapter-name")
        training_preset = gr.Radio(list(TRAINING_PRESETS), value="quick", label="Training preset", scale=2)
        start_button = gr.Button("Start", variant="primary", scale=1, elem_id="start-finetune")
        cancel_button = gr.Button("Cancel", variant="stop", scale=1, elem_id="cancel-finetune")
    with gr.Row():
        form = {name: _form_component(name, getattr(quick, name)) for name in _MAIN_FIELDS}
    with gr.Accordion("Advanced", open=False):
        with gr.Row():
            form |= {name: _form_component(name, getattr(quick, name)) for name in _ADVANCED_FIELDS[:7]}
        with gr.Row():
            form |= {name: _form_component(name, getattr(quick, name)) for name in _ADVANCED_FIELDS[7:]}
    message = gr.Markdown(label="Message", elem_id="finetune-message")
    progress = gr.HTML(views.progress_html(None), elem_id="finetune-progress")
    with gr.Row():
        loss_plot = gr.Plot(label="Training loss", elem_id="finetune-loss")
        eval_plot = gr.Plot(label="Validation NDCG@10")
    result = gr.Markdown(elem_id="finetune-result")
    with gr.Accordion("Preview one training sample (loss-carrying tokens highlighted)", open=False):
        preview_button = gr.Button("Show a training sample")
        preview = gr.HTML(label="Training sample")
    timer = gr.Timer(1.0, active=False)
    seen = gr.State(None)

    form_inputs = [form[name] for name in FORM_FIELDS]
    # Enter in the name box or in any number or text box of the form starts the run, as Start does.
    boxes = [name_box, *(box for box in form_inputs if isinstance(box, (gr.Number, gr.Textbox)))]
    for trigger in (start_button.click, *(box.submit for box in boxes)):
        trigger(endpoint(start, context), [name_box, training_preset, controls.dataset, controls.model, *form_inputs],
                [message, progress, timer], api_visibility="private", concurrency_limit=1, concurrency_id="jobs")
    cancel_button.click(endpoint(cancel, context), [], [message], api_visibility="private", concurrency_limit=1,
                        concurrency_id="jobs")
    preview_button.click(endpoint(show_preview, context),
                         [training_preset, controls.dataset, controls.model, *form_inputs], [preview],
                         api_visibility="private", concurrency_limit=2, concurrency_id="score")
    log_box = gr.Markdown()
    ticker = endpoint(tick, context)
    tick_outputs = [progress, loss_plot, eval_plot, result, log_box, timer, controls.adapter, compare_adapters, seen]
    timer.tick(ticker, [controls.model, seen], tick_outputs, api_visibility="private", concurrency_limit=None,
               show_progress="hidden")
    # A reloaded page re-attaches: show the current (or last) run and poll while it is active.
    demo.load(ticker, [controls.model, seen], tick_outputs, api_visibility="private", concurrency_limit=None)
    training_preset.input(fill_preset, [training_preset], form_inputs, api_visibility="private")
    # The item-text list offers the chosen dataset's own fields, from the page's first load on.
    for trigger in (controls.dataset.change, demo.load):
        trigger(endpoint(text_field_choices, context), [controls.dataset], [form["text_field"]],
                api_visibility="private")

    gr.api(endpoint(start_finetune, context), api_name="start_finetune", concurrency_limit=1, concurrency_id="jobs")
    gr.api(endpoint(cancel_finetune, context), api_name="cancel_finetune", concurrency_limit=1,
           concurrency_id="jobs")
    gr.api(endpoint(training_preview, context), api_name="training_preview", concurrency_limit=2,
           concurrency_id="score")
    gr.api(endpoint(finetune_status, context), api_name="finetune_status", concurrency_limit=None)
