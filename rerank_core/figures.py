"""The charts' data, colours and labels, built once as plain plotly.js figure dicts: the app draws them with
plotly (go.Figure(figure)) and the HTML report writes them as JSON, so the page and the report cannot differ;
the core stays free of plotting imports."""

from __future__ import annotations

import html
from collections.abc import Sequence
from typing import Any

import pandas as pd

from rerank_core.compare import REFERENCE, paired_runs
from rerank_core.inspector import UserInspection
from rerank_core.metrics import ALL_USERS

__all__ = [
    "BAR_COLOR",
    "CHART_HEIGHT",
    "CHART_ORDERS",
    "HEADLINE_METRICS",
    "INFLUENTIAL_COLOR",
    "MUTED_COLOR",
    "NO_CHANGE_COLOR",
    "SYSTEM_COLORS",
    "TRUTH_COLOR",
    "chart_layout",
    "difference_figure",
    "letter_figure",
    "letter_ticks",
    "scatter_figure",
    "system_color",
    "system_letters_figure",
    "uniform_line",
]

# The one palette: every chart of the app and the report takes its colours from here.
TRUTH_COLOR = "#e8590c"
BAR_COLOR = "#4c78a8"
MUTED_COLOR = "#868e96"
NO_CHANGE_COLOR = "#adb5bd"
INFLUENTIAL_COLOR = "#c92a2a"
# One colour per system, the reference (base) first: Compare, the diagnostics and the report agree.
SYSTEM_COLORS = ("#868e96", "#1c7ed6", "#2f9e44", "#ae3ec9", "#f08c00", "#c2255c", "#0c8599")
CHART_HEIGHT = 320
CHART_ORDERS = ("letter", "probability")
HEADLINE_METRICS = ("NDCG@10", "Recall@10", "MRR@10")


def system_color(index: int) -> str:
    """The colour of the index-th system of a chart (0: the reference)."""
    return SYSTEM_COLORS[index % len(SYSTEM_COLORS)]


def chart_layout(title: str, *, height: int = CHART_HEIGHT, **extra: Any) -> dict[str, Any]:
    """The layout every chart shares (title, size, template, margins, a legend above on the right); `extra`
    adds or overrides keys."""
    return {"title": {"text": title, "font": {"size": 14}}, "height": height, "template": "plotly_white",
            "margin": {"l": 50, "r": 20, "t": 40, "b": 40},
            "legend": {"orientation": "h", "y": 1.02, "yanchor": "bottom", "x": 1, "xanchor": "right"}, **extra}


def letter_ticks(letters: Sequence[str]) -> dict[str, Any]:
    """Every letter labelled, however many (plotly would otherwise skip every other one at 52)."""
    return {"tickmode": "array", "tickvals": list(letters), "ticktext": list(letters), "tickangle": 0,
            "tickfont": {"size": 10 if len(letters) > 26 else 12}}


def uniform_line(count: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """The dotted line at 1/count and its label (a shape and an annotation): where a blind guess would sit."""
    level = 1.0 / count
    shape = {"type": "line", "xref": "paper", "x0": 0, "x1": 1, "yref": "y", "y0": level, "y1": level,
             "line": {"dash": "dot", "color": MUTED_COLOR}}
    label = {"xref": "paper", "x": 1, "yref": "y", "y": level, "text": f"uniform 1/{count}", "showarrow": False,
             "xanchor": "right", "yanchor": "bottom"}
    return shape, label


# -- one user ---------------------------------------------------------------------------------


def letter_figure(inspection: UserInspection, order: str = "letter") -> dict[str, Any]:
    """Letter probabilities as bars, by letter or by probability; the ground truth coloured and marked by an
    arrow (findable however small its bar), every letter labelled, the uniform level drawn."""
    if order not in CHART_ORDERS:
        raise ValueError(f"chart order {order!r} is not one of {', '.join(CHART_ORDERS)}")
    prepared = inspection.prepared
    letters = list(prepared.prompt.letters)
    probabilities = [float(value) for value in inspection.scores.letter_probs]
    truth = prepared.candidates.target_index
    indices = inspection.scores.ranking() if order == "probability" else list(range(len(letters)))
    shown = [letters[index] for index in indices]
    hover = [f"{letters[index]}: {html.escape(prepared.candidate_texts[index])}"
             + (" (ground truth)" if index == truth else "") for index in indices]
    bars = {"type": "bar", "x": shown, "y": [probabilities[index] for index in indices],
            "marker": {"color": [TRUTH_COLOR if index == truth else BAR_COLOR for index in indices]},
            "hovertext": hover, "hoverinfo": "text+y", "name": "P(letter)"}
    title = f"Letter probabilities · {inspection.system} · preset {inspection.settings.preset.name}"
    annotations = []
    if truth is not None:
        title += f" · ground truth {letters[truth]} (orange) ranked {inspection.rank} of {len(letters)}"
        annotations.append({"x": letters[truth], "y": probabilities[truth],
                            "text": f"truth {probabilities[truth]:.3f}", "showarrow": True, "arrowhead": 2,
                            "arrowcolor": TRUTH_COLOR, "ax": 0, "ay": -36, "font": {"color": TRUTH_COLOR, "size": 11}})
    else:
        title += " · ground truth not among the candidates"
    uniform, uniform_label = uniform_line(len(letters))
    layout = chart_layout(
        title, yaxis={"title": {"text": "probability over letters"}, "rangemode": "tozero"},
        xaxis={"type": "category", "title": {"text": "candidate letter" if order == "letter"
                                             else "letters by probability"}, **letter_ticks(shown)},
        showlegend=False, shapes=[uniform], annotations=[*annotations, uniform_label])
    return {"data": [bars], "layout": layout}


def system_letters_figure(inspections: Sequence[UserInspection]) -> dict[str, Any]:
    """Grouped bars: each system's letter probabilities for the same user and candidates, the truth shaded."""
    first = inspections[0].prepared
    letters = list(first.prompt.letters)
    truth = first.candidates.target_index
    data = [{"type": "bar", "x": letters, "y": [float(value) for value in inspection.scores.letter_probs],
             "name": inspection.system, "marker": {"color": system_color(index)},
             "hovertext": [html.escape(text) for text in inspection.prepared.candidate_texts]}
            for index, inspection in enumerate(inspections)]
    title = f"User {inspections[0].user_id}: letter probabilities per system"
    shapes = []
    if truth is not None:
        title += f" · ground truth {letters[truth]}"
        shapes.append({"type": "rect", "xref": "x", "x0": truth - 0.5, "x1": truth + 0.5, "yref": "paper",
                       "y0": 0, "y1": 1, "fillcolor": TRUTH_COLOR, "opacity": 0.15, "line": {"width": 0},
                       "layer": "below"})
    return {"data": data, "layout": chart_layout(
        title, height=CHART_HEIGHT + 40, barmode="group", shapes=shapes,
        xaxis={"type": "category", **letter_ticks(letters)}, yaxis={"title": {"text": "probability over letters"}})}


# -- many users -------------------------------------------------------------------------------


def difference_figure(summary: pd.DataFrame, metrics: Sequence[str] = HEADLINE_METRICS) -> dict[str, Any]:
    """Each compared run's paired difference to its reference, with the 95% CI as error bars; where some target
    is not among the candidates, a hatched bar of the same colour beside it over the users whose target is."""
    compared = summary[summary["comparison"] != REFERENCE]
    colors = {system: system_color(index + 1) for index, system in enumerate(dict.fromkeys(compared["system"]))}
    data = []
    for (system, population), group in compared.groupby(["system", "population"], sort=False):
        by_metric = group.set_index("metric").loc[list(metrics)]
        reference = group["reference"].iloc[0]
        conditional = population != ALL_USERS
        data.append({"type": "bar", "name": f"{system} − {reference}" + (f" ({population})" if conditional else ""),
                     "x": list(metrics), "y": by_metric["difference"].tolist(),
                     "error_y": {"type": "data", "symmetric": False,
                                 "array": (by_metric["ci_high"] - by_metric["difference"]).tolist(),
                                 "arrayminus": (by_metric["difference"] - by_metric["ci_low"]).tolist()},
                     "marker": {"color": colors[system], **({"pattern": {"shape": "/"}} if conditional else {})}})
    return {"data": data, "layout": chart_layout(
        "Paired difference to the reference (95% bootstrap CI)", height=380, barmode="group",
        yaxis={"title": {"text": "difference"}, "zeroline": True}, showlegend=True,
        legend={"orientation": "h", "y": -0.15})}


def scatter_figure(per_user: pd.DataFrame, summary: pd.DataFrame) -> dict[str, Any] | None:
    """Ground-truth probability per user: each compared run (y) against its own reference (x), the runs
    compare.paired_runs picks (the movers' runs); None when no run is compared."""
    data = []
    for index, (system, reference, joined) in enumerate(paired_runs(per_user, summary)):
        data.append({"type": "scatter", "mode": "markers", "name": f"{system} vs {reference}",
                     "x": joined["truth_probability_reference"].astype(float).tolist(),
                     "y": joined["truth_probability"].astype(float).tolist(), "text": [str(u) for u in joined.index],
                     "hovertemplate": f"user %{{text}}<br>{html.escape(reference)} %{{x:.3f}}<br>"
                                      f"{html.escape(system)} %{{y:.3f}}<extra></extra>",
                     "marker": {"size": 7, "opacity": 0.75, "color": system_color(index + 1)}})
    if not data:
        return None
    data.append({"type": "scatter", "mode": "lines", "x": [0, 1], "y": [0, 1], "name": "no change",
                 "line": {"dash": "dot", "color": NO_CHANGE_COLOR}, "hoverinfo": "skip"})
    return {"data": data, "layout": chart_layout(
        "Ground-truth probability per user: reference (x) vs compared run (y)", height=CHART_HEIGHT + 80,
        xaxis={"title": {"text": "reference p(truth)"}, "range": [0, 1]},
        yaxis={"title": {"text": "compared run p(truth)"}, "range": [0, 1]},
        legend={"orientation": "h", "y": -0.2})}
