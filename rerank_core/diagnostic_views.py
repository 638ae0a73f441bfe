"""Figures and tables for the diagnostics, built from rerank_core results without Gradio."""

from __future__ import annotations

import html
from collections.abc import Sequence

import pandas as pd
import plotly.graph_objects as go
from pandas.io.formats.style import Styler

from rerank_core.diagnostics import (
    HistoryInfluence,
    LetterMass,
    LetterPrior,
    PositionBias,
    PositionBiasSummary,
    TemplateConsistency,
)
from rerank_core.metrics import rank_of_truth

__all__ = [
    "history_influence_chart",
    "history_influence_frame",
    "history_influence_table",
    "letter_bias_chart",
    "letter_mass_chart",
    "letter_mass_frame",
    "letter_prior_chart",
    "letter_prior_frame",
    "position_bias_markdown",
    "position_heatmap",
    "position_items_frame",
    "position_summary_frame",
    "template_letters_frame",
    "template_markdown",
    "template_tokens_frame",
    "top1_share_chart",
    "truth_rank_chart",
]

TRUTH_COLOR = "#e8590c"
BAR_COLOR = "#4c78a8"
INFLUENTIAL_COLOR = "#c92a2a"
_INFLUENTIAL_ROW = "background-color: #ffc9c9; font-weight: 600"
# One colour per compared system, base first: the same order as the Compare tab.
SYSTEM_COLORS = ("#868e96", "#1c7ed6", "#2f9e44", "#ae3ec9")
_HEIGHT = 320
_TEXT_WIDTH = 42


def _layout(figure: go.Figure, title: str, **extra: object) -> go.Figure:
    figure.update_layout(title={"text": title, "font": {"size": 14}}, height=_HEIGHT, template="plotly_white",
                         margin={"l": 50, "r": 20, "t": 40, "b": 40},
                         legend={"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"},
                         **extra)
    return figure


def _short(text: str) -> str:
    return text if len(text) <= _TEXT_WIDTH else text[:_TEXT_WIDTH - 1] + "…"


def _uniform_line(figure: go.Figure, count: int) -> None:
    figure.add_hline(y=1.0 / count, line_dash="dot", line_color="#495057",
                     annotation_text=f"uniform 1/{count}", annotation_position="top right")


def _system_color(index: int) -> str:
    return SYSTEM_COLORS[index % len(SYSTEM_COLORS)]


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
    figure = _layout(figure, f"User {result.user_id} · {result.system}: probability of each item (row, "
                             "★ ground truth) at each letter (column)",
                     xaxis={"type": "category", "title": "letter position", "side": "top"},
                     yaxis={"autorange": "reversed", "type": "category"})
    figure.update_layout(height=max(_HEIGHT, 22 * len(letters) + 90), margin={"l": 260, "r": 20, "t": 70, "b": 20})
    return figure


def letter_bias_chart(results: Sequence[PositionBias | PositionBiasSummary]) -> go.Figure:
    """Mean probability per letter over all orders (and users), one bar group per system, vs uniform."""
    if not results:
        raise ValueError("no position-bias results to chart: run position_bias first")
    letters = list(results[0].letters)
    figure = go.Figure()
    for index, result in enumerate(results):
        values = result.mass_by_letter if isinstance(result, PositionBiasSummary) else result.letter_means
        figure.add_bar(x=letters, y=values.tolist(), name=result.system, marker_color=_system_color(index))
    _uniform_line(figure, len(letters))
    first = results[0]
    scope = (f"{len(first.users)} users" if isinstance(first, PositionBiasSummary) else f"user {first.user_id}")
    return _layout(figure, f"Probability by letter position, whatever item stands there ({scope})",
                   barmode="group", xaxis={"type": "category", "title": "letter position"},
                   yaxis_title="mean probability")


def truth_rank_chart(results: Sequence[PositionBias]) -> go.Figure:
    """How often each rank is the ground truth's over the orders: a wide spread means the order decides."""
    if not results:
        raise ValueError("no position-bias results to chart: run position_bias first")
    ranks = list(range(1, len(results[0].letters) + 1))
    figure = go.Figure()
    for index, result in enumerate(results):
        figure.add_bar(x=ranks, y=result.truth_rank_counts.tolist(), name=result.system,
                       marker_color=_system_color(index))
    return _layout(figure, f"Ground-truth rank over {len(results[0].orders)} candidate orders",
                   barmode="group", xaxis={"title": "rank of the ground truth", "dtick": 1},
                   yaxis_title="orders")


def position_items_frame(result: PositionBias) -> pd.DataFrame:
    """Per item: probability as shown, debiased, its spread over orders, and both ranks."""
    item_probs, debiased = result.item_probs, result.debiased
    # Ranks with the metrics' tie rule (ties rank last), so the truth's row matches its metrics.
    shown_rank = [rank_of_truth(item_probs[0], index) for index in range(len(result.item_ids))]
    debiased_rank = [rank_of_truth(debiased, index) for index in range(len(result.item_ids))]
    return pd.DataFrame([{
        "letter": result.letters[index], "item_id": item_id, "text": text,
        "truth": "★ truth" if index == result.target_index else "",
        "probability": round(float(item_probs[0, index]), 4), "debiased": round(float(debiased[index]), 4),
        "min_over_orders": round(float(item_probs[:, index].min()), 4),
        "max_over_orders": round(float(item_probs[:, index].max()), 4),
        "rank": shown_rank[index], "rank_debiased": debiased_rank[index]}
        for index, (item_id, text) in enumerate(zip(result.item_ids, result.item_texts, strict=True))])


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
        figure.add_bar(x=letters, y=summary.top1_share.tolist(), marker_color=_system_color(index),
                       name=f"{summary.system} (A: {summary.top1_a_rate:.0%})")
    _uniform_line(figure, len(letters))
    return _layout(figure, "Where the top-1 stands, over all users and orders", barmode="group",
                   xaxis={"type": "category", "title": "letter of the top-1"}, yaxis_title="share of prompts")


def position_summary_frame(summaries: Sequence[PositionBiasSummary]) -> pd.DataFrame:
    """One row per system: how biased, how stable, and what averaging over orders does to NDCG@10."""
    rows = []
    for summary in summaries:
        metrics = summary.metrics()
        difference = summary.debiased_difference()
        rows.append({
            "system": summary.system, "users": len(summary.users), "orders": len(summary.users[0].orders),
            "P(A)": round(float(summary.mass_by_letter[0]), 4), "top-1 is A": round(summary.top1_a_rate, 4),
            "uniform": round(summary.uniform, 4), "stability (tau)": round(summary.mean_stability, 4),
            "NDCG@10 shown": round(metrics["original"]["NDCG@10"], 4),
            "NDCG@10 debiased": round(metrics["debiased"]["NDCG@10"], 4),
            "debiased − shown (95% CI)": f"{difference.difference:+.4f} "
                                         f"({difference.low:+.4f} .. {difference.high:+.4f})",
            "NDCG@10 mean over orders": round(metrics["over_orders"]["NDCG@10"], 4)})
    return pd.DataFrame(rows)


# -- letter prior -------------------------------------------------------------------------------


def letter_prior_chart(priors: Sequence[LetterPrior]) -> go.Figure:
    """What each system believes about the letters before it reads any item, vs uniform."""
    if not priors:
        raise ValueError("no letter priors to chart: run letter_prior first")
    letters = list(priors[0].letters)
    figure = go.Figure()
    for index, prior in enumerate(priors):
        figure.add_bar(x=letters, y=prior.mean.tolist(), name=prior.system, marker_color=_system_color(index),
                       error_y={"type": "data", "array": prior.probs.std(axis=0).tolist(), "visible": True})
    _uniform_line(figure, len(letters))
    first = priors[0]
    what = "blank" if first.mode == "blank" else f"all {first.placeholder!r}"
    return _layout(figure, f"Letter prior: candidate texts {what}, {len(first.user_ids)} users' histories",
                   barmode="group", xaxis={"type": "category", "title": "letter"},
                   yaxis_title="mean probability (± std over users)")


def letter_prior_frame(priors: Sequence[LetterPrior]) -> pd.DataFrame:
    """One row per letter, one column per system, with the uniform share beside them."""
    if not priors:
        return pd.DataFrame(columns=["letter", "uniform"])
    frame = pd.DataFrame({"letter": list(priors[0].letters), "uniform": round(priors[0].uniform, 4)})
    for prior in priors:
        frame[prior.system] = prior.mean.round(4)
        frame[f"{prior.system} top-1 share"] = prior.top_letter_share.round(4)
    return frame


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
    figure = go.Figure(go.Bar(x=[str(position) for position in result.positions], y=values.tolist(),
                              marker_color=colors, hovertext=hover, hoverinfo="text+y"))
    changed = [str(position) for position, flag in zip(result.positions, result.top1_changed, strict=True) if flag]
    if changed:
        figure.add_scatter(x=changed, y=[values[result.positions.index(int(p))] for p in changed], mode="markers",
                           marker={"symbol": "x", "size": 11, "color": "#212529"}, name="top-1 changes")
    what = ("total variation of the letter distribution (no ground truth among the candidates)" if delta is None
            else "Δ P(ground truth) without the item")
    return _layout(figure, f"User {result.user_id} · {result.system}: leave one history item out",
                   xaxis={"type": "category", "title": "history position (oldest first)"}, yaxis_title=what,
                   showlegend=bool(changed))


def history_influence_frame(result: HistoryInfluence) -> pd.DataFrame:
    """The history table with each item's influence; `influential` marks the rows to highlight."""
    delta = result.truth_delta
    influential = set(result.most_influential())
    return pd.DataFrame([{
        "position": position, "item_id": item_id, "text": text,
        "Δ P(truth)": None if delta is None else round(float(delta[row]), 4),
        "total_variation": round(float(result.total_variation[row]), 4),
        "top-1 without": f"{result.letters[int(result.top1_without[row])]}"
                         + (" (changed)" if result.top1_changed[row] else ""),
        "influential": row in influential}
        for row, (position, item_id, text) in enumerate(
            zip(result.positions, result.history_ids, result.history_texts, strict=True))])


def history_influence_table(result: HistoryInfluence) -> Styler:
    """The influence table with its most influential rows highlighted, as the app shows it."""
    frame = history_influence_frame(result)
    return frame.style.apply(
        lambda row: [_INFLUENTIAL_ROW if row["influential"] else ""] * len(row), axis=1
    ).format({"Δ P(truth)": "{:+.4f}", "total_variation": "{:.4f}"}, na_rep="–")


# -- template consistency -----------------------------------------------------------------------


def template_tokens_frame(report: TemplateConsistency) -> pd.DataFrame:
    """Both token sequences side by side around the first difference (or the end of the prompt)."""
    inference = {index: (token_id, token) for index, token_id, token in report.inference_window}
    training = {index: (token_id, token) for index, token_id, token in report.training_window}
    loss = {index for index, _, _ in report.loss_tokens}
    rows = []
    for index in sorted(set(inference) | set(training)):
        left, right = inference.get(index), training.get(index)
        rows.append({
            "index": index, "inference token": "" if left is None else left[1],
            "inference id": None if left is None else left[0],
            "training token": "" if right is None else right[1],
            "training id": None if right is None else right[0],
            "same": left == right, "loss": index in loss,
            "note": "first difference" if index == report.diverge_at else
                    ("answer letter" if report.answer_token and index == report.answer_token[0] else "")})
    frame = pd.DataFrame(rows, columns=["index", "inference token", "inference id", "training token",
                                        "training id", "same", "loss", "note"])
    # Nullable integers: a side that has ended shows <NA>, not a float ID.
    return frame.astype({"inference id": "Int64", "training id": "Int64"})


def template_letters_frame(report: TemplateConsistency) -> pd.DataFrame:
    """Per letter: the bare-letter (seed) token and the token training teaches, with audit flags."""
    return pd.DataFrame([{
        "letter": token.letter, "seed token": token.token, "seed id": token.token_id,
        "as-trained token": token.as_trained_token, "as-trained id": token.as_trained_id,
        "flags": ", ".join(token.flags)} for token in report.letter_tokens])


def template_markdown(report: TemplateConsistency) -> str:
    """Status, what the generation prompt adds, and each problem in plain words."""
    status = "✅ consistent" if report.ok and not report.problems else ("⚠️ warnings" if report.ok else "❌ broken")
    lines = [f"**Template consistency · preset `{report.preset}`: {status}**", ""]
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
                             xbins={"start": 0.0, "end": 1.0, "size": 0.05}, marker_color=_system_color(index))
    return _layout(figure, "Letter mass per user: low means the model wants to say something else",
                   barmode="overlay", xaxis={"title": "letters' share of the full-vocabulary probability",
                                             "range": [0, 1]}, yaxis_title="users")


def letter_mass_frame(report: LetterMass) -> pd.DataFrame:
    return report.summary().round(4)
