"""One self-contained HTML file to hand over: settings, prompt, audit, charts, metrics with CIs, movers.

Charts are plotly.js figures written as plain JSON, and plotly.min.js is inlined from the installed
plotly package's files (found without importing plotly): the file opens from disk with no server and
no network, and the core stays free of plotting imports.
"""

from __future__ import annotations

import html
import importlib.util
import json
import math
from collections.abc import Sequence
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd

from rerank_core.compare import REFERENCE, movers
from rerank_core.data.dataset import Dataset
from rerank_core.display import visible_text
from rerank_core.figures import HEADLINE_METRICS, difference_figure, letter_figure, scatter_figure
from rerank_core.inspector import InspectSettings, UserInspection
from rerank_core.metrics import ALL_USERS, candidate_recall

__all__ = ["comparison_report", "inspection_report", "plotly_js_path"]


_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; margin: 24px auto;
  max-width: 1200px; padding: 0 16px; color: #212529; }
h1 { font-size: 22px; } h2 { font-size: 17px; margin-top: 28px; border-bottom: 1px solid #dee2e6; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border: 1px solid #dee2e6; padding: 4px 8px; text-align: left; vertical-align: top;
  overflow-wrap: anywhere; }
th { background: #f1f3f5; }
tr.truth td { background: #fff3bf; font-weight: 600; }
tr.flagged td { background: #ffc9c9; }
pre.prompt { white-space: pre-wrap; overflow-wrap: anywhere; background: #f8f9fa; border: 1px solid #dee2e6;
  padding: 10px; font-size: 12.5px; max-height: 600px; overflow: auto; }
.chart { width: 100%; min-height: 360px; }
.note { color: #495057; font-size: 13px; }
"""


def plotly_js_path() -> Path:
    """plotly.min.js inside the installed plotly package, located without importing plotly."""
    spec = importlib.util.find_spec("plotly")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / "package_data" / "plotly.min.js"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("plotly.min.js not found: install the plotly package (requirements.txt) so the "
                            "report can inline it")


def _json(value: Any) -> str:
    """JSON for a <script> block: NaN becomes null, and '</' cannot close the script early."""
    return json.dumps(_plain(value), ensure_ascii=False).replace("</", "<\\/")


def _plain(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    if hasattr(value, "item") and not isinstance(value, str):  # numpy scalars
        return _plain(value.item())
    return value


def _table(frame: pd.DataFrame, *, row_classes: Sequence[str] | None = None) -> str:
    head = "".join(f"<th>{html.escape(str(column))}</th>" for column in frame.columns)
    rows = []
    for index, row in enumerate(frame.itertuples(index=False)):
        css = f' class="{row_classes[index]}"' if row_classes and row_classes[index] else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{html.escape(_cell(value))}</td>" for value in row) + "</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _cell(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list | tuple):
        return ", ".join(map(str, value)) or "ok"
    return str(value)


def _page(title: str, sections: Sequence[str], figures: dict[str, dict[str, Any]]) -> str:
    """The whole document; each figure is drawn into the div with its id once plotly.js has loaded."""
    script = plotly_js_path().read_text(encoding="utf-8")
    # The figures as one JSON block (readable by tools and tests), drawn by a three-line loader.
    draw = (f'<script type="application/json" id="ri-figures">{_json(figures)}</script><script>'
            'const figures = JSON.parse(document.getElementById("ri-figures").textContent);'
            'for (const [div, figure] of Object.entries(figures)) {'
            ' Plotly.newPlot(div, figure.data, figure.layout, {responsive: true, displaylogo: false}); }'
            '</script>')
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style>"
            f"<script>{script}</script></head><body>"
            f"<h1>{html.escape(title)}</h1><p class=\"note\">Rerank Inspector report, {stamp}.</p>"
            + "".join(sections) + f"{draw}</body></html>\n")


def _settings_frame(settings: InspectSettings, extra: dict[str, Any]) -> pd.DataFrame:
    values = {**extra, **{key: value for key, value in settings.to_json().items() if key != "candidates"},
              **{f"candidates.{key}": value for key, value in asdict(settings.candidates).items()}}
    return pd.DataFrame({"setting": list(values), "value": [_cell(value) for value in values.values()]})


# -- one user ---------------------------------------------------------------------------------


def inspection_report(inspection: UserInspection, dataset: Dataset, *, model: str = "",
                      special_tokens: Sequence[str] = ()) -> str:
    """Everything Inspect shows for one user and system, as one HTML document."""
    payload = inspection.to_json(dataset)
    prepared = inspection.prepared
    settings = _settings_frame(inspection.settings, {
        "user": inspection.user_id, "split": prepared.split.split, "system": inspection.system,
        "model": model or "-", "dataset": dataset.name})
    candidates = inspection.candidates_frame(dataset)[["letter", "item_id", "text", "truth", "probability", "rank"]]
    candidates = candidates.assign(truth=candidates["truth"].map({True: "ground truth", False: ""}))
    audit = inspection.audit_frame()
    flagged = ["flagged" if flags else "" for flags in audit.get("flags", [])]
    history = inspection.history_frame(dataset)
    metrics = pd.DataFrame([{"rank": inspection.rank, **inspection.metrics,
                             "letter mass": inspection.scores.letter_mass}])
    others = pd.DataFrame(payload["top_other"], columns=["token", "token_id", "probability"])
    kept = len(prepared.prompt.history_texts)
    truncation = (f"{prepared.prompt.dropped_history} oldest history item(s) dropped to fit "
                  f"max_prompt_tokens={inspection.settings.max_prompt_tokens}; {kept} shown"
                  if prepared.prompt.dropped_history else f"all {kept} history items shown")
    note = f"<p class=\"note\">{html.escape(inspection.preset_note)}</p>" if inspection.preset_note else ""
    sections = [
        "<h2>Settings</h2>" + note + _table(settings),
        "<h2>Letter probabilities</h2><div class=\"chart\" id=\"letters\"></div>",
        "<h2>Metrics for this user</h2>" + _table(metrics),
        "<h2>Candidates</h2>" + _table(candidates, row_classes=["truth" if truth else "" for truth in
                                                                  candidates["truth"]]),
        f"<h2>Letter audit</h2><p class=\"note\">Each letter's token and the step that found it; flagged rows "
        f"stand out, \"ok\" means no flag.</p>{_table(audit, row_classes=flagged)}",
        f"<h2>Rendered prompt</h2><p class=\"note\">{len(prepared.token_ids)} tokens; special tokens ⟦…⟧, "
        f"newlines ↵, trailing spaces ·. History: {html.escape(truncation)}.</p>"
        f"<pre class=\"prompt\">{html.escape(visible_text(prepared.prompt.rendered, special_tokens))}</pre>",
        "<h2>History</h2>" + _table(history),
        f"<h2>Top non-letter tokens</h2><p class=\"note\">The letters hold {inspection.scores.letter_mass:.4f} "
        f"of the next-token probability.</p>{_table(others)}",
    ]
    return _page(f"Inspect: user {inspection.user_id}, {inspection.system}", sections,
                 {"letters": letter_figure(inspection)})


# -- many users -------------------------------------------------------------------------------


def _metrics_frame(summary: pd.DataFrame, metrics: Sequence[str]) -> pd.DataFrame:
    """One row per run (and population, where the two differ): means, paired differences, counts."""
    both = bool((summary["population"] != ALL_USERS).any())
    rows = []
    for (system, population), group in summary.groupby(["system", "population"], sort=False):
        by_metric = group.set_index("metric")
        first = group.iloc[0]
        row = {"system": system, "preset": first["preset"], **({"population": population} if both else {}),
               "users": int(first["n"]), "compared with": "-" if first["comparison"] == REFERENCE
               else f"{first['reference']} ({first['comparison']})"}
        for metric in metrics:
            item = by_metric.loc[metric]
            row[metric] = "-" if math.isnan(item["mean"]) else f"{item['mean']:.4f}"
            if first["comparison"] != REFERENCE and not math.isnan(item["difference"]):
                row[f"Δ {metric} [95% CI]"] = (f"{item['difference']:+.4f} [{item['ci_low']:+.4f}, "
                                               f"{item['ci_high']:+.4f}]")
        ndcg = by_metric.loc["NDCG@10"]
        if first["comparison"] != REFERENCE and int(first["n"]):
            row["improved / unchanged / worsened (NDCG@10)"] = (
                f"{int(ndcg['improved'])} / {int(ndcg['unchanged'])} / {int(ndcg['worsened'])}")
        rows.append(row)
    return pd.DataFrame(rows).fillna("")


def comparison_report(per_user: pd.DataFrame, summary: pd.DataFrame, settings: InspectSettings, *,
                      dataset: str = "", model: str = "", mover_count: int = 5) -> str:
    """compare_systems' results as one HTML document: settings, metrics with CIs, charts, movers."""
    users = int(summary["n"].iloc[0]) if len(summary) else 0
    settings_frame = _settings_frame(settings, {"dataset": dataset or "-", "model": model or "-", "users": users})
    metrics = _metrics_frame(summary, HEADLINE_METRICS)
    all_means = summary.pivot_table(index=["system", "population"], columns="metric", values="mean",
                                    sort=False).reset_index()
    moved = movers(per_user, summary, count=mover_count)
    recall = candidate_recall(per_user, settings.candidates.source, settings.candidates.count)
    sections = [
        "<h2>Settings</h2>" + _table(settings_frame),
        "<h2>Metrics with paired 95% CIs</h2><p class=\"note\">" + html.escape(recall.describe())
        + ". Each run is paired with its reference on the same users. An adapter is compared with the base scored "
        "on the adapter's own preset; the preset's effect on the base is its own row.</p>" + _table(metrics),
        "<h2>Paired differences</h2><div class=\"chart\" id=\"differences\"></div>",
        "<h2>Ground-truth probability per user</h2><div class=\"chart\" id=\"scatter\"></div>",
        f"<h2>Most improved and most worsened users (up to {mover_count} each)</h2>" + _table(moved),
        "<h2>Every metric (means)</h2>" + _table(all_means),
    ]
    scatter = scatter_figure(per_user, summary)
    figures = {"differences": difference_figure(summary), **({"scatter": scatter} if scatter else {})}
    if summary["comparison"].eq(REFERENCE).all():
        sections[2:4] = ["<p class=\"note\">One system only: no paired difference to chart.</p>"]
        figures = {}
    elif scatter is None:
        sections[3] = "<p class=\"note\">No compared run has a ground-truth probability to chart.</p>"
    return _page(f"Compare: {', '.join(dict.fromkeys(summary['system']))} on {users} users", sections, figures)
