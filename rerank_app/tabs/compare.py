"""The Compare tab: base plus up to three adapters, on one user side by side and on N users with paired CIs."""

from __future__ import annotations

from typing import Any

import gradio as gr

from rerank_app import views
from rerank_app.context import AppContext
from rerank_app.pickers import PickerControls, Pickers, adapter_choices, endpoint
from rerank_app.refusals import answer_or_keep, remembered, serve
from rerank_app.tabs import inspect as inspect_tab
from rerank_app.views import write_report
from rerank_core.compare import adapter_notes, system_of
from rerank_core.metrics import candidate_recall
from rerank_core.report import comparison_report

__all__ = ["COMPARE_OUTPUTS", "build", "compare", "compare_page", "compare_report", "compare_user", "compare_user_page",
           "open_user", "refresh_adapters", "select_row", "stop_runs"]

# Outputs of compare(): counts, metrics, differences, scatter, movers and the movers' opener.
COMPARE_OUTPUTS = 6


def compare_user(context: AppContext, pickers: Pickers, adapters: list[str], user_id: str) -> tuple[Any, Any]:
    """Grouped letter bars and the truth's rank per system, for the Inspect tab's user."""
    inspections = context.inspections.compare_user(pickers.dataset, pickers.model, adapters, user_id,
                                                   pickers.settings())
    return views.compare_user_chart(inspections), views.compare_user_table(inspections)


def compare(context: AppContext, pickers: Pickers, adapters: list[str], users: int, request: gr.Request = None,
            progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008 - Gradio's idiom
    """Metrics, paired differences, scatter and movers over the first N users; the movers fill the opener.

    Stop (or closing the page) ends the run at the next chunk of users."""
    progress(0.0, desc="scoring")
    settings = pickers.settings()
    # Resolved once: the same systems (and their notes) are scored, cached and explained.
    systems = context.inspections.resolve_systems(pickers.dataset, pickers.model, adapters, settings)
    with context.stops.run(getattr(request, "session_hash", None)) as stop:
        per_user, summary = context.inspections.compare_users(
            pickers.dataset, pickers.model, systems, settings, users,
            progress=lambda done, total: progress(done / total, desc=f"scored {done} of {total}"), stop=stop)
    view = views.compare_view(per_user, summary, recall=candidate_recall(
        per_user, settings.candidates.source, settings.candidates.count))
    counts = "\n\n".join([view.counts, *(f"ℹ {note}" for note in adapter_notes(systems))])
    # A run label such as "base @ seed_after" opens its system (the base) in Inspect.
    choices = [(f"{row['user_id']} · {row['system']} · {row['change']}", f"{row['user_id']}|{system_of(row['system'])}")
               for row in view.movers.to_dict(orient="records")]
    return (counts, view.metrics, view.differences, view.scatter, view.movers,
            gr.Dropdown(choices=choices, value=choices[0][1] if choices else None))


def compare_user_page(context: AppContext, pickers: Pickers, adapters: list[str], user_id: str,
                      last_valid: dict | None = None) -> tuple[Any, ...]:
    """The page's one-user Compare: a refused request keeps the previous chart and table and puts the adapters
    back (refusals.answer_or_keep). Outputs: chart, table, the remembered values, the adapters."""
    return answer_or_keep(lambda: compare_user(context, pickers, adapters, user_id), 2, {"adapters": adapters},
                          last_valid)


def compare_page(context: AppContext, pickers: Pickers, adapters: list[str], users: int,
                 last_valid: dict | None = None, request: gr.Request = None,
                 progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008 - Gradio's idiom
    """The page's Compare on N users: a refused or stopped run keeps the previous results; a refused one puts the
    adapters and the user count back (refusals.answer_or_keep). Outputs: compare()'s, the remembered values, the
    adapters, the users."""
    return answer_or_keep(lambda: compare(context, pickers, adapters, users, request, progress), COMPARE_OUTPUTS,
                          {"adapters": adapters, "users": users}, last_valid)


def compare_report(context: AppContext, pickers: Pickers, adapters: list[str], users: int) -> Any:
    """The comparison (cached after a run) as one self-contained HTML file, shown for download."""
    per_user, summary = context.inspections.compare_users(pickers.dataset, pickers.model, adapters, pickers.settings(),
                                                          users)
    path = write_report(comparison_report(per_user, summary, pickers.settings(), dataset=pickers.dataset,
                                          model=pickers.model), f"compare-{pickers.dataset}-{int(users)}-users")
    return gr.File(path, visible=True)


def stop_runs(context: AppContext, request: gr.Request = None) -> str:
    """This page's long runs stop at their next chunk."""
    stopped = context.stops.stop(getattr(request, "session_hash", None))
    return f"Stop requested for {stopped} running job(s)." if stopped else "Nothing is running."


def refresh_adapters(context: AppContext, model: str) -> tuple[Any, Any]:
    """Built once, the page would miss adapters published since (by the CLI, or before a reload)."""
    return (gr.Dropdown(choices=adapter_choices(context, model)),
            gr.Dropdown(choices=context.models.adapter_names(model)))


def open_user(choice: str) -> tuple[Any, Any, Any]:
    """A mover ("user|system") opened in the Inspect tab."""
    if not choice or "|" not in choice:
        raise gr.Error("run the comparison first, then pick a user to open")
    user_id, system = choice.split("|", 1)
    return gr.Dropdown(value=user_id), gr.Dropdown(value=system), gr.Tabs(selected="inspect")


def select_row(event: gr.SelectData, table: Any) -> tuple[Any, Any, Any]:
    row = table.iloc[event.index[0]]
    return open_user(f"{row['user_id']}|{system_of(row['system'])}")


def build(context: AppContext, controls: PickerControls, tabs: gr.Tabs, inspect_outputs: list[Any],
          demo: gr.Blocks) -> gr.Dropdown:
    """Lay out and wire the tab; returns its adapter picker, which a finished fine-tune refreshes."""
    gr.Markdown("Uses the dataset, model, prompt settings and user chosen in the **Inspect** tab. On many users "
                "the baselines (**random**: a random order's expected value, **popularity**: training-part "
                "interaction counts, **retriever**: the co-occurrence retriever's order) rank the same "
                "candidates: does the model beat them?")
    with gr.Row():
        adapters_box = gr.Dropdown(context.models.adapter_names(context.models.names[0]), value=[], multiselect=True,
                                   max_choices=3, allow_custom_value=True,
                                   label="Adapters to compare with the base (up to 3)", scale=4,
                                   elem_id="compare-adapters")
        refresh = gr.Button("↻ Refresh adapters", scale=1)
    with gr.Row():
        one_button = gr.Button("Compare on the Inspect tab's user", variant="primary")
    user_chart = gr.Plot(label="Letter probabilities per system", elem_id="compare-user-chart")
    empty = views.empty_compare_tables()
    user_table = gr.Dataframe(wrap=True, value=empty["user"], column_widths=["16%", "11%", "9%", "9%", "9%", "46%"],
                              label="Rank of the ground truth and top-3 per system", interactive=False)
    gr.Markdown("### On many users")
    with gr.Row():
        count_box = gr.Slider(10, context.config.max_compare_users, value=min(100, context.config.max_compare_users),
                              step=10, label="Users (the first N of the dataset)", scale=4, elem_id="compare-users",
                              elem_classes=views.enter_clicks("compare-run-many"))
        many_button = gr.Button("Run on N users", variant="primary", scale=1, elem_id="compare-run-many")
        stop_button = gr.Button("Stop", variant="stop", scale=1, elem_id="compare-stop")
        report_button = gr.Button("Download report", scale=1, elem_id="compare-report-button")
    stop_note = gr.Markdown(elem_id="compare-stop-note")
    report_file = gr.File(label="Report (HTML, opens offline)", elem_id="compare-report", visible=False)
    counts = gr.Markdown(label="Improved / unchanged / worsened")
    metrics = gr.Dataframe(wrap=True, value=empty["metrics"], label="Metrics per system", interactive=False)
    differences = gr.Dataframe(wrap=True, value=empty["differences"],
                               label="Paired difference to the base (95% bootstrap CI)", interactive=False,
                               max_height=360)
    with gr.Row():
        scatter = gr.Plot(label="Ground-truth probability: base vs adapter", elem_id="compare-scatter")
        with gr.Column():
            movers = gr.Dataframe(wrap=True, value=empty["movers"],
                                  label="Most improved and most worsened users (select a row to open it)",
                                  interactive=False, max_height=360)
            with gr.Row():
                open_box = gr.Dropdown([], label="Open in Inspect", scale=3)
                open_button = gr.Button("Open", scale=1)

    base_inputs = [*controls.pickers, adapters_box]
    # Scripts get the plain handlers (a refusal raises); the page's buttons keep the page on a refusal.
    last_valid = remembered({"adapters": adapters_box, "users": count_box})
    serve(endpoint(compare_user, context), endpoint(compare_user_page, context), [one_button.click], last_valid,
          [*base_inputs, controls.user], [user_chart, user_table], [adapters_box], "compare_user",
          concurrency_limit=4, concurrency_id="score")
    serve(endpoint(compare, context), endpoint(compare_page, context), [many_button.click], last_valid,
          [*base_inputs, count_box], [counts, metrics, differences, scatter, movers, open_box],
          [adapters_box, count_box], "compare", concurrency_limit=1, concurrency_id="compare")
    stop_button.click(endpoint(stop_runs, context), None, [stop_note], api_name="stop_compare",
                      concurrency_id="stop", concurrency_limit=None)
    report_button.click(endpoint(compare_report, context), [*base_inputs, count_box], [report_file],
                        api_name="compare_report", concurrency_limit=1, concurrency_id="compare",
                        preprocess=False)  # as refusals.api_endpoint: the core names a bad field
    refresher = endpoint(refresh_adapters, context)
    refresh.click(refresher, [controls.model], [controls.adapter, adapters_box], api_visibility="private")
    demo.load(refresher, [controls.model], [controls.adapter, adapters_box], api_visibility="private")

    inspect = endpoint(inspect_tab.inspect, context)
    opened = [controls.user, controls.adapter, tabs]
    open_button.click(open_user, [open_box], opened, api_visibility="private").then(
        inspect, inspect_tab.inputs(controls), inspect_outputs, api_visibility="private")
    movers.select(select_row, [movers], opened, api_visibility="private").then(
        inspect, inspect_tab.inputs(controls), inspect_outputs, api_visibility="private")
    return adapters_box
