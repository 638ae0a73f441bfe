"""The Inspect tab: one user, every link of the chain from prompt to metrics, in one round trip."""

from __future__ import annotations

import threading
from typing import Any

import gradio as gr
from cachetools import LRUCache
from gradio.components.plot import PlotData

from rerank_app import own_model as own_model_controls
from rerank_app import plots, views
from rerank_app.context import AppContext
from rerank_app.pickers import PICKER_NAMES, PickerControls, Pickers, adapter_choices, endpoint, text_field_choices
from rerank_app.refusals import answer_or_keep, api_endpoint, page_io, remembered
from rerank_core.candidates import CANDIDATE_SOURCES, MAX_CANDIDATES
from rerank_core.data.item_text import item_text_choices
from rerank_core.inspector import BASE
from rerank_core.prompts import PRESETS
from rerank_core.report import inspection_report
from rerank_core.verbalizer import STRATEGIES

__all__ = ["CONTROL_NAMES", "OUTPUT_NAMES", "build", "cached_views", "change_dataset", "change_model", "inspect",
           "inspect_json", "inspect_page", "inspect_report", "random_user"]

# InspectView fields, in the order of the tab's output components.
OUTPUT_NAMES = ("summary", "history", "history_note", "candidates", "chart", "prompt", "tokens", "audit",
                "audit_note", "other_tokens")
SCORE_OPTIONS = {"concurrency_limit": 4, "concurrency_id": "score"}
# Side-by-side panels need this much width each; on a narrower window (800 px) they stack, so ids stay whole.
NARROW_COLUMN = 440
# Built views of cached inspections: a user already scored with the same settings (switching back, a repeated
# request) costs no table, figure or HTML building. Keyed by the inspection object itself (held in the entry,
# so its id stays unique): a re-scored inspection, e.g. after an adapter was retrained, is a new object.
# A built view is its figure, tables and token HTML: ~100 KB on the sample data, more on long prompts.
MAX_CACHED_VIEWS = 64
_VIEWS: LRUCache = LRUCache(MAX_CACHED_VIEWS)
_VIEWS_LOCK = threading.Lock()  # handlers run on several threads; the cache's bookkeeping is not thread-safe


def inspect(context: AppContext, pickers: Pickers, adapter: str, user_id: str,
            order: str = "letter") -> tuple[Any, ...]:
    """Everything the tab shows for one user, in OUTPUT_NAMES order."""
    inspection = context.inspections.inspect(pickers.dataset, pickers.model, adapter, user_id, pickers.settings())
    key = (id(inspection), pickers.dataset, pickers.model, order)
    with _VIEWS_LOCK:
        cached = _VIEWS.get(key)
    if cached is None or cached[0] is not inspection:
        view = views.inspect_view(inspection, context.datasets.get(pickers.dataset).dataset,
                                  context.models.tokenizer(pickers.model), model_name=pickers.model, order=order)
        cached = (inspection, _outputs(view))
        with _VIEWS_LOCK:
            _VIEWS[key] = cached
    return cached[1]


def _outputs(view: views.InspectView) -> tuple[Any, ...]:
    """The view in OUTPUT_NAMES order, the chart and the highlighted tables already in the form their components
    send: gradio would otherwise build a plotly Figure and render a pandas Styler for them on every request."""
    sent = {"chart": PlotData(type="plotly", plot=plots.plot_json(view.chart)),
            "candidates": view.candidates.payload(), "audit": view.audit.payload()}
    return tuple(sent.get(name, getattr(view, name)) for name in OUTPUT_NAMES)


def cached_views() -> tuple[int, int]:
    """Built views held, and their bound (the app's memory report)."""
    with _VIEWS_LOCK:
        return len(_VIEWS), MAX_CACHED_VIEWS


# The controls a refused request puts back to their last valid values, in the order of page_outputs().
CONTROL_NAMES = (*PICKER_NAMES, "adapter", "user")


def inspect_page(context: AppContext, pickers: Pickers, adapter: str, user_id: str, order: str = "letter",
                 last_valid: dict | None = None) -> tuple[Any, ...]:
    """The page's Inspect: a refused request keeps the previous results and puts every control back to its last
    valid value (refusals.answer_or_keep). Outputs: OUTPUT_NAMES, the remembered values, then CONTROL_NAMES."""
    valid = {**{name: getattr(pickers, name) for name in PICKER_NAMES}, "adapter": adapter, "user": user_id}
    return answer_or_keep(lambda: inspect(context, pickers, adapter, user_id, order), len(OUTPUT_NAMES), valid,
                          last_valid)


def inspect_json(context: AppContext, user_id: str, pickers: Pickers = Pickers(),  # noqa: B008 - frozen value
                 adapter: str = BASE) -> dict:
    """One user as plain JSON: the fields `python -m rerank_core show --format json` prints."""
    pickers = pickers.or_first(context)
    inspection = context.inspections.inspect(pickers.dataset, pickers.model, adapter, user_id, pickers.settings())
    return inspection.to_json(context.datasets.get(pickers.dataset).dataset)


def inspect_report(context: AppContext, pickers: Pickers, adapter: str, user_id: str) -> Any:
    """Everything the tab shows for one user as one self-contained HTML file, shown for download."""
    inspection = context.inspections.inspect(pickers.dataset, pickers.model, adapter, user_id, pickers.settings())
    document = inspection_report(inspection, context.datasets.get(pickers.dataset).dataset, model=pickers.model,
                                 special_tokens=context.models.tokenizer(pickers.model).all_special_tokens)
    return gr.File(views.write_report(document, f"inspect-{inspection.user_id}-{inspection.system}"), visible=True)


def random_user(context: AppContext, dataset: str) -> str:
    return context.datasets.random_user(dataset)


def change_dataset(context: AppContext, dataset: str) -> Any:
    return gr.Dropdown(choices=context.datasets.user_choices(dataset), value=context.datasets.users(dataset)[0])


def change_model(context: AppContext, model: str) -> Any:
    return gr.Dropdown(choices=adapter_choices(context, model), value=BASE)


def build(context: AppContext) -> tuple[PickerControls, list[Any], gr.Button]:
    """Lay out the pickers and the outputs; returns the pickers (other tabs read them) and the outputs."""
    dataset, model = context.datasets.names[0], context.models.names[0]
    defaults = Pickers()
    with gr.Row():
        # Custom values allowed where choices grow at run time (uploads, new adapters); the server validates.
        dataset_box = gr.Dropdown(context.datasets.names, value=dataset, label="Dataset", scale=2,
                                  allow_custom_value=True)
        model_box = gr.Dropdown(context.models.names, value=model, label="Model", scale=2)
        adapter_box = gr.Dropdown(adapter_choices(context, model), value=BASE, label="Adapter (from adapters/)",
                                  scale=2, allow_custom_value=True, elem_id="adapter-picker")
        split_box = gr.Radio(["test", "validation"], value=defaults.split, label="Split", scale=1)
    own_model = own_model_controls.build()
    with gr.Row():
        source_box = gr.Dropdown(list(CANDIDATE_SOURCES), value=defaults.source, label="Candidate source")
        preset_box = gr.Dropdown(list(PRESETS), value=defaults.preset, label="Prompt preset")
        kwargs_box = gr.Textbox(defaults.template_kwargs, label="Chat-template options (JSON)",
                                placeholder='{"enable_thinking": false}', elem_id="template-kwargs", max_lines=1)
        strategy_box = gr.Dropdown(list(STRATEGIES), value=defaults.strategy, label="Verbalizer strategy")
        # A named text, one of the dataset's fields or any spec typed in (title+year+genres+count): the core checks it.
        text_box = gr.Dropdown(item_text_choices(context.datasets.get(dataset).dataset.item_fields),
                               value=defaults.text_field, label="Item text (fields joined by +)",
                               allow_custom_value=True)
        count_box = gr.Slider(2, MAX_CANDIDATES, value=defaults.count, step=1, label="Candidates",
                              elem_id="candidates-count")
    with gr.Accordion("More settings", open=False), gr.Row():
        seed_box = gr.Number(defaults.seed, precision=0, label="Candidate seed (0-4294967295)",
                             elem_id="candidate-seed")
        adapter_preset_box = gr.Checkbox(defaults.use_adapter_preset,
                                         label="Score an adapter with the preset it was trained with")
    with gr.Row(equal_height=True):
        user_box = gr.Dropdown(context.datasets.user_choices(dataset), value=context.datasets.users(dataset)[0],
                               label="User (type to search by id)", filterable=True, allow_custom_value=True,
                               scale=4, elem_id="user-picker")
        random_button = gr.Button("Random user", scale=1, elem_id="random-user")
        report_button = gr.Button("Download report", scale=1, elem_id="inspect-report-button")
    report_file = gr.File(label="Report (HTML, opens offline)", elem_id="inspect-report", visible=False)
    summary = gr.Markdown(label="Summary", elem_id="inspect-summary")
    with gr.Row():
        with gr.Column(scale=1, min_width=NARROW_COLUMN):
            order_box = gr.Radio(list(views.CHART_ORDERS), value="letter", label="Order bars by",
                                 elem_id="chart-order")
            chart = gr.Plot(label="Letter probabilities", elem_id="letter-chart")
        with gr.Column(scale=1, min_width=NARROW_COLUMN):
            candidates = gr.Dataframe(wrap=True,
                                      label="Candidates (★ = ground truth)", interactive=False, max_height=420,
                                      column_widths=["14%", "12%", "36%", "10%", "15%", "13%"],
                                      elem_id="candidates-table")
    with gr.Row():
        with gr.Column(min_width=NARROW_COLUMN):
            history_note = gr.Markdown(label="History note")
            history = gr.Dataframe(wrap=True, label="History", interactive=False, max_height=360,
                                   column_widths=["8%", "14%", "58%", "20%"], elem_id="history-table")
        with gr.Column(min_width=NARROW_COLUMN):
            audit_note = gr.Markdown(label="Audit note", elem_id="audit-note")
            audit = gr.Dataframe(wrap=True, label="Letter audit", interactive=False, max_height=360,
                                 column_widths=["14%", "10%", "9%", "17%", "12%", "38%"],
                                 elem_id="audit-table")
    with gr.Row():
        with gr.Column(scale=3, min_width=NARROW_COLUMN), gr.Tabs():
            with gr.Tab("Rendered prompt (whitespace and special tokens visible)"):
                prompt = gr.HTML(label="Rendered prompt", elem_id="rendered-prompt")
            with gr.Tab("Tokens with IDs"):
                tokens = gr.HTML(label="Tokens", elem_id="token-view")
        with gr.Column(scale=1, min_width=NARROW_COLUMN):
            other_tokens = gr.Dataframe(wrap=True, label="Top non-letter next tokens", interactive=False,
                                        column_widths=["24%", "24%", "20%", "32%"])
    controls = PickerControls(dataset_box, model_box, split_box, source_box, preset_box, strategy_box, text_box,
                              count_box, seed_box, adapter_preset_box, kwargs_box, adapter_box, user_box, order_box,
                              report_button, report_file, own_model)
    components = {"summary": summary, "history": history, "history_note": history_note, "candidates": candidates,
                  "chart": chart, "prompt": prompt, "tokens": tokens, "audit": audit, "audit_note": audit_note,
                  "other_tokens": other_tokens}
    return controls, [components[name] for name in OUTPUT_NAMES], random_button


def inputs(controls: PickerControls) -> list[Any]:
    """The inspect handler's inputs, in its argument order."""
    return [*controls.pickers, controls.adapter, controls.user, controls.order]


def wire(context: AppContext, controls: PickerControls, outputs: list[Any], random_button: gr.Button,
         demo: gr.Blocks) -> None:
    """Every picker re-scores in one round trip."""
    handler = endpoint(inspect, context)
    arguments = inputs(controls)
    # The page's own events keep the last answered controls, to restore them after a refused request.
    restorable = {name: getattr(controls, name) for name in CONTROL_NAMES}
    page = endpoint(inspect_page, context)
    page_inputs, page_outputs = page_io(remembered(restorable), arguments, outputs, list(restorable.values()))
    # The same handler as the UI's, with named parameters for gradio_client.
    api_endpoint(handler, arguments, outputs, "inspect", **SCORE_OPTIONS)
    on_page = {"api_visibility": "private", **SCORE_OPTIONS}
    for box in (controls.split, controls.source, controls.preset, controls.strategy, controls.text_field,
                controls.adapter, controls.use_adapter_preset, controls.user, controls.order):
        box.input(page, page_inputs, page_outputs, **on_page)
    controls.count.release(page, page_inputs, page_outputs, **on_page)
    # Enter in a text or number box, and leaving it, both re-score.
    for box in (controls.seed, controls.template_kwargs):
        box.submit(page, page_inputs, page_outputs, **on_page)
        box.blur(page, page_inputs, page_outputs, **on_page)
    # The API's events take the values as sent (refusals.api_endpoint says why).
    random_button.click(endpoint(random_user, context), [controls.dataset], [controls.user],
                        api_name="random_user", preprocess=False).then(page, page_inputs, page_outputs, **on_page)
    # .change, not .input: a dataset selected by an upload offers its own fields too.
    controls.dataset.change(endpoint(text_field_choices, context), [controls.dataset], [controls.text_field],
                            api_visibility="private")
    controls.dataset.input(endpoint(change_dataset, context), [controls.dataset], [controls.user],
                           api_visibility="private").then(page, page_inputs, page_outputs, **on_page)
    controls.model.input(endpoint(change_model, context), [controls.model], [controls.adapter],
                         api_visibility="private").then(page, page_inputs, page_outputs, **on_page)
    # A model or template added beside the picker is selected, then followed up as a picked one.
    own_model_controls.wire(context, controls.own_model, controls.model,
                            [controls.preset, controls.template_kwargs, controls.strategy],
                            [(endpoint(change_model, context), [controls.model], [controls.adapter],
                              {"api_visibility": "private"}), (page, page_inputs, page_outputs, on_page)])
    demo.load(page, page_inputs, page_outputs, **on_page)
    controls.report_button.click(endpoint(inspect_report, context), arguments[:-1], [controls.report_file],
                                 api_name="inspect_report", preprocess=False, **SCORE_OPTIONS)
    gr.api(endpoint(inspect_json, context), api_name="inspect_json", **SCORE_OPTIONS)
