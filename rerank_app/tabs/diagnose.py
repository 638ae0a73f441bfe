"""The Diagnose tab: position bias, letter prior, history influence, template consistency and letter mass."""

from __future__ import annotations

from typing import Any

import gradio as gr

from rerank_app import diagnostic_views, views
from rerank_app.context import AppContext
from rerank_app.pickers import PickerControls, Pickers, adapter_choices, endpoint
from rerank_app.refusals import answer_or_keep, remembered, serve
from rerank_core.diagnostics import ORDER_MODES, PRIOR_MODES, OrderSpec, tables
from rerank_core.inspector import BASE

__all__ = [
    "build",
    "diagnose_history",
    "diagnose_letter_mass",
    "diagnose_letter_prior",
    "diagnose_position_bias",
    "diagnose_position_bias_users",
    "diagnose_template",
    "history_page",
    "letter_mass_page",
    "letter_prior_page",
    "position_bias_page",
    "position_bias_users_page",
    "refresh_adapters",
    "stop_runs",
    "template_page",
]


def _order_spec(orders: str, permutations: int | None) -> OrderSpec:
    return OrderSpec(mode=orders, count=permutations)


def _reporter(progress: Any) -> Any:
    return lambda done, total: progress(done / total, desc=f"{done} of {total}")


def _session(request: gr.Request | None) -> str | None:
    return getattr(request, "session_hash", None)


def diagnose_position_bias(context: AppContext, pickers: Pickers, system: str, user_id: str,
                           orders: str = "rotations", permutations: int = 20, request: gr.Request = None,
                           progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
    """One user's candidates in other orders: note, heatmap, letter and rank charts, items table."""
    progress(0.0, desc="scoring")
    with context.stops.run(_session(request)) as stop:
        result = context.inspections.position_bias(pickers.dataset, pickers.model, system, user_id, pickers.settings(),
                                       _order_spec(orders, permutations), progress=_reporter(progress), stop=stop)
    return (diagnostic_views.position_bias_markdown(result), diagnostic_views.position_heatmap(result),
            diagnostic_views.letter_bias_chart([result]), diagnostic_views.truth_rank_chart([result]),
            tables.position_items_frame(result))


def diagnose_position_bias_users(context: AppContext, pickers: Pickers, system: str, users: int = 20,
                                 orders: str = "rotations", permutations: int = 20, request: gr.Request = None,
                                 progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
    """Position bias over the first N users: top-1 positions, probability by letter, summary row."""
    progress(0.0, desc="scoring")
    with context.stops.run(_session(request)) as stop:
        summary = context.inspections.position_bias_users(
            pickers.dataset, pickers.model, system, users, pickers.settings(), _order_spec(orders, permutations),
            progress=lambda done, total: progress(done / total, desc=f"scored {done} of {total} users"), stop=stop)
    return (diagnostic_views.top1_share_chart([summary]), diagnostic_views.letter_bias_chart([summary]),
            tables.position_summary_frame([summary]))


def diagnose_letter_prior(context: AppContext, pickers: Pickers, system: str, users: int = 20,
                          mode: str = "placeholder", placeholder: str = "item", request: gr.Request = None,
                          progress: gr.Progress = gr.Progress()) -> tuple[Any, Any]:  # noqa: B008
    progress(0.0, desc="preparing prompts")
    with context.stops.run(_session(request)) as stop:
        prior = context.inspections.letter_prior(pickers.dataset, pickers.model, system, users, pickers.settings(),
                                                 mode, placeholder, progress=_reporter(progress), stop=stop)
    return diagnostic_views.letter_prior_chart([prior]), tables.letter_prior_frame([prior])


def diagnose_history(context: AppContext, pickers: Pickers, system: str, user_id: str,
                     request: gr.Request = None) -> tuple[Any, Any]:
    with context.stops.run(_session(request)) as stop:
        result = context.inspections.history_influence(pickers.dataset, pickers.model, system, user_id,
                                                       pickers.settings(), stop=stop)
    return diagnostic_views.history_influence_chart(result), diagnostic_views.history_influence_table(result)


def diagnose_template(context: AppContext, model: str, preset: str, count: int,
                      template_kwargs: str = "") -> tuple[Any, Any, Any]:
    report = context.inspections.template_consistency(model, preset, count, template_kwargs)
    return (diagnostic_views.template_markdown(report, context.models.tokenizer(model)),
            tables.template_tokens_frame(report), tables.template_letters_frame(report))


def diagnose_letter_mass(context: AppContext, pickers: Pickers, adapters: list[str] | None = None, users: int = 20,
                         request: gr.Request = None,
                         progress: gr.Progress = gr.Progress()) -> tuple[Any, Any]:  # noqa: B008
    progress(0.0, desc="scoring")
    with context.stops.run(_session(request)) as stop:
        report = context.inspections.letter_mass(pickers.dataset, pickers.model, adapters, users, pickers.settings(),
                                     progress=_reporter(progress), stop=stop)
    return diagnostic_views.letter_mass_chart(report), tables.letter_mass_frame(report)


# The page's events: a refused section keeps its previous outputs and puts the tab's controls it read back to their
# last valid values (refusals.answer_or_keep). Outputs: the section's, the remembered values, then the controls
# named in the call, in that order. Control names are the tab's, so sections sharing the system picker share it.

def position_bias_page(context: AppContext, pickers: Pickers, system: str, user_id: str, orders: str = "rotations",
                       permutations: int = 20, last_valid: dict | None = None, request: gr.Request = None,
                       progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
    return answer_or_keep(
        lambda: diagnose_position_bias(context, pickers, system, user_id, orders, permutations, request, progress),
        5, {"system": system, "orders": orders, "permutations": permutations}, last_valid)


def position_bias_users_page(context: AppContext, pickers: Pickers, system: str, users: int = 20,
                             orders: str = "rotations", permutations: int = 20, last_valid: dict | None = None,
                             request: gr.Request = None,
                             progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
    return answer_or_keep(
        lambda: diagnose_position_bias_users(context, pickers, system, users, orders, permutations, request,
                                             progress),
        3, {"system": system, "bias_users": users, "orders": orders, "permutations": permutations}, last_valid)


def letter_prior_page(context: AppContext, pickers: Pickers, system: str, users: int = 20, mode: str = "placeholder",
                      placeholder: str = "item", last_valid: dict | None = None, request: gr.Request = None,
                      progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
    return answer_or_keep(
        lambda: diagnose_letter_prior(context, pickers, system, users, mode, placeholder, request, progress),
        2, {"system": system, "prior_users": users, "prior_mode": mode, "placeholder": placeholder}, last_valid)


def history_page(context: AppContext, pickers: Pickers, system: str, user_id: str, last_valid: dict | None = None,
                 request: gr.Request = None) -> tuple[Any, ...]:
    return answer_or_keep(lambda: diagnose_history(context, pickers, system, user_id, request), 2,
                          {"system": system}, last_valid)


def template_page(context: AppContext, model: str, preset: str, count: int, template_kwargs: str = "",
                  last_valid: dict | None = None) -> tuple[Any, ...]:
    """Its inputs are the Inspect tab's controls, which Inspect itself puts back: nothing to restore here."""
    return answer_or_keep(lambda: diagnose_template(context, model, preset, count, template_kwargs), 3, {},
                          last_valid)


def letter_mass_page(context: AppContext, pickers: Pickers, adapters: list[str] | None = None, users: int = 20,
                     last_valid: dict | None = None, request: gr.Request = None,
                     progress: gr.Progress = gr.Progress()) -> tuple[Any, ...]:  # noqa: B008
    return answer_or_keep(lambda: diagnose_letter_mass(context, pickers, adapters, users, request, progress), 2,
                          {"mass_adapters": adapters, "mass_users": users}, last_valid)


def stop_runs(context: AppContext, request: gr.Request = None) -> str:
    """The Stop button, and a page that closes: every long run of this browser session stops at its next chunk."""
    stopped = context.stops.stop(_session(request))
    return f"Stop requested for {stopped} running job(s)." if stopped else "Nothing is running."


def refresh_adapters(context: AppContext, model: str) -> tuple[Any, Any]:
    return (gr.Dropdown(choices=adapter_choices(context, model), value=BASE),
            gr.Dropdown(choices=context.models.adapter_names(model), value=[]))


def build(context: AppContext, controls: PickerControls, demo: gr.Blocks) -> tuple[gr.Dropdown, gr.Dropdown]:
    """Lay out and wire the tab; each section runs on its own button. Returns the system and adapters pickers."""
    model = context.models.names[0]
    max_users = context.config.max_compare_users
    gr.Markdown("Uses the dataset, model, prompt settings and user chosen in the **Inspect** tab. "
                "Each section runs on its own button; a long run shows its progress, and Stop (or closing the "
                "page) ends it at the next chunk.")
    with gr.Row():
        stop_button = gr.Button("Stop running diagnostics", variant="stop", scale=1, elem_id="diagnose-stop")
        stop_note = gr.Markdown(elem_id="diagnose-stop-note")
    with gr.Row():
        system_box = gr.Dropdown(adapter_choices(context, model), value=BASE, allow_custom_value=True, scale=4,
                                 label="System for position bias, letter prior and history influence",
                                 elem_id="diagnose-system")
        refresh = gr.Button("↻ Refresh adapters", scale=1)

    gr.Markdown("### 1. Position bias: the same candidates in other orders")
    with gr.Row():
        orders_box = gr.Radio(list(ORDER_MODES), value="rotations", label="Candidate orders", scale=2)
        permutations_box = gr.Number(20, precision=0, label="Orders (permutations mode only, 1-200)", scale=1,
                                     elem_id="diagnose-orders")
        bias_button = gr.Button("Run on the Inspect tab's user", variant="primary", scale=1)
    bias_note = gr.Markdown(elem_id="diagnose-bias-note")
    heatmap = gr.Plot(label="Probability of each item at each letter", elem_id="diagnose-heatmap")
    with gr.Row():
        letter_chart = gr.Plot(label="Probability by letter position")
        rank_chart = gr.Plot(label="Ground-truth rank over orders")
    bias_items = gr.Dataframe(wrap=True, label="Items: as shown vs debiased", interactive=False, max_height=360)
    with gr.Row():
        bias_users = gr.Slider(1, max_users, value=min(20, max_users), step=1, scale=4,
                               label="Users (the first N of the dataset)", elem_id="diagnose-bias-users",
                               elem_classes=views.enter_clicks("diagnose-bias-users-button"))
        bias_users_button = gr.Button("Run on N users", variant="primary", scale=1,
                                      elem_id="diagnose-bias-users-button")
    with gr.Row():
        top1_chart = gr.Plot(label="Where the top-1 stands")
        mass_by_letter = gr.Plot(label="Probability by letter position over users")
    bias_summary = gr.Dataframe(wrap=True, label="Position bias per system", interactive=False)

    gr.Markdown("### 2. Letter prior: candidate texts hidden")
    with gr.Row():
        prior_mode = gr.Radio(list(PRIOR_MODES), value="placeholder", label="Candidate texts", scale=2)
        placeholder_box = gr.Textbox("item", label="Placeholder word", scale=2)
        prior_users = gr.Slider(1, max_users, value=min(20, max_users), step=1, label="Users", scale=3,
                                elem_id="diagnose-prior-users",
                                elem_classes=views.enter_clicks("diagnose-prior-button"))
        prior_button = gr.Button("Run letter prior", variant="primary", scale=1, elem_id="diagnose-prior-button")
    with gr.Row():
        prior_chart = gr.Plot(label="Letter prior", elem_id="diagnose-prior-chart")
        prior_table = gr.Dataframe(wrap=True, label="Letter prior per letter", interactive=False, max_height=360)

    gr.Markdown("### 3. History influence: leave one history item out")
    history_button = gr.Button("Run on the Inspect tab's user", variant="primary")
    with gr.Row():
        history_chart = gr.Plot(label="Influence of each history item")
        history_table = gr.Dataframe(wrap=True, label="History (most influential rows highlighted)", interactive=False,
                                     max_height=360, elem_id="diagnose-history-table")

    gr.Markdown("### 4. Template consistency: inference prompt vs training conversation (no model run)")
    template_button = gr.Button("Check the Inspect tab's model and preset", variant="primary")
    template_note = gr.Markdown(elem_id="diagnose-template-note")
    with gr.Row():
        template_tokens = gr.Dataframe(wrap=True, label="Tokens around the end of the prompt or the first difference",
                                       interactive=False, max_height=360)
        template_letters = gr.Dataframe(wrap=True, label="Letter tokens", interactive=False, max_height=360)

    gr.Markdown("### 5. Letter mass: the letters' share of the full-vocabulary probability")
    with gr.Row():
        mass_adapters = gr.Dropdown(context.models.adapter_names(model), value=[], multiselect=True, max_choices=3,
                                    allow_custom_value=True, label="Adapters beside the base (up to 3)", scale=3)
        mass_users = gr.Slider(1, max_users, value=min(20, max_users), step=1, label="Users", scale=3,
                               elem_classes=views.enter_clicks("diagnose-mass-button"))
        mass_button = gr.Button("Run letter mass", variant="primary", scale=1, elem_id="diagnose-mass-button")
    with gr.Row():
        mass_chart = gr.Plot(label="Letter mass per user")
        mass_table = gr.Dataframe(wrap=True, label="Letter mass per system", interactive=False)

    pickers = controls.pickers
    options = {"concurrency_limit": 1, "concurrency_id": "diagnose"}
    last_valid = remembered({"system": system_box, "orders": orders_box, "permutations": permutations_box,
                             "bias_users": bias_users, "prior_users": prior_users, "prior_mode": prior_mode,
                             "placeholder": placeholder_box, "mass_adapters": mass_adapters, "mass_users": mass_users})

    def section(handler: Any, page: Any, triggers: list[Any], inputs: list[Any], outputs: list[Any],
                restorable: list[Any], api_name: str, **section_options: Any) -> None:
        serve(endpoint(handler, context), endpoint(page, context), triggers, last_valid, inputs, outputs, restorable,
              api_name, **section_options)

    # Scripts get the plain handlers (a refusal raises); the page keeps its results on a refusal.
    # Enter in a box runs its section, as its button does.
    section(diagnose_position_bias, position_bias_page, [bias_button.click, permutations_box.submit],
            [*pickers, system_box, controls.user, orders_box, permutations_box],
            [bias_note, heatmap, letter_chart, rank_chart, bias_items], [system_box, orders_box, permutations_box],
            "diagnose_position_bias", **options)
    section(diagnose_position_bias_users, position_bias_users_page, [bias_users_button.click],
            [*pickers, system_box, bias_users, orders_box, permutations_box],
            [top1_chart, mass_by_letter, bias_summary], [system_box, bias_users, orders_box, permutations_box],
            "diagnose_position_bias_users", **options)
    section(diagnose_letter_prior, letter_prior_page, [prior_button.click, placeholder_box.submit],
            [*pickers, system_box, prior_users, prior_mode, placeholder_box], [prior_chart, prior_table],
            [system_box, prior_users, prior_mode, placeholder_box], "diagnose_letter_prior", **options)
    section(diagnose_history, history_page, [history_button.click], [*pickers, system_box, controls.user],
            [history_chart, history_table], [system_box], "diagnose_history", **options)
    section(diagnose_template, template_page, [template_button.click],
            [controls.model, controls.preset, controls.count, controls.template_kwargs],
            [template_note, template_tokens, template_letters], [], "diagnose_template", concurrency_limit=4,
            concurrency_id="template")
    section(diagnose_letter_mass, letter_mass_page, [mass_button.click], [*pickers, mass_adapters, mass_users],
            [mass_chart, mass_table], [mass_adapters, mass_users], "diagnose_letter_mass", **options)

    stopper = endpoint(stop_runs, context)
    stop_button.click(stopper, None, [stop_note], api_name="stop_diagnostics", concurrency_id="stop",
                      concurrency_limit=None)
    refresher = endpoint(refresh_adapters, context)
    for trigger in (refresh.click, controls.model.input, demo.load):
        trigger(refresher, [controls.model], [system_box, mass_adapters], api_visibility="private")
    return system_box, mass_adapters
