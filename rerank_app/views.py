"""Every table, figure and HTML block the app shows, built from rerank_core results without Gradio."""

from __future__ import annotations

import html
import math
import re
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import plotly.graph_objects as go

from rerank_app.plots import empty_figure, with_layout
from rerank_core.answer_slot import AnswerSlot
from rerank_core.compare import PRESET_EFFECT
from rerank_core.compare import movers as compare_movers
from rerank_core.data.dataset import Dataset
from rerank_core.figures import (
    BAR_COLOR,
    CHART_ORDERS,
    MUTED_COLOR,
    TRUTH_COLOR,
    letter_figure,
    scatter_figure,
    system_letters_figure,
)
from rerank_core.fsutil import atomic_write_text
from rerank_core.inspector import UserInspection
from rerank_core.metrics import ALL_USERS, METRIC_NAMES, CandidateRecall, candidate_recall, excludes_zero

__all__ = [
    "APP_CSS",
    "APP_JS",
    "CHART_ORDERS",
    "CompareView",
    "DataView",
    "InspectView",
    "StyledTable",
    "compare_user_chart",
    "compare_user_table",
    "compare_view",
    "data_view",
    "empty_compare_tables",
    "empty_figure",
    "enter_clicks",
    "eval_chart",
    "inspect_view",
    "loss_chart",
    "progress_html",
    "prompt_html",
    "result_markdown",
    "token_html",
    "training_sample_html",
]

_TRUTH_ROW = "background-color: #fff3bf; font-weight: 600"
_FLAGGED_ROW = "background-color: #ffc9c9; font-weight: 600"

APP_CSS = """
.ri-prompt { font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12.5px;
  white-space: pre-wrap; word-break: break-word; line-height: 1.45; margin: 0; padding: 10px;
  background: var(--block-background-fill); border: 1px solid var(--border-color-primary);
  border-radius: 6px; max-height: 460px; overflow: auto; }
.ri-ws { color: #adb5bd; }
.ri-special { color: #ae3ec9; background: #f3d9fa; border-radius: 3px; padding: 0 2px; }
.ri-tokens { display: flex; flex-wrap: wrap; gap: 2px; max-height: 460px; overflow: auto;
  font-family: ui-monospace, SFMono-Regular, Menlo, monospace; font-size: 12px; padding: 6px; }
.ri-tok { display: inline-flex; flex-direction: column; align-items: center; border: 1px solid #dee2e6;
  border-radius: 3px; padding: 0 3px; background: #f8f9fa; color: #212529; }
.ri-tok .ri-id { font-size: 9.5px; color: #868e96; }
.ri-tok.ri-letter { background: #d0ebff; border-color: #4c78a8; }
.ri-tok.ri-special-tok { background: #f3d9fa; border-color: #ae3ec9; }
.ri-tok.ri-answer { background: #ffe8cc; border: 2px solid #e8590c; }
.ri-tok.ri-loss { background: #d3f9d8; border: 2px solid #2f9e44; }
.ri-inserted { background: #fff3bf; outline: 1px dashed #f08c00; border-radius: 3px; }
.ri-trimmed { color: #868e96; text-decoration: line-through; }
.ri-letter-slot { background: #d0ebff; border: 1px solid #4c78a8; border-radius: 3px; padding: 0 3px; }
.ri-tok.ri-inserted-tok { background: #fff3bf; border-style: dashed; }
.ri-legend { font-size: 12px; color: #495057; margin: 2px 0 6px 0; }
.ri-legend span { padding: 0 4px; border-radius: 3px; margin-right: 6px; }
.ri-progress { width: 100%; background: #e9ecef; border-radius: 6px; height: 18px; overflow: hidden; }
.ri-progress > div { height: 100%; background: #1c7ed6; transition: width 0.4s; }
.ri-progress-text { font-size: 13px; margin-top: 4px; }
#candidates-table td, #audit-table td, #history-table td { font-size: 12.5px; }
#inspect-summary p { margin: 2px 0; }
"""
# A gradio slider's number box commits its value on blur only: Enter there blurs it (its `release` event
# re-scores, as on Inspect) and gives the focus back; a slider marked with enter_clicks(button_id) then also
# clicks that button.
ENTER_CLICKS_PREFIX = "enter-clicks--"
APP_JS = """
() => {
  document.addEventListener("keydown", (event) => {
    const box = event.target;
    if (event.key !== "Enter" || !(box instanceof HTMLInputElement) || box.type !== "number") return;
    const slider = box.closest(".head")?.parentElement;  // a slider's box sits in its head, beside the range
    if (!slider?.querySelector(":scope > .slider_input_container > input[type=range]")) return;
    box.blur();
    box.focus();
    const prefix = "ENTER_CLICKS_PREFIX";
    const marked = box.closest(`[class*="${prefix}"]`);
    const mark = marked && [...marked.classList].find((name) => name.startsWith(prefix));
    if (mark) setTimeout(() => document.getElementById(mark.slice(prefix.length))?.click(), 100);  // value first
  }, true);
}
""".replace("ENTER_CLICKS_PREFIX", ENTER_CLICKS_PREFIX)


def enter_clicks(button_id: str) -> list[str]:
    """elem_classes for a slider whose number box runs the button `button_id` on Enter (APP_JS)."""
    return [ENTER_CLICKS_PREFIX + button_id]


# -- small helpers ------------------------------------------------------------------------------

# Each whitespace character and its visible mark; one str.translate pass (not a loop per character: the token
# view marks every token of every prompt).
_WHITESPACE_MARKS = str.maketrans({" ": '<span class="ri-ws">·</span>', "\n": '<span class="ri-ws">↵</span>\n',
                                   "\t": '<span class="ri-ws">⇥</span>', "\r": '<span class="ri-ws">␍</span>'})


def _visible(text: str) -> str:
    """HTML for text with every space, tab and newline shown (escaped: item titles come from uploads)."""
    return html.escape(text).translate(_WHITESPACE_MARKS)


def _special_tokens(tokenizer: Any) -> list[str]:
    """Special and added tokens (chat markers), longest first so overlapping ones match whole."""
    tokens = set(getattr(tokenizer, "all_special_tokens", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    tokens.update(str(token) for token in decoder.values())
    return sorted((token for token in tokens if token), key=len, reverse=True)


def _fmt_probability(value: float | None) -> str:
    return "–" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.3f}"


# -- Inspect ------------------------------------------------------------------------------------

def _marked(tokenizer: Any, text: str) -> str:
    """Text with whitespace made visible and special tokens marked."""
    specials = _special_tokens(tokenizer)
    if not specials:
        return _visible(text)
    pattern = re.compile("|".join(re.escape(token) for token in specials))
    parts, position = [], 0
    for match in pattern.finditer(text):
        parts.append(_visible(text[position:match.start()]))
        parts.append(f'<span class="ri-special">{html.escape(match.group())}</span>')
        position = match.end()
    parts.append(_visible(text[position:]))
    return "".join(parts)


def prompt_html(tokenizer: Any, rendered: str, slot: AnswerSlot | None = None, letters: str = "") -> str:
    """The rendered prompt as the tokenizer reads it: whitespace made visible, special tokens marked.

    With an answer slot, the span the template inserts before the letter (appended to the scored prompt)
    and the generation-prompt text left out of it are marked apart from the prompt, and `letters` shows
    where the answer letter is emitted.
    """
    slot = slot or AnswerSlot()
    body, inserted = rendered, ""
    if slot.inserted_text and rendered.endswith(slot.inserted_text):
        body, inserted = rendered[:len(rendered) - len(slot.inserted_text)], slot.inserted_text
    parts = [_marked(tokenizer, body)]
    left_out = bool(slot.trimmed_text) and slot.trimmed_text != inserted
    if left_out:
        parts.append(f'<span class="ri-trimmed" title="in the generation prompt, left out of the scored prompt: '
                     f'training never puts it before the letter">{_marked(tokenizer, slot.trimmed_text)}</span>')
    if inserted:
        parts.append(f'<span class="ri-inserted" title="inserted by the template between the generation prompt '
                     f'and the letter; part of the scored prompt, no loss in training">'
                     f'{_marked(tokenizer, inserted)}</span>')
    if letters and slot.moves_prompt:
        parts.append(f'<span class="ri-letter-slot" title="the answer letter is emitted here">'
                     f'{html.escape(letters)}</span>')
    legend = ""
    if slot.moves_prompt:
        keys = ["prompt · ",
                '<span class="ri-trimmed">generation prompt left out</span>' if left_out else "",
                '<span class="ri-inserted">inserted before the letter</span>' if inserted else "",
                '<span class="ri-letter-slot">answer letter</span>' if letters else ""]
        legend = f'<div class="ri-legend">{"".join(keys)}</div>'
    return f'{legend}<pre class="ri-prompt">{"".join(parts)}</pre>'


def _token_texts(tokenizer: Any, text: str | None, token_ids: Sequence[int],
                 add_special_tokens: bool) -> list[str]:
    """Each token's own text: character offsets when the tokenizer gives them, else per-token decoding."""
    if text is not None:
        try:
            encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        except (NotImplementedError, TypeError, ValueError):
            encoded = None
        if encoded is not None and list(encoded["input_ids"]) == list(token_ids):
            pieces = [text[start:end] for start, end in encoded["offset_mapping"]]
            # Offsets are empty for tokens with no characters of their own (e.g. an added BOS).
            return [piece or tokenizer.convert_ids_to_tokens(token_id)
                    for piece, token_id in zip(pieces, token_ids)]
    return [tokenizer.decode([token_id]) for token_id in token_ids]


def token_html(tokenizer: Any, token_ids: Sequence[int], *, text: str | None = None,
               add_special_tokens: bool = False, letter_ids: Sequence[int] = (),
               loss_mask: Sequence[bool] | None = None, answer_position: int | None = None,
               inserted: int = 0) -> str:
    """Each token with its ID; letter tokens, loss-carrying tokens, the answer position and the last
    `inserted` tokens (the span the template puts before the letter) highlighted."""
    pieces = _token_texts(tokenizer, text, token_ids, add_special_tokens)
    special_ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    special_ids.update(int(token_id) for token_id in decoder)
    # A letter's label is its last occurrence: an instruction such as "(A-T)" names letters earlier on.
    last_at = {token_id: position for position, token_id in enumerate(token_ids)}
    labels = {last_at[token_id] for token_id in set(letter_ids) if token_id in last_at}
    cells = []
    for position, (token_id, piece) in enumerate(zip(token_ids, pieces)):
        classes = ["ri-tok"]
        if loss_mask is not None and loss_mask[position]:
            classes.append("ri-loss")
        elif position == answer_position:
            classes.append("ri-answer")
        elif token_id in special_ids:
            classes.append("ri-special-tok")
        elif position in labels:
            classes.append("ri-letter")
        if position >= len(token_ids) - inserted:
            classes.append("ri-inserted-tok")  # on top of the answer mark: the span ends where logits are read
        title = f"position {position} · id {token_id}"
        if position == answer_position:
            title += " · the letter logits are read after this token"
        cells.append(f'<span class="{" ".join(classes)}" title="{html.escape(title)}">'
                     f'<span>{_visible(piece) or "∅"}</span><span class="ri-id">{token_id}</span></span>')
    if loss_mask is not None:
        legend = ('<span class="ri-tok ri-loss">carries loss</span>'
                  '<span class="ri-tok ri-special-tok">special token</span> others: context only')
    else:
        legend = ('<span class="ri-tok ri-letter">letter token ID</span>'
                  '<span class="ri-tok ri-special-tok">special token</span>'
                  '<span class="ri-tok ri-answer">answer position (last token)</span>'
                  + ('<span class="ri-tok ri-inserted-tok">inserted before the letter</span>' if inserted else ""))
    return (f'<div class="ri-legend">{len(token_ids)} tokens · {legend}</div>'
            f'<div class="ri-tokens">{"".join(cells)}</div>')


@dataclass(frozen=True)
class StyledTable:
    """A table with some rows highlighted: what a pandas Styler would give the page, without rendering one (a
    Styler's rendering cost milliseconds per table on every Inspect)."""

    data: pd.DataFrame
    row_styles: tuple[str, ...]  # one CSS declaration list per row, "" for a plain row
    formats: Mapping[str, str] = field(default_factory=dict)  # a column's format for its shown text; else str()

    def payload(self) -> dict[str, Any]:
        """Headers, cells, and each cell's shown text and style: the form gradio's Dataframe draws a Styler in."""
        headers = [str(column) for column in self.data.columns]
        rows = self.data.to_dict(orient="split")["data"]
        shown = [self.formats.get(header, "{}").format for header in headers]
        return {"headers": headers, "data": rows,
                "metadata": {"display_value": [[show(value) for show, value in zip(shown, row)] for row in rows],
                             "styling": [[style] * len(headers) for style in self.row_styles]}}


def _candidates_table(inspection: UserInspection, dataset: Dataset) -> StyledTable:
    frame = inspection.candidates_frame(dataset)
    table = pd.DataFrame({
        "letter": frame["letter"], "item": frame["item_id"], "text": frame["text"],
        "truth": ["★" if flag else "" for flag in frame["truth"]],
        "p": frame["probability"].round(4), "rank": frame["rank"]})
    return StyledTable(table, tuple(_TRUTH_ROW if truth else "" for truth in frame["truth"]), {"p": "{:.4f}"})


def _history_table(inspection: UserInspection, dataset: Dataset) -> tuple[pd.DataFrame, str]:
    frame = inspection.history_frame(dataset)
    table = pd.DataFrame({
        "#": frame["position"], "item": frame["item_id"], "text": frame["text"],
        "in prompt": ["yes" if kept else "dropped" for kept in frame["in_prompt"]]})
    dropped = inspection.prepared.prompt.dropped_history
    note = f"{len(table)} history items, oldest first"
    if dropped:
        note += f"; the {dropped} oldest were dropped: {truncation_reason(inspection)}"
    return table, note


def truncation_reason(inspection: UserInspection) -> str:
    """Which limit cut the history: the preset's item cap, the prompt token budget, or both."""
    preset = inspection.settings.preset
    history = len(inspection.prepared.split.history)
    by_preset = preset.max_history is not None and history > preset.max_history
    kept = len(inspection.prepared.prompt.history_texts)
    reasons = []
    if by_preset:
        reasons.append(f"preset {preset.name!r} shows at most {preset.max_history} history items")
    if not by_preset or kept < preset.max_history:
        reasons.append(f"the prompt must fit max_prompt_tokens = {inspection.settings.max_prompt_tokens}")
    return " and ".join(reasons)


def _audit_table(inspection: UserInspection) -> tuple[StyledTable, str]:
    rows = [token.to_json() for token in inspection.prepared.letter_tokens]
    table = pd.DataFrame({
        "letter": [row["letter"] for row in rows],
        "token": [row["token"] for row in rows],
        "id": [row["token_id"] for row in rows],
        "as trained": ["–" if row["as_trained_id"] is None else f"{row['as_trained_token']} ({row['as_trained_id']})"
                       for row in rows],
        "flags": [", ".join(row["flags"]) or "ok" for row in rows],
        "found by": [row["step"] for row in rows]})
    flagged = [index for index, row in enumerate(rows) if row["flags"]]
    styled = StyledTable(table, tuple(_FLAGGED_ROW if row["flags"] else "" for row in rows))
    strategy = rows[0]["strategy"] if rows else "?"
    if flagged:
        note = (f"⚠ {len(flagged)} of {len(rows)} letters flagged under strategy {strategy!r} "
                f"(rows in red): {', '.join(rows[index]['letter'] for index in flagged[:12])}")
    else:
        note = f"all {len(rows)} letters clean under strategy {strategy!r}"
    # The template's own quirks (an inserted span, ignored options) in plain words, below the count.
    note += "".join(f"\n\n{html.escape(line)}" for line in inspection.prepared.answer_slot.notes())
    return styled, note


def _other_tokens_table(inspection: UserInspection, tokenizer: Any) -> pd.DataFrame:
    """What the model wanted to say instead of a letter: raw token, its text (whitespace shown), probability."""
    rows = [{"token": token, "text": _plain_visible(tokenizer.decode([token_id])), "id": token_id,
             "probability": float(f"{probability:.3g}")}
            for token, token_id, probability in inspection.scores.top_other]
    return pd.DataFrame(rows, columns=["token", "text", "id", "probability"])


def _plain_visible(text: str) -> str:
    return text.replace(" ", "·").replace("\n", "↵").replace("\t", "⇥")


def _summary_markdown(inspection: UserInspection, dataset: Dataset, model_name: str) -> str:
    prepared = inspection.prepared
    truth = prepared.candidates.target_index
    count = len(prepared.prompt.letters)
    lines = [f"**User {html.escape(inspection.user_id)}** · {prepared.split.split} target · "
             f"system **{html.escape(inspection.system)}** on {html.escape(model_name)} · "
             f"preset `{inspection.settings.preset.name}` · {len(prepared.token_ids)} prompt tokens"]
    if truth is None:
        lines.append(f"Ground truth **{html.escape(dataset.text(prepared.split.target))}** is not among the "
                     f"{count} candidates (the retriever missed it): every metric is 0.")
    else:
        probability = inspection.scores.letter_probs[truth]
        lines.append(
            f"Ground truth **{prepared.prompt.letters[truth]}** · "
            f"{html.escape(prepared.candidate_texts[truth])} · p = {probability:.3f} · "
            f"**rank {inspection.rank} of {count}**")
    metrics = inspection.metrics
    lines.append(" · ".join(f"{name} {metrics[name]:.3f}" for name in ("Recall@1", "Recall@5", "Recall@10",
                                                                       "NDCG@5", "NDCG@10", "MRR@10")))
    mass = inspection.scores.letter_mass
    lines.append(f"Letter mass **{mass:.3f}**: the share of all next-token probability on the {count} letters"
                 + (" (low: the model does not answer with a letter here)" if mass < 0.5 else ""))
    if inspection.preset_note:
        lines.append(f"ℹ {html.escape(inspection.preset_note)}")
    return "\n\n".join(lines)


@dataclass(frozen=True)
class InspectView:
    """Everything the Inspect tab shows for one user, in the order the app's outputs list them."""

    summary: str
    history: pd.DataFrame
    history_note: str
    candidates: StyledTable
    chart: dict[str, Any]  # the plain figure (figures.letter_figure): the report draws the same one
    prompt: str
    tokens: str
    audit: StyledTable
    audit_note: str
    other_tokens: pd.DataFrame


def inspect_view(inspection: UserInspection, dataset: Dataset, tokenizer: Any, *, model_name: str,
                 order: str = "letter") -> InspectView:
    """Build every Inspect output from one inspection; no forward pass, no re-tokenization of the prompt."""
    prepared = inspection.prepared
    history, history_note = _history_table(inspection, dataset)
    audit, audit_note = _audit_table(inspection)
    chat = inspection.settings.preset.chat
    return InspectView(
        summary=_summary_markdown(inspection, dataset, model_name),
        history=history, history_note=history_note,
        candidates=_candidates_table(inspection, dataset),
        chart=letter_figure(inspection, order),
        prompt=prompt_html(tokenizer, prepared.prompt.rendered, prepared.answer_slot,
                           letters=f"{prepared.prompt.letters[0]}…{prepared.prompt.letters[-1]}"),
        tokens=token_html(tokenizer, prepared.token_ids, text=prepared.prompt.rendered,
                          add_special_tokens=not chat,
                          letter_ids=[token.token_id for token in prepared.letter_tokens],
                          answer_position=len(prepared.token_ids) - 1,
                          inserted=len(prepared.answer_slot.inserted_ids)),
        audit=audit, audit_note=audit_note,
        other_tokens=_other_tokens_table(inspection, tokenizer))


# -- Compare ------------------------------------------------------------------------------------

def compare_user_chart(inspections: Sequence[UserInspection]) -> go.Figure:
    """Grouped bars: each system's letter probabilities for the same user and candidates."""
    if not inspections:
        return empty_figure("pick a user")
    return go.Figure(system_letters_figure(inspections))


def compare_user_table(inspections: Sequence[UserInspection]) -> pd.DataFrame:
    """Per system: the ground truth's rank and probability, letter mass and the top-3 letters with items."""
    rows = []
    for inspection in inspections:
        prepared = inspection.prepared
        truth = prepared.candidates.target_index
        top = inspection.scores.ranking()[:3]
        rows.append({
            "system": inspection.system, "preset": inspection.settings.preset.name,
            "truth rank": inspection.rank,
            "p(truth)": None if truth is None else round(inspection.scores.letter_probs[truth], 4),
            "letter mass": round(inspection.scores.letter_mass, 4),
            "top-3": " | ".join(f"{prepared.prompt.letters[index]} {prepared.candidate_texts[index]} "
                                f"({inspection.scores.letter_probs[index]:.2f})" for index in top)})
    return pd.DataFrame(rows, columns=["system", "preset", "truth rank", "p(truth)", "letter mass", "top-3"])


@dataclass(frozen=True)
class CompareView:
    """The Compare tab's N-user outputs."""

    metrics: pd.DataFrame
    differences: pd.DataFrame
    counts: str
    scatter: go.Figure
    movers: pd.DataFrame


_DIFFERENCE_COLUMNS = ["system", "population", "metric", "base", "adapter", "Δ", "95% CI", "significant",
                       "improved", "unchanged", "worsened"]
# compare.movers' columns under the names the page shows.
_MOVER_NAMES = {"user_id": "user_id", "system": "system", "reference": "reference", "change": "change",
                "reference_rank": "reference rank", "rank": "rank", "reference_truth_probability": "reference p(truth)",
                "truth_probability": "p(truth)", "difference": "Δ NDCG@10"}
_MOVER_COLUMNS = list(_MOVER_NAMES.values())


def empty_compare_tables() -> dict[str, pd.DataFrame]:
    """The Compare tables before a run: their real column names, not 1 2 3."""
    return {"metrics": pd.DataFrame(columns=["system", "preset", "population", "users", *METRIC_NAMES]),
            "differences": pd.DataFrame(columns=_DIFFERENCE_COLUMNS),
            "movers": pd.DataFrame(columns=_MOVER_COLUMNS),
            "user": pd.DataFrame(columns=["system", "preset", "truth rank", "p(truth)", "letter mass", "top-3"])}


def compare_view(per_user: pd.DataFrame, summary: pd.DataFrame, *, movers: int = 5,
                 recall: CandidateRecall | None = None) -> CompareView:
    """Tables and plots from compare_systems' per-user frame and summary (the base is the reference).

    Baseline rows (preset "baseline", from baselines.with_baselines) join the tables and the counts; the
    scatter and the movers (from rerank_core, like the report's) stay with the LLM systems, the only ones with a
    ground-truth probability. The counts open with the candidate recall (from per_user unless given): the
    ceiling of every row, and why a second population ("target among candidates") is or is not shown.
    """
    recall = recall or candidate_recall(per_user)
    keys = ["system", "population"]
    means = summary.pivot_table(index=keys, columns="metric", values="mean", sort=False, dropna=False)
    described = summary.groupby(keys, sort=False)[["preset", "n"]].first().rename(columns={"n": "users"})
    metrics = (pd.concat([described, means.loc[described.index, list(METRIC_NAMES)].round(4)], axis=1)
               .reset_index()[["system", "preset", "population", "users", *METRIC_NAMES]])
    paired = summary[summary["system"] != summary["reference"]]
    differences_frame = pd.DataFrame({
        "system": paired["system"], "population": paired["population"], "metric": paired["metric"],
        "base": paired["reference_mean"].round(4),
        "adapter": paired["mean"].round(4), "Δ": paired["difference"].round(4),
        # No interval where the population holds no user (its bounds are NaN).
        "95% CI": ["-" if math.isnan(low) else f"[{low:+.4f}, {high:+.4f}]"
                   for low, high in zip(paired["ci_low"], paired["ci_high"])],
        "significant": ["-" if math.isnan(low) else "yes" if excludes_zero(low, high) else "no"
                        for low, high in zip(paired["ci_low"], paired["ci_high"])],
        "improved": paired["improved"], "unchanged": paired["unchanged"], "worsened": paired["worsened"]},
        columns=_DIFFERENCE_COLUMNS)
    count_lines = [
        f"**{html.escape(row.system)}** vs **{html.escape(row.reference)}**"
        + (" (the preset's own effect)" if row.comparison == PRESET_EFFECT else "")
        + f" on NDCG@10 over {row.n} users" + ("" if row.population == ALL_USERS else f" ({row.population})")
        + f": improved **{row.improved}**, unchanged **{row.unchanged}**, worsened **{row.worsened}** · "
        f"Δ {row.difference:+.4f} (95% CI {row.ci_low:+.4f} .. {row.ci_high:+.4f})"
        for row in paired[(paired["metric"] == "NDCG@10") & (paired["n"] > 0)].itertuples()]
    counts = "\n\n".join([f"**{html.escape(recall.describe())}**",
                           *(count_lines or ["Add an adapter to see paired differences to the base."])])
    scatter = scatter_figure(per_user, summary)
    moved = compare_movers(per_user, summary, count=movers).rename(columns=_MOVER_NAMES)
    for column in ("reference p(truth)", "p(truth)", "Δ NDCG@10"):
        moved[column] = moved[column].map(_round)
    shown = go.Figure(scatter) if scatter else empty_figure("add an adapter to compare with the base")
    return CompareView(metrics=metrics, differences=differences_frame, counts=counts, scatter=shown,
                       movers=moved[_MOVER_COLUMNS])


def _round(value: Any) -> float | None:
    return None if value is None or pd.isna(value) else round(float(value), 4)


# -- Fine-tune ----------------------------------------------------------------------------------

def progress_html(status: Any) -> str:
    """A progress bar with step, loss and ETA from a job status (jobs.JobStatus)."""
    if status is None or status.state == "idle":
        return '<div class="ri-progress-text">No fine-tune has run yet.</div>'
    fraction = status.step / status.total_steps if status.total_steps else 0.0
    if status.state == "done":
        fraction = 1.0
    state = status.state if not status.stage or not status.active else f"{status.state} ({status.stage})"
    parts = [f"<b>{html.escape(status.name)}</b>: {html.escape(state)}"]
    if status.total_steps:
        parts.append(f"step {status.step}/{status.total_steps}")
    if status.letter_losses:
        parts.append(f"letter loss {status.letter_losses[-1][1]:.4f}")
    if status.uniform_loss:
        parts.append(f"ln N = {status.uniform_loss:.3f}")
    if status.total_losses:
        parts.append(f"total loss {status.total_losses[-1][1]:.4f}")
    if status.eta is not None and status.state in ("running", "cancelling"):
        parts.append(f"ETA {_duration(status.eta)}")
    if status.elapsed is not None:
        parts.append(f"elapsed {_duration(status.elapsed)}")
    text = " · ".join(parts)
    if status.message:
        text += f"<br>{html.escape(status.message)}"
    return (f'<div class="ri-progress"><div style="width: {100 * min(fraction, 1.0):.1f}%"></div></div>'
            f'<div class="ri-progress-text">{text}</div>')


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}" if seconds >= 3600 \
        else f"{seconds // 60}:{seconds % 60:02d}"


LETTER_LOSS_NAME = "letter loss (answer letter only)"
TOTAL_LOSS_NAME = "total loss (letter + end-of-turn tokens)"


def loss_chart(status: Any) -> go.Figure:
    """The letter loss per step beside ln N (a uniform guess over the letters), and the total loss, both named."""
    if status is None or not (status.letter_losses or status.total_losses):
        return empty_figure("training loss appears here once steps run")
    figure = go.Figure()
    for name, points, style in ((LETTER_LOSS_NAME, status.letter_losses, {"color": BAR_COLOR}),
                                (TOTAL_LOSS_NAME, status.total_losses, {"color": MUTED_COLOR, "dash": "dot"})):
        if points:
            steps, losses = zip(*points)
            figure.add_scatter(x=steps, y=losses, mode="lines+markers", name=name, line=style, marker={"size": 4})
    if status.uniform_loss:
        figure.add_hline(y=status.uniform_loss, line_dash="dash", line_color=TRUTH_COLOR,
                         annotation_text=f"ln N = {status.uniform_loss:.2f}: letter loss of a uniform guess",
                         annotation_position="top right")
    return with_layout(figure, "Training loss: compare the letter loss with ln N",
                       xaxis={"title": "step", "tickformat": "d"}, yaxis={"title": "loss", "rangemode": "tozero"},
                       showlegend=True, legend={"orientation": "h", "y": -0.25, "x": 0, "xanchor": "left"})


def eval_chart(status: Any) -> go.Figure:
    """Validation NDCG@10 (and Recall@10) at each evaluation of the run."""
    if status is None or not status.evals:
        return empty_figure("validation NDCG@10 appears here after the first evaluation")
    steps = [step for step, _ in status.evals]
    figure = go.Figure()
    for metric, color in (("NDCG@10", TRUTH_COLOR), ("Recall@10", BAR_COLOR)):
        values = [metrics.get(metric) for _, metrics in status.evals]
        if any(value is not None for value in values):
            figure.add_scatter(x=steps, y=values, mode="lines+markers", name=f"validation {metric}",
                               line={"color": color})
    return with_layout(figure, "Validation metrics", xaxis={"title": "step", "tickformat": "d"},
                       yaxis={"title": "metric", "range": [0, 1]})


def result_markdown(status: Any) -> str:
    """The result card of a finished run: adapter, settings and validation metrics before and after."""
    if status is None or status.state in ("idle", "running", "cancelling"):
        return ""
    name = html.escape(status.name)
    if status.state == "failed":
        return f"### ✖ Fine-tune `{name}` failed\n\n{html.escape(status.message or '')}"
    if status.state == "cancelled":
        return f"### Fine-tune `{name}` cancelled\n\nNothing was published. {html.escape(status.message or '')}"
    report = status.result or {}
    lines = [f"### ✔ Adapter `{name}` is ready", "It is now listed in every adapter picker."]
    validation = report.get("validation") or {}
    before, after = validation.get("before") or {}, validation.get("after") or {}
    shown = [metric for metric in METRIC_NAMES if metric in before or metric in after]
    if shown:
        table = ["| validation metric | before | after | Δ |", "|---|---|---|---|"]
        for metric in shown:
            old, new = before.get(metric), after.get(metric)
            delta = f"{new - old:+.4f}" if old is not None and new is not None else "–"
            table.append(f"| {metric} | {_fmt_probability(old)} | {_fmt_probability(new)} | {delta} |")
        lines.append("\n".join(table))
    facts = [f"{report[key]} {label}" for key, label in (("samples", "training samples"), ("steps", "steps"))
             if report.get(key) is not None]
    if report.get("train_time_s"):
        facts.append(f"trained in {_duration(report['train_time_s'])}")
    if report.get("loss_line"):
        facts.append(f"final {report['loss_line']}")
    elif report.get("final_loss") is not None:  # a run logged before the letter loss was reported apart
        facts.append(f"final total loss {report['final_loss']:.4f} (letter + end-of-turn tokens)")
    if facts:
        lines.append(" · ".join(facts))
    if status.config:
        settings = ", ".join(f"{key}={value}" for key, value in status.config.items()
                             if not isinstance(value, list | dict))
        lines.append(f"Settings: {html.escape(settings)}")
    return "\n\n".join(lines)


def training_sample_html(tokenizer: Any, token_ids: Sequence[int], loss_mask: Sequence[bool],
                         caption: str = "") -> str:
    """One training sample's tokens with the loss-carrying ones highlighted."""
    carried = [position for position, flag in enumerate(loss_mask) if flag]
    answer = " ".join(f"{tokenizer.convert_ids_to_tokens(token_ids[p])!r}({token_ids[p]})" for p in carried)
    head = f'<div class="ri-legend">{html.escape(caption)} Loss on {len(carried)} token(s): {html.escape(answer)}</div>'
    return head + token_html(tokenizer, token_ids, loss_mask=loss_mask)


# -- Data ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DataView:
    """The Data tab's statistics for one dataset."""

    summary: str
    history_lengths: go.Figure
    popularity: go.Figure
    top_items: pd.DataFrame


def data_view(dataset: Dataset, *, top: int = 15) -> DataView:
    """Users, items, interactions, history-length histogram and item popularity."""
    lengths = pd.Series([len(sequence) for sequence in dataset.sequences.values()], dtype="int64")
    counts = pd.Series([item for sequence in dataset.sequences.values() for item in sequence]).value_counts()
    interactions = int(lengths.sum())
    summary = (f"**{html.escape(dataset.name)}** · **{len(dataset.sequences)}** users · "
               f"**{len(dataset.items)}** items ({len(counts)} with interactions) · "
               f"**{interactions}** interactions · history length median {lengths.median():.0f}, "
               f"min {lengths.min()}, max {lengths.max()}")
    if dataset.short_users:
        summary += (f"\n\n{len(dataset.short_users)} user(s) with fewer than 3 interactions were left out "
                    "(leave-one-out needs 3).")
    histogram = go.Figure(go.Histogram(x=lengths, marker_color=BAR_COLOR, nbinsx=40))
    with_layout(histogram, "Interactions per user", xaxis_title="interactions", yaxis_title="users")
    popularity = go.Figure(go.Scatter(x=list(range(1, len(counts) + 1)), y=counts.to_numpy(), mode="lines",
                                      line={"color": TRUTH_COLOR}))
    with_layout(popularity, "Item popularity (items by rank)", xaxis_title="item rank",
                yaxis={"title": "interactions", "type": "log", "dtick": 1})
    top_items = pd.DataFrame([{"item": item_id, "title": dataset.items[item_id].title, "interactions": int(count)}
                              for item_id, count in counts.head(top).items()],
                             columns=["item", "title", "interactions"])
    return DataView(summary=summary, history_lengths=histogram, popularity=popularity, top_items=top_items)


def write_report(document: str, name: str) -> str:
    """An HTML report written whole into the temp folder Gradio serves files from; returns its path."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._-")[:80] or "report"
    path = Path(tempfile.gettempdir()) / "rerank-inspector-reports" / f"{safe}.html"
    atomic_write_text(path, document)
    return str(path)
