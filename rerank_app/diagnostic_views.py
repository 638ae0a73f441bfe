"""The diagnostics as the app shows them: plotly figures, Markdown and styled tables over rerank_core results."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import plotly.graph_objects as go
from pandas.io.formats.style import Styler

from rerank_app.plots import add_uniform_line, with_layout
from rerank_core.diagnostics import (
    HistoryInfluence,
    LetterMass,
    LetterPrior,
    PositionBias,
    PositionBiasSummary,
)
from rerank_core.diagnostics.tables import history_influence_frame
from rerank_core.figures import BAR_COLOR, CHART_HEIGHT, INFLUENTIAL_COLOR, letter_ticks, system_color
from rerank_core.template_check import TemplateConsistency

__all__ = [
    "history_influence_chart",
    "history_influence_table",
    "letter_bias_chart",
    "letter_mass_chart",
    "letter_prior_chart",
    "position_bias_markdown",
    "position_heatmap",
    "template_markdown",
    "template_runs_html",
    "top1_share_chart",
    "truth_rank_chart",
]

_INFLUENTIAL_ROW = "background-color: #ffc9c9; font-weight: 600"
_TEXT_WIDTH = 42


def _short(text: str) -> str:
    return text if len(text) <= _TEXT_WIDTH else text[:_TEXT_WIDTH - 1] + "…"


# -- position bias ------------------------------------------------------------------------------


def position_heatmap(result: PositionBias) -> go.Figure:
    """Each item's probability at each letter position: a vertical stripe is bias, a row is preference."""
    letters = list(result.letters)
    labels = [("★ " if index == result.target_index else "") + f"{letters[index]}. {_short(text)}"
              for index, text in enumerate(result.item_texts)]
    hover = [[f"{html.escape(text)} at {letter}" for letter in letters] for text in result.item_texts]
    figure = go.Figure(go.Heatmap(
        z=result.item_position_probs, x=letters, y=labels, colorscale="Blues", zmin=0.0,
        hovertext=hover, hoverinfo="text+z", colorbar={"title": "P"}))
    return with_layout(figure, f"User {result.user_id} · {result.system}: probability of each item (row, "
                               "★ ground truth) at each letter (column)",
                       height=max(CHART_HEIGHT, 22 * len(letters) + 90), margin={"l": 260, "r": 20, "t": 70, "b": 20},
                       xaxis={"type": "category", "title": "letter position", "side": "top", **letter_ticks(letters)},
                       yaxis={"autorange": "reversed", "type": "category"})


def letter_bias_chart(results: Sequence[PositionBias | PositionBiasSummary]) -> go.Figure:
    """Mean probability per letter over all orders (and users), one bar group per system, vs uniform."""
    if not results:
        raise ValueError("no position-bias results to chart: run position_bias first")
    letters = list(results[0].letters)
    figure = go.Figure()
    for index, result in enumerate(results):
        values = result.mass_by_letter if isinstance(result, PositionBiasSummary) else result.letter_means
        figure.add_bar(x=letters, y=values.tolist(), name=result.system, marker_color=system_color(index))
    add_uniform_line(figure, len(letters))
    first = results[0]
    scope = (f"{len(first.users)} users" if isinstance(first, PositionBiasSummary) else f"user {first.user_id}")
    return with_layout(figure, f"Probability by letter position, whatever item stands there ({scope})",
                   barmode="group", xaxis={"type": "category", "title": "letter position", **letter_ticks(letters)},
                   yaxis_title="mean probability")


def truth_rank_chart(results: Sequence[PositionBias]) -> go.Figure:
    """How often each rank is the ground truth's over the orders: a wide spread means the order decides."""
    if not results:
        raise ValueError("no position-bias results to chart: run position_bias first")
    ranks = list(range(1, len(results[0].letters) + 1))
    figure = go.Figure()
    for index, result in enumerate(results):
        figure.add_bar(x=ranks, y=result.truth_rank_counts.tolist(), name=result.system,
                       marker_color=system_color(index))
    return with_layout(figure, f"Ground-truth rank over {len(results[0].orders)} candidate orders",
                   barmode="group", xaxis={"title": "rank of the ground truth", "dtick": 1, "tickformat": "d"},
                   yaxis={"title": "orders", "tickformat": "d", "rangemode": "tozero"})



def position_bias_markdown(result: PositionBias) -> str:
    """The numbers beside the charts: letter A's pull, ranking stability, and what debiasing does to the truth."""
    metrics = result.metrics()
    truth = "not among the candidates" if result.target_index is None else (
        f"rank {result.rank_original} as shown, {result.rank_debiased} debiased (averaged over the orders)")
    return "\n".join([
        f"**User {result.user_id} · {result.system} · preset `{result.preset}` · {len(result.orders)} orders**", "",
        f"- P(A) over orders: {result.letter_means[0]:.4f} (uniform {result.uniform:.4f})",
        f"- stability (mean Kendall tau between orders, 1 = the order does not matter): {result.stability:.4f}",
        f"- ground truth: {truth}",
        f"- NDCG@10 shown {metrics['original']['NDCG@10']:.4f}, debiased {metrics['debiased']['NDCG@10']:.4f}, "
        f"mean over orders {metrics['over_orders']['NDCG@10']:.4f}"])


def top1_share_chart(summaries: Sequence[PositionBiasSummary]) -> go.Figure:
    """Share of prompts whose top-1 stands at each letter: a fair model puts 1/N at every letter."""
    if not summaries:
        raise ValueError("no position-bias summaries to chart: run position_bias_over_users first")
    letters = list(summaries[0].letters)
    figure = go.Figure()
    for index, summary in enumerate(summaries):
        figure.add_bar(x=letters, y=summary.top1_share.tolist(), marker_color=system_color(index),
                       name=f"{summary.system} (A: {summary.top1_a_rate:.0%})")
    add_uniform_line(figure, len(letters))
    return with_layout(figure, "Where the top-1 stands, over all users and orders", barmode="group",
                   xaxis={"type": "category", "title": "letter of the top-1", **letter_ticks(letters)},
                   yaxis_title="share of prompts")



# -- letter prior -------------------------------------------------------------------------------


def letter_prior_chart(priors: Sequence[LetterPrior]) -> go.Figure:
    """What each system believes about the letters before it reads any item, vs uniform."""
    if not priors:
        raise ValueError("no letter priors to chart: run letter_prior first")
    letters = list(priors[0].letters)
    figure = go.Figure()
    for index, prior in enumerate(priors):
        figure.add_bar(x=letters, y=prior.mean.tolist(), name=prior.system, marker_color=system_color(index),
                       error_y={"type": "data", "array": prior.probs.std(axis=0).tolist(), "visible": True})
    add_uniform_line(figure, len(letters))
    first = priors[0]
    what = "blank" if first.mode == "blank" else f"all {first.placeholder!r}"
    return with_layout(figure, f"Letter prior: candidate texts {what}, {len(first.user_ids)} users' histories",
                   barmode="group", xaxis={"type": "category", "title": "letter", **letter_ticks(letters)},
                   yaxis_title="mean probability (± std over users)")



# -- history influence --------------------------------------------------------------------------


def history_influence_chart(result: HistoryInfluence) -> go.Figure:
    """Change of the ground truth's probability when each history item is left out; red = most influential."""
    delta = result.truth_delta
    values = result.total_variation if delta is None else delta
    influential = set(result.most_influential())
    colors = [INFLUENTIAL_COLOR if row in influential else BAR_COLOR for row in range(len(values))]
    hover = [f"{position}. {html.escape(text)}" + (" · top-1 changes" if changed else "")
             for position, text, changed in zip(result.positions, result.history_texts, result.top1_changed,
                                                strict=True)]
    figure = go.Figure()
    for label, color in (("history item", BAR_COLOR), ("most influential", INFLUENTIAL_COLOR)):
        rows = [row for row in range(len(values)) if colors[row] == color]
        figure.add_bar(x=[str(result.positions[row]) for row in rows], y=[float(values[row]) for row in rows],
                       marker_color=color, hovertext=[hover[row] for row in rows], hoverinfo="text+y", name=label)
    changed = [str(position) for position, flag in zip(result.positions, result.top1_changed, strict=True) if flag]
    if changed:
        figure.add_scatter(x=changed, y=[values[result.positions.index(int(p))] for p in changed], mode="markers",
                           marker={"symbol": "x", "size": 11, "color": "#212529"}, name="top-1 changes")
    what = ("total variation of the letter distribution (no ground truth among the candidates)" if delta is None
            else "Δ P(ground truth) without the item")
    return with_layout(figure, f"User {result.user_id} · {result.system}: leave one history item out",
                   xaxis={"type": "category", "title": "history position (oldest first)",
                          "categoryorder": "array", "categoryarray": [str(p) for p in result.positions]},
                   yaxis_title=what, showlegend=True)



def history_influence_table(result: HistoryInfluence) -> Styler:
    """The influence table with its most influential rows highlighted, as the app shows it."""
    frame = history_influence_frame(result)
    return frame.style.apply(
        lambda row: [_INFLUENTIAL_ROW if row["influential"] else ""] * len(row), axis=1
    ).format({"Δ P(truth)": "{:+.4f}", "total_variation": "{:.4f}"}, na_rep="–")


# -- template consistency -----------------------------------------------------------------------



# The three runs of the template check, inline-styled so they survive Markdown's HTML sanitizing.
_RUN_STYLES = {"prompt": "background:#e9ecef", "inserted": "background:#fff3bf;outline:1px dashed #f08c00",
               "trimmed": "color:#868e96;text-decoration:line-through", "letter": "background:#d0ebff"}


def _run(kind: str, text: str, title: str) -> str:
    shown = html.escape(text).replace(" ", "·").replace("\n", "↵")
    return (f'<code class="ri-run-{kind}" style="{_RUN_STYLES[kind]}" title="{html.escape(title)}">'
            f"{shown}</code>")


def template_runs_html(tokenizer: Any, report: TemplateConsistency, context_tokens: int = 8) -> str:
    """The end of the scored prompt, the span the template inserts before the letter, and the letter: three runs."""
    if report.answer_token is None:
        return ""
    slot = report.answer_slot
    inserted = len(slot.inserted_ids)
    prompt_end = report.prompt_ids[:len(report.prompt_ids) - inserted][-context_tokens:]
    runs = [_run("prompt", "…" + tokenizer.decode(list(prompt_end)), "the prompt (its last tokens)")]
    left_out = bool(slot.trimmed_text) and slot.trimmed_text != slot.inserted_text
    if left_out:
        runs.append(_run("trimmed", slot.trimmed_text, "in the generation prompt, left out of the scored prompt"))
    if inserted:
        runs.append(_run("inserted", slot.inserted_text, "inserted by the template before the letter: scored "
                                                          "prompt, no loss"))
    runs.append(_run("letter", tokenizer.decode([report.answer_token[1]]), "the answer letter's own token"))
    shown = ["prompt", "left out" if left_out else "",
             "inserted before the letter" if inserted else "", "letter"]
    legend = " · ".join(part for part in shown if part) + ("" if slot.moves_prompt else " (nothing inserted)")
    return " ".join(runs) + f"  <small>({legend})</small>"


def template_markdown(report: TemplateConsistency, tokenizer: Any = None) -> str:
    """Status, what the generation prompt adds, and each problem in plain words."""
    # Words, not emoji: a browser without a colour-emoji font shows an empty box for ✅.
    status = "OK, consistent" if report.ok and not report.problems else ("warnings" if report.ok else "BROKEN")
    lines = [f"**Template consistency · preset `{report.preset}`: {status}**", ""]
    if tokenizer is not None and report.answer_token is not None:
        lines += [template_runs_html(tokenizer, report), ""]
    lines.append(f"- inference prompt: {len(report.prompt_ids)} tokens; training conversation: "
                 f"{len(report.full_ids)} tokens")
    if report.generation_prompt is not None:
        lines.append(f"- the generation prompt adds `{report.generation_prompt!r}`")
    if report.loss_tokens:
        lines.append("- loss is kept on: " + " ".join(f"`{token!r}`({token_id})"
                                                      for _, token_id, token in report.loss_tokens))
    if report.answer_token is not None:
        lines.append(f"- the answer letter {report.letter!r} becomes token `{report.answer_token[2]!r}` "
                     f"({report.answer_token[1]})")
    else:
        lines.append(f"- the renderings part at token {report.diverge_at}")
    for problem in report.problems:
        lines += ["", f"**{problem.severity}** ({problem.kind}): {html.escape(problem.message)}"]
    return "\n".join(lines)


# -- letter mass --------------------------------------------------------------------------------


def letter_mass_chart(report: LetterMass) -> go.Figure:
    """Distribution of the letters' share of full-vocabulary probability, one histogram per system."""
    figure = go.Figure()
    for index, system in enumerate(report.systems):
        values = report.frame.loc[report.frame["system"] == system, "letter_mass"].astype(float)
        figure.add_histogram(x=values.tolist(), name=f"{system} (mean {values.mean():.2f})", opacity=0.65,
                             xbins={"start": 0.0, "end": 1.0, "size": 0.05}, marker_color=system_color(index))
    return with_layout(figure, "Letter mass per user: low means the model wants to say something else",
                   barmode="overlay", xaxis={"title": "letters' share of the full-vocabulary probability",
                                             "range": [0, 1]}, yaxis_title="users")


