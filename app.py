"""Rerank Inspector's web app: Inspect, Compare, Fine-tune, Data and Diagnose tabs over rerank_core (wiring only)."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gradio as gr

from rerank_core import diagnostic_views, views
from rerank_core.app_state import AppConfig, AppContext, DatasetEntry, ModelEntry, make_settings
from rerank_core.candidates import CANDIDATE_SOURCES, MAX_CANDIDATES
from rerank_core.data import TEXT_FIELDS, bundled_sample_path, load_dataset
from rerank_core.diagnostics import (
    ORDER_MODES,
    PRIOR_MODES,
    OrderSpec,
    PositionBiasSummary,
    history_influence,
    letter_mass,
    letter_prior,
    position_bias,
    template_consistency,
)
from rerank_core.inspector import BASE
from rerank_core.jobs import JobRunner
from rerank_core.loaders import FORMATS
from rerank_core.prompts import PRESETS
from rerank_core.training import TRAINING_PRESETS
from rerank_core.verbalizer import STRATEGIES

__all__ = ["build_app", "build_context", "launch", "main", "parse_args"]

log = logging.getLogger("rerank_app")

AUTH_ENV = "RERANK_AUTH"
SAMPLE_DATASET = "sample"
NO_ADAPTER_LABEL = "none (base model)"
# Exceptions that mean "this request cannot be served as asked": shown to the user, the app keeps serving.
_USER_ERRORS = (ValueError, LookupError, OSError, RuntimeError)


def _user_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Turn a rerank_core error into a Gradio error toast (its message names the fix) instead of a crash."""

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except gr.Error:
            raise
        except _USER_ERRORS as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else str(error)
            log.info("request refused: %s", message)
            raise gr.Error(str(message), print_exception=False) from error

    return wrapper


def _status_json(status: Any) -> dict[str, Any]:
    """A job status for the API; gradio_client takes any dict with a "path" string for a file to download."""
    payload = status.to_json()
    if payload.get("result"):
        payload["result"] = {("adapter_path" if key == "path" else key): value
                             for key, value in payload["result"].items()}
    return payload


def _adapter_choices(context: AppContext, model: str) -> list[tuple[str, str]]:
    return [(NO_ADAPTER_LABEL, BASE), *((name, name) for name in context.adapter_names(model))]


@dataclass
class InspectControls:
    """The Inspect tab's pickers, which Compare and Fine-tune read too."""

    dataset: gr.Dropdown
    model: gr.Dropdown
    adapter: gr.Dropdown
    split: gr.Radio
    source: gr.Dropdown
    preset: gr.Dropdown
    strategy: gr.Dropdown
    text_field: gr.Dropdown
    count: gr.Slider
    seed: gr.Number
    use_adapter_preset: gr.Checkbox
    user: gr.Dropdown
    order: gr.Radio

    @property
    def settings_inputs(self) -> list[gr.components.Component]:
        """The inputs every scoring handler takes, in handler-argument order."""
        return [self.dataset, self.model, self.split, self.source, self.preset, self.strategy,
                self.text_field, self.count, self.seed, self.use_adapter_preset]


# -- Inspect ------------------------------------------------------------------------------------

def inspect_tab(context: AppContext) -> tuple[InspectControls, dict[str, Any], gr.Button]:
    """The default view: one user, every link of the chain from prompt to metrics."""
    dataset, model = context.dataset_names[0], context.model_names[0]
    with gr.Row():
        # Custom values allowed where choices grow at run time (uploads, new adapters); the server validates.
        dataset_box = gr.Dropdown(context.dataset_names, value=dataset, label="Dataset", scale=2,
                                  allow_custom_value=True)
        model_box = gr.Dropdown(context.model_names, value=model, label="Model", scale=2)
        adapter_box = gr.Dropdown(_adapter_choices(context, model), value=BASE, label="Adapter (from adapters/)",
                                  scale=2, allow_custom_value=True, elem_id="adapter-picker")
        split_box = gr.Radio(["test", "validation"], value="test", label="Split", scale=1)
    with gr.Row():
        source_box = gr.Dropdown(list(CANDIDATE_SOURCES), value="random", label="Candidate source")
        preset_box = gr.Dropdown(list(PRESETS), value="seed", label="Prompt preset")
        strategy_box = gr.Dropdown(list(STRATEGIES), value="as_trained", label="Verbalizer strategy")
        text_box = gr.Dropdown(list(TEXT_FIELDS), value="title", label="Item text field")
        count_box = gr.Slider(2, MAX_CANDIDATES, value=20, step=1, label="Candidates")
    with gr.Accordion("More settings", open=False), gr.Row():
        seed_box = gr.Number(0, precision=0, label="Candidate seed")
        adapter_preset_box = gr.Checkbox(True, label="Score an adapter with the preset it was trained with")
    with gr.Row(equal_height=True):
        user_box = gr.Dropdown(context.user_choices(dataset), value=context.users(dataset)[0],
                               label="User (type to search by id)", filterable=True, allow_custom_value=True,
                               scale=4, elem_id="user-picker")
        random_button = gr.Button("Random user", scale=1, elem_id="random-user")
    summary = gr.Markdown(label="Summary", elem_id="inspect-summary")
    with gr.Row():
        with gr.Column(scale=1):
            order_box = gr.Radio(list(views.CHART_ORDERS), value="letter", label="Order bars by",
                                 elem_id="chart-order")
            chart = gr.Plot(label="Letter probabilities", elem_id="letter-chart")
        with gr.Column(scale=1):
            candidates = gr.Dataframe(label="Candidates (★ = ground truth)", interactive=False, max_height=420,
                                      column_widths=["14%", "12%", "36%", "10%", "15%", "13%"],
                                      elem_id="candidates-table")
    with gr.Row():
        with gr.Column():
            history_note = gr.Markdown(label="History note")
            history = gr.Dataframe(label="History", interactive=False, max_height=360,
                                   column_widths=["8%", "14%", "58%", "20%"], elem_id="history-table")
        with gr.Column():
            audit_note = gr.Markdown(label="Audit note", elem_id="audit-note")
            audit = gr.Dataframe(label="Letter audit", interactive=False, max_height=360,
                                 column_widths=["14%", "10%", "9%", "17%", "12%", "38%"],
                                 elem_id="audit-table")
    with gr.Row():
        with gr.Column(scale=3), gr.Tabs():
            with gr.Tab("Rendered prompt (whitespace and special tokens visible)"):
                prompt = gr.HTML(label="Rendered prompt", elem_id="rendered-prompt")
            with gr.Tab("Tokens with IDs"):
                tokens = gr.HTML(label="Tokens", elem_id="token-view")
        with gr.Column(scale=1):
            other_tokens = gr.Dataframe(label="Top non-letter next tokens", interactive=False,
                                        column_widths=["24%", "24%", "20%", "32%"])
    controls = InspectControls(dataset_box, model_box, adapter_box, split_box, source_box, preset_box, strategy_box,
                               text_box, count_box, seed_box, adapter_preset_box, user_box, order_box)
    outputs = {"summary": summary, "history": history, "history_note": history_note, "candidates": candidates,
               "chart": chart, "prompt": prompt, "tokens": tokens, "audit": audit, "audit_note": audit_note,
               "other_tokens": other_tokens}
    return controls, outputs, random_button


def wire_inspect(context: AppContext, controls: InspectControls, outputs: dict[str, Any], random_button: Any,
                 demo: gr.Blocks) -> Callable[..., Any]:
    """Every picker re-scores in one round trip; returns the handler so other tabs can chain it."""
    output_list = list(outputs.values())

    @_user_errors
    def inspect(dataset: str, model: str, split: str, source: str, preset: str, strategy: str, text_field: str,
                count: int, seed: int, use_adapter_preset: bool, adapter: str, user_id: str,
                order: str = "letter") -> tuple[Any, ...]:
        settings = make_settings(split=split, source=source, preset=preset, strategy=strategy,
                                 text_field=text_field, count=count, seed=seed,
                                 use_adapter_preset=use_adapter_preset)
        inspection = context.inspect(dataset, model, adapter, user_id, settings)
        view = views.inspect_view(inspection, context.dataset(dataset).dataset, context.tokenizer(model),
                                  model_name=model, order=order)
        return tuple(getattr(view, name) for name in outputs)

    inputs = [*controls.settings_inputs, controls.adapter, controls.user, controls.order]
    event_options = {"concurrency_limit": 4, "concurrency_id": "score"}
    # The same handler as the UI's, with named parameters for gradio_client; registered first so it owns
    # the name /inspect (the UI's own events are private).
    api_trigger = gr.Button(visible=False)
    api_trigger.click(inspect, inputs, output_list, api_name="inspect", **event_options)
    for box in (controls.split, controls.source, controls.preset, controls.strategy, controls.text_field,
                controls.adapter, controls.use_adapter_preset, controls.user, controls.order):
        box.input(inspect, inputs, output_list, api_visibility="private", **event_options)
    controls.count.release(inspect, inputs, output_list, api_visibility="private", **event_options)
    controls.seed.submit(inspect, inputs, output_list, api_visibility="private", **event_options)
    random_button.click(
        _user_errors(lambda dataset: context.random_user(dataset)), [controls.dataset], [controls.user],
        api_name="random_user",
    ).then(inspect, inputs, output_list, api_visibility="private", **event_options)

    @_user_errors
    def change_dataset(dataset: str) -> Any:
        return gr.Dropdown(choices=context.user_choices(dataset), value=context.users(dataset)[0])

    controls.dataset.input(change_dataset, [controls.dataset], [controls.user], api_visibility="private").then(
        inspect, inputs, output_list, api_visibility="private", **event_options)

    @_user_errors
    def change_model(model: str) -> Any:
        return gr.Dropdown(choices=_adapter_choices(context, model), value=BASE)

    controls.model.input(change_model, [controls.model], [controls.adapter], api_visibility="private").then(
        inspect, inputs, output_list, api_visibility="private", **event_options)
    demo.load(inspect, inputs, output_list, api_visibility="private", **event_options)

    def inspect_json(user_id: str, dataset: str = "", model: str = "", adapter: str = BASE, split: str = "test",
                     source: str = "random", preset: str = "seed", strategy: str = "as_trained",
                     text_field: str = "title", count: int = 20, seed: int = 0,
                     use_adapter_preset: bool = True) -> dict:
        """One user as plain JSON: the fields `python -m rerank_core show --format json` prints."""
        dataset = dataset or context.dataset_names[0]
        model = model or context.model_names[0]
        settings = make_settings(split=split, source=source, preset=preset, strategy=strategy,
                                 text_field=text_field, count=count, seed=seed,
                                 use_adapter_preset=use_adapter_preset)
        inspection = context.inspect(dataset, model, adapter, user_id, settings)
        return inspection.to_json(context.dataset(dataset).dataset)

    gr.api(_user_errors(inspect_json), api_name="inspect_json", **event_options)
    return inspect


# -- Compare ------------------------------------------------------------------------------------

def compare_tab(context: AppContext, controls: InspectControls, tabs: gr.Tabs, inspect: Callable[..., Any],
                inspect_outputs: list[Any], demo: gr.Blocks) -> gr.Dropdown:
    """Base plus up to three adapters: one user side by side, and N users with paired differences."""
    gr.Markdown("Uses the dataset, model, prompt settings and user chosen in the **Inspect** tab.")
    with gr.Row():
        adapters_box = gr.Dropdown(context.adapter_names(context.model_names[0]), value=[], multiselect=True,
                                   max_choices=3, allow_custom_value=True,
                                   label="Adapters to compare with the base (up to 3)", scale=4,
                                   elem_id="compare-adapters")
        refresh = gr.Button("↻ Refresh adapters", scale=1)
    with gr.Row():
        one_button = gr.Button("Compare on the Inspect tab's user", variant="primary")
    user_chart = gr.Plot(label="Letter probabilities per system", elem_id="compare-user-chart")
    user_table = gr.Dataframe(label="Rank of the ground truth and top-3 per system", interactive=False)
    gr.Markdown("### On many users")
    with gr.Row():
        count_box = gr.Slider(10, context.config.max_compare_users, value=min(100, context.config.max_compare_users),
                              step=10, label="Users (the first N of the dataset)", scale=4)
        many_button = gr.Button("Run on N users", variant="primary", scale=1)
    counts = gr.Markdown(label="Improved / unchanged / worsened")
    metrics = gr.Dataframe(label="Metrics per system", interactive=False)
    differences = gr.Dataframe(label="Paired difference to the base (95% bootstrap CI)", interactive=False,
                               max_height=360)
    with gr.Row():
        scatter = gr.Plot(label="Ground-truth probability: base vs adapter", elem_id="compare-scatter")
        with gr.Column():
            movers = gr.Dataframe(label="Most improved and most worsened users (select a row to open it)",
                                  interactive=False, max_height=360)
            with gr.Row():
                open_box = gr.Dropdown([], label="Open in Inspect", scale=3)
                open_button = gr.Button("Open", scale=1)

    @_user_errors
    def compare_user(dataset: str, model: str, split: str, source: str, preset: str, strategy: str,
                     text_field: str, count: int, seed: int, use_adapter_preset: bool, adapters: list[str],
                     user_id: str) -> tuple[Any, Any]:
        settings = make_settings(split=split, source=source, preset=preset, strategy=strategy,
                                 text_field=text_field, count=count, seed=seed,
                                 use_adapter_preset=use_adapter_preset)
        inspections = context.compare_user(dataset, model, adapters, user_id, settings)
        return views.compare_user_chart(inspections), views.compare_user_table(inspections)

    @_user_errors
    def compare(dataset: str, model: str, split: str, source: str, preset: str, strategy: str, text_field: str,
                count: int, seed: int, use_adapter_preset: bool, adapters: list[str], users: int,
                progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008 - Gradio's idiom
        settings = make_settings(split=split, source=source, preset=preset, strategy=strategy,
                                 text_field=text_field, count=count, seed=seed,
                                 use_adapter_preset=use_adapter_preset)
        progress(0.0, desc="scoring")
        per_user, summary = context.compare_users(
            dataset, model, adapters, settings, users,
            progress=lambda done, total: progress(done / total, desc=f"scored {done} of {total}"))
        view = views.compare_view(per_user, summary)
        choices = [(f"{row['user_id']} · {row['system']} · {row['change']}", f"{row['user_id']}|{row['system']}")
                   for row in view.movers.to_dict(orient="records")]
        return (view.counts, view.metrics, view.differences, view.scatter, view.movers,
                gr.Dropdown(choices=choices, value=choices[0][1] if choices else None))

    base_inputs = [*controls.settings_inputs, adapters_box]
    one_button.click(compare_user, [*base_inputs, controls.user], [user_chart, user_table], api_name="compare_user",
                     concurrency_limit=4, concurrency_id="score")
    many_button.click(compare, [*base_inputs, count_box], [counts, metrics, differences, scatter, movers, open_box],
                      api_name="compare", concurrency_limit=1, concurrency_id="compare")
    refresh.click(lambda model: gr.Dropdown(choices=context.adapter_names(model)), [controls.model],
                  [adapters_box], api_visibility="private")
    # Built once, the page would miss adapters published since (by the CLI, or before a reload).
    demo.load(lambda model: (gr.Dropdown(choices=_adapter_choices(context, model)),
                             gr.Dropdown(choices=context.adapter_names(model))),
              [controls.model], [controls.adapter, adapters_box], api_visibility="private")

    def open_user(choice: str) -> tuple[Any, Any, Any]:
        if not choice or "|" not in choice:
            raise gr.Error("run the comparison first, then pick a user to open")
        user_id, system = choice.split("|", 1)
        return gr.Dropdown(value=user_id), gr.Dropdown(value=system), gr.Tabs(selected="inspect")

    def select_row(event: gr.SelectData, table: Any) -> tuple[Any, Any, Any]:
        row = table.iloc[event.index[0]]
        return open_user(f"{row['user_id']}|{row['system']}")

    inspect_inputs = [*controls.settings_inputs, controls.adapter, controls.user, controls.order]
    open_button.click(open_user, [open_box], [controls.user, controls.adapter, tabs], api_visibility="private").then(
        inspect, inspect_inputs, inspect_outputs, api_visibility="private")
    movers.select(select_row, [movers], [controls.user, controls.adapter, tabs], api_visibility="private").then(
        inspect, inspect_inputs, inspect_outputs, api_visibility="private")
    return adapters_box


# -- Fine-tune ----------------------------------------------------------------------------------

# Form fields (TrainConfig names): shown by default, then behind "Advanced".
_MAIN_FIELDS = ("prompt_preset", "candidates", "max_samples", "epochs", "learning_rate")
_ADVANCED_FIELDS = ("lora_r", "lora_alpha", "lora_dropout", "batch_size", "grad_accumulation", "warmup",
                    "eval_every", "eval_users", "max_prompt_tokens", "seed", "strategy", "candidate_source",
                    "text_field", "sample_mode")


def _form_component(name: str, value: Any) -> gr.components.Component:
    from rerank_core.training import SAMPLE_MODES

    label = name.replace("_", " ")
    choices = {"prompt_preset": list(PRESETS), "strategy": list(STRATEGIES),
               "candidate_source": list(CANDIDATE_SOURCES), "text_field": list(TEXT_FIELDS),
               "sample_mode": list(SAMPLE_MODES)}
    elem_id = f"finetune-{name.replace('_', '-')}"
    if name in choices:
        return gr.Dropdown(choices[name], value=value, label=label, elem_id=elem_id)
    if isinstance(value, float) or name in ("epochs", "learning_rate", "lora_dropout", "warmup"):
        return gr.Number(value, label=label, elem_id=elem_id)
    return gr.Number(value, precision=0, label=label + (" (0: all)" if name == "max_samples" else ""),
                     elem_id=elem_id)


def finetune_tab(context: AppContext, controls: InspectControls,
                 adapter_pickers: Sequence[gr.Dropdown], demo: gr.Blocks) -> None:
    """A LoRA run as a subprocess: form, sample preview, live progress, cancel, result card."""
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
        loss_plot = gr.Plot(label="Training loss")
        eval_plot = gr.Plot(label="Validation NDCG@10")
    result = gr.Markdown(elem_id="finetune-result")
    with gr.Accordion("Preview one training sample (loss-carrying tokens highlighted)", open=False):
        preview_button = gr.Button("Show a training sample")
        preview = gr.HTML(label="Training sample")
    timer = gr.Timer(1.0, active=False)
    seen = gr.State(None)
    fields = list(form)

    def overrides(values: Sequence[Any]) -> dict[str, Any]:
        return {name: value for name, value in zip(fields, values)}

    @_user_errors
    def start(name: str, preset: str, dataset: str, model: str, *values: Any) -> tuple[Any, ...]:
        status = context.start_finetune(name, dataset, model, preset, overrides(values))
        return (f"Started **{status.name}** (pid {status.pid}).", views.progress_html(status),
                gr.Timer(active=True))

    @_user_errors
    def cancel() -> str:
        status = context.jobs.cancel()
        return f"**{status.name}**: {status.message}"

    @_user_errors
    def show_preview(preset: str, dataset: str, model: str, *values: Any) -> str:
        return views.training_sample_html(*context.training_preview(dataset, model, preset, overrides(values)))

    def tick(model: str, last: Any) -> tuple[Any, ...]:
        status = context.jobs.status()
        key = (status.job_id, status.state, status.events)
        if key == last:
            return (gr.skip(),) * (6 + len(adapter_pickers)) + (last,)
        refreshed = [gr.skip()] * len(adapter_pickers)
        if status.state == "done":
            refreshed = [gr.Dropdown(choices=_adapter_choices(context, model) if not picker.multiselect
                                     else context.adapter_names(model)) for picker in adapter_pickers]
        return (views.progress_html(status), views.loss_chart(status), views.eval_chart(status),
                views.result_markdown(status), status.log_tail and f"```\n{status.log_tail}\n```",
                gr.Timer(active=status.active), *refreshed, key)

    form_inputs = [form[name] for name in fields]
    start_button.click(start, [name_box, training_preset, controls.dataset, controls.model, *form_inputs],
                       [message, progress, timer], api_visibility="private", concurrency_limit=1,
                       concurrency_id="jobs")
    cancel_button.click(cancel, [], [message], api_visibility="private", concurrency_limit=1, concurrency_id="jobs")
    preview_button.click(show_preview, [training_preset, controls.dataset, controls.model, *form_inputs], [preview],
                         api_visibility="private", concurrency_limit=2, concurrency_id="score")
    log_box = gr.Markdown()
    tick_outputs = [progress, loss_plot, eval_plot, result, log_box, timer, *adapter_pickers, seen]
    timer.tick(tick, [controls.model, seen], tick_outputs, api_visibility="private", concurrency_limit=None,
               show_progress="hidden")
    # A reloaded page re-attaches: show the current (or last) run and poll while it is active.
    demo.load(tick, [controls.model, seen], tick_outputs, api_visibility="private", concurrency_limit=None)

    def fill_preset(preset: str) -> list[Any]:
        config = TRAINING_PRESETS[preset]
        return [getattr(config, name) for name in fields]

    training_preset.input(fill_preset, [training_preset], form_inputs, api_visibility="private")

    def start_finetune(name: str, dataset: str = "", model: str = "", training_preset: str = "quick",
                       prompt_preset: str | None = None, candidates: int | None = None,
                       max_samples: int | None = None, epochs: float | None = None,
                       learning_rate: float | None = None, lora_r: int | None = None,
                       batch_size: int | None = None, eval_users: int | None = None,
                       eval_every: int | None = None, seed: int | None = None,
                       max_prompt_tokens: int | None = None) -> dict:
        """Start a fine-tune (one at a time); options left out keep the training preset's values."""
        options = {"prompt_preset": prompt_preset, "candidates": candidates, "max_samples": max_samples,
                   "epochs": epochs, "learning_rate": learning_rate, "lora_r": lora_r, "batch_size": batch_size,
                   "eval_users": eval_users, "eval_every": eval_every, "seed": seed,
                   "max_prompt_tokens": max_prompt_tokens}
        status = context.start_finetune(name, dataset or context.dataset_names[0], model or context.model_names[0],
                                        training_preset, {key: value for key, value in options.items()
                                                          if value is not None})
        return _status_json(status)

    def training_preview(dataset: str = "", model: str = "", training_preset: str = "quick",
                         prompt_preset: str | None = None, candidates: int | None = None,
                         max_prompt_tokens: int | None = None, seed: int | None = None) -> dict:
        """One training sample of these settings: every token with its ID and whether it carries loss."""
        options = {"prompt_preset": prompt_preset, "candidates": candidates, "max_prompt_tokens": max_prompt_tokens,
                   "seed": seed}
        tokenizer, token_ids, loss_mask, caption = context.training_preview(
            dataset or context.dataset_names[0], model or context.model_names[0], training_preset,
            {key: value for key, value in options.items() if value is not None})
        tokens = tokenizer.convert_ids_to_tokens(token_ids)
        return {"caption": caption, "tokens": [{"token": token, "token_id": token_id, "loss": loss}
                                               for token, token_id, loss in zip(tokens, token_ids, loss_mask)]}

    def cancel_finetune() -> dict:
        """Ask the running fine-tune to stop at its next step boundary."""
        return _status_json(context.jobs.cancel())

    def finetune_status() -> dict:
        """The running or most recent fine-tune: state, step, losses, validation metrics, result."""
        return _status_json(context.jobs.status())

    gr.api(_user_errors(start_finetune), api_name="start_finetune", concurrency_limit=1, concurrency_id="jobs")
    gr.api(_user_errors(cancel_finetune), api_name="cancel_finetune", concurrency_limit=1, concurrency_id="jobs")
    gr.api(_user_errors(training_preview), api_name="training_preview", concurrency_limit=2, concurrency_id="score")
    gr.api(finetune_status, api_name="finetune_status", concurrency_limit=None)


# -- Data ---------------------------------------------------------------------------------------

def data_tab(context: AppContext, dataset_pickers: Sequence[gr.Dropdown], demo: gr.Blocks) -> None:
    """The bundled sample or uploaded files: validation messages with file and line, and statistics."""
    with gr.Row():
        with gr.Column(scale=2):
            shown = gr.Dropdown(context.dataset_names, value=context.dataset_names[0], label="Dataset")
            summary = gr.Markdown(label="Statistics")
        with gr.Column(scale=3):
            files = gr.File(file_count="multiple", type="filepath", label=(
                "Upload a dataset: items.csv + interactions.csv, MovieLens u.data + u.item / ratings.dat + "
                "movies.dat / ratings.csv + movies.csv, or Amazon reviews + meta JSON lines "
                f"(at most {context.config.max_upload_bytes / 1024**2:g} MiB per file)"))
            with gr.Row():
                upload_name = gr.Textbox(label="Name", placeholder="my-data", scale=2)
                data_format = gr.Dropdown(["auto", *FORMATS], value="auto", label="Format", scale=1)
                upload_button = gr.Button("Load upload", variant="primary", scale=1)
            upload_message = gr.Markdown(label="Upload result", elem_id="upload-message")
    with gr.Row():
        lengths = gr.Plot(label="History lengths")
        popularity = gr.Plot(label="Item popularity")
    top_items = gr.Dataframe(label="Most popular items", interactive=False, max_height=320)

    @_user_errors
    def statistics(dataset: str) -> tuple[Any, ...]:
        view = views.data_view(context.dataset(dataset).dataset)
        return view.summary, view.history_lengths, view.popularity, view.top_items

    def upload(paths: list[str] | None, name: str, chosen_format: str) -> tuple[Any, ...]:
        from rerank_core.data import DataError

        try:
            entry = context.add_upload(paths or [], name or "upload",
                                       None if chosen_format == "auto" else chosen_format)
        except (DataError, ValueError, OSError) as error:
            gr.Warning(str(error))
            return (f"**Could not load the upload:** {error}", *(gr.skip(),) * (1 + len(dataset_pickers)))
        names = context.dataset_names
        text = (f"Loaded **{entry.name}**: {len(entry.dataset.sequences)} users, {len(entry.dataset.items)} items. "
                "Pick it in the Inspect tab's dataset list.")
        return (text, gr.Dropdown(choices=names, value=entry.name),
                *(gr.Dropdown(choices=names) for _ in dataset_pickers))

    stats_outputs = [summary, lengths, popularity, top_items]
    shown.change(statistics, [shown], stats_outputs, api_name="data_stats")
    demo.load(statistics, [shown], stats_outputs, api_visibility="private")
    upload_button.click(upload, [files, upload_name, data_format], [upload_message, shown, *dataset_pickers],
                        api_name="upload_data", concurrency_limit=1, concurrency_id="upload")


# -- Diagnose -----------------------------------------------------------------------------------

def diagnose_tab(context: AppContext, controls: InspectControls, demo: gr.Blocks) -> None:
    """Position bias, letter prior, history influence, template consistency and letter mass, each on demand."""
    model = context.model_names[0]
    max_users = context.config.max_compare_users
    gr.Markdown("Uses the dataset, model, prompt settings and user chosen in the **Inspect** tab. "
                "Each section runs on its own button.")
    with gr.Row():
        system_box = gr.Dropdown(_adapter_choices(context, model), value=BASE, allow_custom_value=True, scale=4,
                                 label="System for position bias, letter prior and history influence",
                                 elem_id="diagnose-system")
        refresh = gr.Button("↻ Refresh adapters", scale=1)

    gr.Markdown("### 1. Position bias: the same candidates in other orders")
    with gr.Row():
        orders_box = gr.Radio(list(ORDER_MODES), value="rotations", label="Candidate orders", scale=2)
        permutations_box = gr.Number(20, precision=0, label="Orders (permutations mode only)", scale=1)
        bias_button = gr.Button("Run on the Inspect tab's user", variant="primary", scale=1)
    bias_note = gr.Markdown(elem_id="diagnose-bias-note")
    heatmap = gr.Plot(label="Probability of each item at each letter", elem_id="diagnose-heatmap")
    with gr.Row():
        letter_chart = gr.Plot(label="Probability by letter position")
        rank_chart = gr.Plot(label="Ground-truth rank over orders")
    bias_items = gr.Dataframe(label="Items: as shown vs debiased", interactive=False, max_height=360)
    with gr.Row():
        bias_users = gr.Slider(1, max_users, value=min(20, max_users), step=1, scale=4,
                               label="Users (the first N of the dataset)")
        bias_users_button = gr.Button("Run on N users", variant="primary", scale=1)
    with gr.Row():
        top1_chart = gr.Plot(label="Where the top-1 stands")
        mass_by_letter = gr.Plot(label="Probability by letter position over users")
    bias_summary = gr.Dataframe(label="Position bias per system", interactive=False)

    gr.Markdown("### 2. Letter prior: candidate texts hidden")
    with gr.Row():
        prior_mode = gr.Radio(list(PRIOR_MODES), value="placeholder", label="Candidate texts", scale=2)
        placeholder_box = gr.Textbox("item", label="Placeholder word", scale=2)
        prior_users = gr.Slider(1, max_users, value=min(20, max_users), step=1, label="Users", scale=3)
        prior_button = gr.Button("Run letter prior", variant="primary", scale=1)
    with gr.Row():
        prior_chart = gr.Plot(label="Letter prior")
        prior_table = gr.Dataframe(label="Letter prior per letter", interactive=False, max_height=360)

    gr.Markdown("### 3. History influence: leave one history item out")
    history_button = gr.Button("Run on the Inspect tab's user", variant="primary")
    with gr.Row():
        history_chart = gr.Plot(label="Influence of each history item")
        history_table = gr.Dataframe(label="History (most influential rows highlighted)", interactive=False,
                                     max_height=360, elem_id="diagnose-history-table")

    gr.Markdown("### 4. Template consistency: inference prompt vs training conversation (no model run)")
    template_button = gr.Button("Check the Inspect tab's model and preset", variant="primary")
    template_note = gr.Markdown(elem_id="diagnose-template-note")
    with gr.Row():
        template_tokens = gr.Dataframe(label="Tokens around the end of the prompt or the first difference",
                                       interactive=False, max_height=360)
        template_letters = gr.Dataframe(label="Letter tokens", interactive=False, max_height=360)

    gr.Markdown("### 5. Letter mass: the letters' share of the full-vocabulary probability")
    with gr.Row():
        mass_adapters = gr.Dropdown(context.adapter_names(model), value=[], multiselect=True, max_choices=3,
                                    allow_custom_value=True, label="Adapters beside the base (up to 3)", scale=3)
        mass_users = gr.Slider(1, max_users, value=min(20, max_users), step=1, label="Users", scale=3)
        mass_button = gr.Button("Run letter mass", variant="primary", scale=1)
    with gr.Row():
        mass_chart = gr.Plot(label="Letter mass per user")
        mass_table = gr.Dataframe(label="Letter mass per system", interactive=False)

    def settings_of(split: str, source: str, preset: str, strategy: str, text_field: str, count: int, seed: int,
                    use_adapter_preset: bool) -> Any:
        return make_settings(split=split, source=source, preset=preset, strategy=strategy, text_field=text_field,
                             count=count, seed=seed, use_adapter_preset=use_adapter_preset)

    def first_users(dataset: str, users: int) -> list[str]:
        return context.users(dataset)[:max(1, min(int(users), max_users))]

    @_user_errors
    def diagnose_position_bias(dataset: str, model: str, split: str, source: str, preset: str, strategy: str,
                               text_field: str, count: int, seed: int, use_adapter_preset: bool, system: str,
                               user_id: str, orders: str = "rotations", permutations: int = 20) -> tuple[Any, ...]:
        settings = settings_of(split, source, preset, strategy, text_field, count, seed, use_adapter_preset)
        spec = OrderSpec(mode=orders, count=permutations if permutations is None else int(permutations))
        with context.using(dataset, model) as inspector:
            result = position_bias(inspector, str(user_id or "").strip(), settings, system or BASE, spec)
        return (diagnostic_views.position_bias_markdown(result), diagnostic_views.position_heatmap(result),
                diagnostic_views.letter_bias_chart([result]), diagnostic_views.truth_rank_chart([result]),
                diagnostic_views.position_items_frame(result))

    @_user_errors
    def diagnose_position_bias_users(dataset: str, model: str, split: str, source: str, preset: str,
                                     strategy: str, text_field: str, count: int, seed: int, use_adapter_preset: bool,
                                     system: str, users: int = 20, orders: str = "rotations",
                                     permutations: int = 20,
                                     progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
        settings = settings_of(split, source, preset, strategy, text_field, count, seed, use_adapter_preset)
        spec = OrderSpec(mode=orders, count=permutations if permutations is None else int(permutations))
        chosen = first_users(dataset, users)
        results = []
        progress(0.0, desc="scoring")
        # One user's orders per lock hold, as Compare does, so Inspect requests interleave with a long run.
        for done, user_id in enumerate(chosen, 1):
            with context.using(dataset, model) as inspector:
                results.append(position_bias(inspector, user_id, settings, system or BASE, spec))
            progress(done / len(chosen), desc=f"scored {done} of {len(chosen)} users")
        summary = PositionBiasSummary(system or BASE, tuple(results))
        return (diagnostic_views.top1_share_chart([summary]), diagnostic_views.letter_bias_chart([summary]),
                diagnostic_views.position_summary_frame([summary]))

    @_user_errors
    def diagnose_letter_prior(dataset: str, model: str, split: str, source: str, preset: str, strategy: str,
                              text_field: str, count: int, seed: int, use_adapter_preset: bool, system: str,
                              users: int = 20, mode: str = "placeholder", placeholder: str = "item",
                              progress: gr.Progress = gr.Progress()) -> tuple[Any, Any]:  # noqa: B008
        settings = settings_of(split, source, preset, strategy, text_field, count, seed, use_adapter_preset)
        progress(0.0, desc="preparing prompts")
        with context.using(dataset, model) as inspector:
            prior = letter_prior(inspector, first_users(dataset, users), settings, system or BASE, mode,
                                 placeholder=placeholder,
                                 progress=lambda done, total: progress(done / total, desc=f"{done} of {total}"))
        return diagnostic_views.letter_prior_chart([prior]), diagnostic_views.letter_prior_frame([prior])

    @_user_errors
    def diagnose_history(dataset: str, model: str, split: str, source: str, preset: str, strategy: str,
                         text_field: str, count: int, seed: int, use_adapter_preset: bool, system: str,
                         user_id: str) -> tuple[Any, Any]:
        settings = settings_of(split, source, preset, strategy, text_field, count, seed, use_adapter_preset)
        with context.using(dataset, model) as inspector:
            result = history_influence(inspector, str(user_id or "").strip(), settings, system or BASE)
        return diagnostic_views.history_influence_chart(result), diagnostic_views.history_influence_table(result)

    @_user_errors
    def diagnose_template(model: str, preset: str, count: int) -> tuple[Any, Any, Any]:
        report = template_consistency(context.tokenizer(model), preset, count=int(count))
        return (diagnostic_views.template_markdown(report), diagnostic_views.template_tokens_frame(report),
                diagnostic_views.template_letters_frame(report))

    @_user_errors
    def diagnose_letter_mass(dataset: str, model: str, split: str, source: str, preset: str, strategy: str,
                             text_field: str, count: int, seed: int, use_adapter_preset: bool,
                             adapters: list[str] | None = None, users: int = 20,
                             progress: gr.Progress = gr.Progress()) -> tuple[Any, Any]:  # noqa: B008
        settings = settings_of(split, source, preset, strategy, text_field, count, seed, use_adapter_preset)
        systems = [BASE, *(name for name in dict.fromkeys(adapters or []) if name and name != BASE)]
        progress(0.0, desc="scoring")
        with context.using(dataset, model) as inspector:
            report = letter_mass(inspector, first_users(dataset, users), settings, systems,
                                 progress=lambda done, total: progress(done / total, desc=f"{done} of {total}"))
        return diagnostic_views.letter_mass_chart(report), diagnostic_views.letter_mass_frame(report)

    settings = controls.settings_inputs
    options = {"concurrency_limit": 1, "concurrency_id": "diagnose"}
    bias_button.click(diagnose_position_bias,
                      [*settings, system_box, controls.user, orders_box, permutations_box],
                      [bias_note, heatmap, letter_chart, rank_chart, bias_items],
                      api_name="diagnose_position_bias", **options)
    bias_users_button.click(diagnose_position_bias_users,
                            [*settings, system_box, bias_users, orders_box, permutations_box],
                            [top1_chart, mass_by_letter, bias_summary], api_name="diagnose_position_bias_users",
                            **options)
    prior_button.click(diagnose_letter_prior, [*settings, system_box, prior_users, prior_mode, placeholder_box],
                       [prior_chart, prior_table], api_name="diagnose_letter_prior", **options)
    history_button.click(diagnose_history, [*settings, system_box, controls.user], [history_chart, history_table],
                         api_name="diagnose_history", **options)
    template_button.click(diagnose_template, [controls.model, controls.preset, controls.count],
                          [template_note, template_tokens, template_letters], api_name="diagnose_template",
                          concurrency_limit=4, concurrency_id="template")
    mass_button.click(diagnose_letter_mass, [*settings, mass_adapters, mass_users], [mass_chart, mass_table],
                      api_name="diagnose_letter_mass", **options)

    def refresh_adapters(model: str) -> tuple[Any, Any]:
        return (gr.Dropdown(choices=_adapter_choices(context, model), value=BASE),
                gr.Dropdown(choices=context.adapter_names(model), value=[]))

    for trigger in (refresh.click, controls.model.input, demo.load):
        trigger(_user_errors(refresh_adapters), [controls.model], [system_box, mass_adapters],
                api_visibility="private")


# -- the app ------------------------------------------------------------------------------------

def build_app(context: AppContext) -> gr.Blocks:
    """The Blocks app over an already-built context (tests pass tiny models; main() the real ones)."""
    with gr.Blocks(title="Rerank Inspector") as demo:
        gr.Markdown("## Rerank Inspector\nEvery link of the letter-reranking chain: prompt → chat template → "
                    "letter token IDs → last-position logits → probabilities → ranking → metrics.")
        with gr.Tabs(selected="inspect") as tabs:
            with gr.Tab("Inspect", id="inspect"):
                controls, outputs, random_button = inspect_tab(context)
                inspect = wire_inspect(context, controls, outputs, random_button, demo)
            with gr.Tab("Compare", id="compare"):
                compare_adapters = compare_tab(context, controls, tabs, inspect, list(outputs.values()), demo)
            with gr.Tab("Fine-tune", id="finetune"):
                finetune_tab(context, controls, [controls.adapter, compare_adapters], demo)
            with gr.Tab("Data", id="data"):
                data_tab(context, [controls.dataset], demo)
            with gr.Tab("Diagnose", id="diagnose"):
                diagnose_tab(context, controls, demo)
    return demo


# -- command line -------------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Rerank Inspector web app")
    parser.add_argument("--model", metavar="PATH", action="append",
                        help="local model folder (safetensors); repeatable; the embedded SmolLM2-135M-Instruct "
                             "is always offered too")
    parser.add_argument("--data", metavar="PATH", help="dataset folder; the bundled sample is always offered too")
    parser.add_argument("--data-format", metavar="NAME", help=f"force the format of --data: {', '.join(FORMATS)}")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine "
                                                            "only; 0.0.0.0 serves the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help=f"require a login; or set ${AUTH_ENV}=user:password")
    parser.add_argument("--adapters-dir", metavar="PATH", help="adapters folder (default adapters/)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    parser.add_argument("--max-upload-mb", type=float, default=100.0, help="largest accepted upload file")
    parser.add_argument("--queue-size", type=int, default=64, help="requests waiting at most (default %(default)s)")
    return parser.parse_args(argv)


def _auth(value: str | None) -> tuple[str, str] | None:
    value = value or os.environ.get(AUTH_ENV)
    if not value:
        return None
    user, separator, password = value.partition(":")
    if not separator or not user or not password:
        raise SystemExit(f"--auth / ${AUTH_ENV} must look like user:password")
    return user, password


def build_context(args: argparse.Namespace) -> AppContext:
    """Load the datasets and the first model named on the command line (others load on first use)."""
    from rerank_core.adapters import adapters_root
    from rerank_core.models import ModelError, embedded_model_folder, load_model

    root = Path(__file__).resolve().parent
    config = AppConfig(adapters_root=adapters_root(args.adapters_dir), upload_root=root / "uploads",
                       runs_root=root / "runs", max_upload_bytes=int(args.max_upload_mb * 1024**2),
                       device=args.device, dtype=args.dtype)
    datasets = []
    if args.data:
        path = Path(args.data)
        datasets.append(DatasetEntry(path.name if path.is_dir() else path.parent.name,
                                     load_dataset(path, args.data_format), path))
    datasets.append(DatasetEntry(SAMPLE_DATASET, load_dataset(None), bundled_sample_path()))
    paths = list(args.model or [])
    try:
        paths.append(str(embedded_model_folder()))
    except ModelError as error:
        if not paths:
            raise
        log.warning("the embedded model is not offered: %s", error)
    models = []
    for path in dict.fromkeys(paths):
        name = Path(path).name
        if any(entry.name == name for entry in models):
            name = str(path)
        models.append(ModelEntry(name, path))
    models[0].loaded = load_model(models[0].path, device=args.device, dtype=args.dtype)
    jobs = JobRunner(config.runs_root, adapters=config.adapters_root)
    return AppContext(config, datasets, models, jobs=jobs)


def _limit_heap_arenas() -> None:
    """glibc gives each server thread a heap of its own and keeps what it frees: under 8 clients the app's RSS grew
    ~12% in a minute (bench/bench_load.py); with two shared heaps, under 9% and levelling off."""
    # Not glibc (macOS, musl): no mallopt, and their allocators need no such limit.
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).mallopt(-8, 2)  # -8 is glibc's M_ARENA_MAX


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           auth: tuple[str, str] | None = None, max_upload_bytes: int = 100 * 1024**2, queue_size: int = 64,
           block: bool = True) -> Any:
    """Serve with queue limits: scoring, comparisons, jobs and uploads each have their own concurrency group."""
    _limit_heap_arenas()
    demo.queue(default_concurrency_limit=2, max_size=queue_size)
    return demo.launch(server_name=host, server_port=port, share=share, auth=auth, css=views.APP_CSS,
                       theme=gr.themes.Soft(), max_file_size=max_upload_bytes, prevent_thread_lock=not block,
                       show_error=True, quiet=not block)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    auth = _auth(args.auth)
    context = build_context(args)
    launch(build_app(context), host=args.host, port=args.port, share=args.share, auth=auth,
           max_upload_bytes=context.config.max_upload_bytes, queue_size=args.queue_size)


if __name__ == "__main__":
    main()
