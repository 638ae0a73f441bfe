"""What keeps an Inspect round trip short: outputs sent in the form their components send as is, and a session's
setup that does not search for plotting libraries that are not there."""

from __future__ import annotations

import importlib.util
import json
import sys

import gradio as gr
import pytest
from app_helpers import make_context
from gradio.components.plot import PlotData
from pandas.io.formats.style import Styler

from rerank_app.pickers import Pickers
from rerank_app.server import mark_missing_plot_libraries
from rerank_app.tabs import inspect as inspect_tab
from rerank_core.inspector import BASE

PICKERS = Pickers(dataset="toy", model="tiny-llama", count=6)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    return make_context(tmp_path_factory.mktemp("speed"), smol_tokenizer)


def test_the_chart_and_the_highlighted_tables_need_no_processing_by_gradio(context) -> None:
    shown = dict(zip(inspect_tab.OUTPUT_NAMES, inspect_tab.inspect(context, PICKERS, BASE, "u03"), strict=True))
    chart = shown["chart"]
    # A PlotData passes gr.Plot.postprocess untouched: no plotly Figure is built per request.
    assert isinstance(chart, PlotData) and gr.Plot().postprocess(chart) is chart
    assert [bar["x"] for bar in json.loads(chart.plot)["data"]] == [list("ABCDEF")]
    for name in ("candidates", "audit"):
        table = shown[name]
        assert not isinstance(table, Styler) and set(table) == {"headers", "data", "metadata"}
        drawn = gr.Dataframe().postprocess(table)
        assert drawn.headers == table["headers"] and len(drawn.data) == 6
        assert len(drawn.metadata["styling"]) == 6 and len(drawn.metadata["display_value"]) == 6
    truth = context.inspections.inspect("toy", "tiny-llama", BASE, "u03", PICKERS.settings())
    truth = truth.prepared.candidates.target_index
    assert [bool(row[0]) for row in shown["candidates"]["metadata"]["styling"]] == [i == truth for i in range(6)]


@pytest.mark.skipif(importlib.util.find_spec("bokeh") is not None, reason="bokeh is installed here")
def test_a_missing_bokeh_is_marked_once_so_each_session_skips_the_search(monkeypatch) -> None:
    monkeypatch.delitem(sys.modules, "bokeh", raising=False)
    mark_missing_plot_libraries()
    assert "bokeh" in sys.modules and sys.modules["bokeh"] is None
    with pytest.raises(ImportError):
        import bokeh  # noqa: F401
    assert gr.Plot().get_config()["bokeh_version"] is None
