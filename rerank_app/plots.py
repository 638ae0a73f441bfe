"""The plotly side of the charts: core figure dicts (rerank_core/figures.py) drawn as plotly figures, and the
shared layout for the few charts only the app draws, so no view repeats the styling."""

from __future__ import annotations

import functools
import json
from typing import Any

import plotly.graph_objects as go
import plotly.io as pio

from rerank_core.figures import CHART_HEIGHT, MUTED_COLOR, chart_layout, uniform_line

__all__ = ["add_uniform_line", "empty_figure", "plot_json", "with_layout"]


def with_layout(figure: go.Figure, title: str, **extra: Any) -> go.Figure:
    """The figure with the layout every chart shares (figures.chart_layout); `extra` adds or overrides keys."""
    figure.update_layout(**chart_layout(title, **extra))
    return figure


def add_uniform_line(figure: go.Figure, count: int) -> None:
    """The dotted 1/count line and its label (figures.uniform_line), where a blind guess would sit."""
    shape, label = uniform_line(count)
    figure.add_shape(shape)
    figure.add_annotation(label)


def empty_figure(message: str = "") -> go.Figure:
    """A blank chart with a centred note, so an output never shows a stale figure."""
    figure = go.Figure()
    figure.update_layout(height=CHART_HEIGHT, xaxis_visible=False, yaxis_visible=False,
                         margin={"l": 10, "r": 10, "t": 10, "b": 10}, template="plotly_white")
    if message:
        figure.add_annotation(text=message, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper",
                              font={"size": 14, "color": MUTED_COLOR})
    return figure


@functools.cache
def _template(name: str) -> dict[str, Any]:
    """A named plotly template spelled out, as plotly.js needs it (it knows no names); built once per name."""
    return json.loads(pio.to_json(go.Figure(layout={"template": name}), validate=False))["layout"]["template"]


def plot_json(figure: dict[str, Any]) -> str:
    """A core figure dict as the JSON go.Figure(figure).to_json() gives plotly.js, without building the Figure:
    its validation and template copies cost ~10 ms a chart on every Inspect. The figure must be plain JSON values
    (the core's figures are)."""
    layout = figure.get("layout", {})
    template = layout.get("template")
    if isinstance(template, str):
        layout = {**layout, "template": _template(template)}
    return json.dumps({"data": figure.get("data", []), "layout": layout})
