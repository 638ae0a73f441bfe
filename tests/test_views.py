"""The app's views and registry without a server: tables, figures, HTML, caches, uploads, fine-tune preview."""

from __future__ import annotations

import html
import json
import re
from dataclasses import replace
from pathlib import Path

import plotly.graph_objects as go
import pytest
from app_helpers import make_adapter, make_context
from conftest import make_toy_dataset

from rerank_app import views
from rerank_app.context import SessionError
from rerank_app.jobs import JobStatus
from rerank_app.pickers import make_settings
from rerank_app.plots import plot_json
from rerank_core.compare import compare_systems
from rerank_core.data.dataset import DataError, Dataset, Item
from rerank_core.figures import TRUTH_COLOR
from rerank_core.inspector import BASE, Inspector, InspectSettings
from rerank_core.metrics import METRIC_NAMES
from rerank_core.models import load_model
from rerank_core.report import comparison_report, inspection_report

_TAG = re.compile(r"<[^>]+>")


def _plain(fragment: str) -> str:
    """Text of an HTML fragment with the visible-whitespace marks turned back into whitespace."""
    text = html.unescape(_TAG.sub("", fragment))
    return text.replace("↵\n", "\n").replace("·", " ").replace("⇥", "\t")


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    return make_context(tmp_path_factory.mktemp("views"), smol_tokenizer)


@pytest.fixture(scope="module")
def inspection(context):
    return context.inspections.inspect("toy", "tiny-llama", BASE, "u03", make_settings(count=12))


def test_inspect_view_tables_mark_the_truth_and_chart_colours_it(context, inspection) -> None:
    dataset = context.datasets.get("toy").dataset
    view = views.inspect_view(inspection, dataset, context.models.tokenizer("tiny-llama"), model_name="tiny-llama")
    table = view.candidates.data
    truth = inspection.prepared.candidates.target_index
    assert list(table["truth"]).count("★") == 1 and table["truth"].iloc[truth] == "★"
    assert table["p"].sum() == pytest.approx(1.0, abs=1e-3)
    assert sorted(table["rank"]) == list(range(1, 13))
    styles = view.candidates.row_styles
    assert styles[truth] and not styles[truth - 1 if truth else truth + 1]
    # What the page gets: each cell's shown text and style, the truth row's cells highlighted.
    payload = view.candidates.payload()
    assert payload["headers"] == list(table.columns) and len(payload["data"]) == 12
    assert payload["metadata"]["styling"][truth] == [styles[truth]] * 6
    assert payload["metadata"]["display_value"][truth][4] == f"{table['p'].iloc[truth]:.4f}"
    bar = view.chart["data"][0]
    assert bar["x"] == list(inspection.prepared.prompt.letters)
    assert [color == views.TRUTH_COLOR for color in bar["marker"]["color"]] == [i == truth for i in range(12)]
    assert f"rank {inspection.rank} of 12" in view.summary
    assert view.history["text"].tolist() == [dataset.text(item) for item in inspection.prepared.split.history]
    assert len(view.other_tokens) == len(inspection.scores.top_other)


def test_chart_sorted_by_probability_keeps_the_truth_colour(context, inspection) -> None:
    dataset, tokenizer = context.datasets.get("toy").dataset, context.models.tokenizer("tiny-llama")
    bar = views.inspect_view(inspection, dataset, tokenizer, model_name="tiny-llama", order="probability").chart
    bar = bar["data"][0]
    assert bar["y"] == sorted(bar["y"], reverse=True)
    truth_letter = inspection.prepared.prompt.letters[inspection.prepared.candidates.target_index]
    assert bar["marker"]["color"][bar["x"].index(truth_letter)] == views.TRUTH_COLOR
    with pytest.raises(ValueError, match="chart order"):
        views.inspect_view(inspection, dataset, tokenizer, model_name="tiny-llama", order="alphabet")


def test_the_chart_json_is_what_plotly_would_send(context, inspection) -> None:
    """plots.plot_json skips building a plotly Figure; plotly.js must get the same figure, template spelled out."""
    figure = views.inspect_view(inspection, context.datasets.get("toy").dataset,
                                context.models.tokenizer("tiny-llama"), model_name="tiny-llama").chart
    assert json.loads(plot_json(figure)) == json.loads(go.Figure(figure).to_json())


def test_prompt_html_shows_whitespace_and_special_tokens_and_escapes_titles(smol_tokenizer) -> None:
    rendered = smol_tokenizer.apply_chat_template(
        [{"role": "user", "content": "pick:\n<b>Zorro</b>\t & more "}], tokenize=False, add_generation_prompt=True)
    fragment = views.prompt_html(smol_tokenizer, rendered)
    assert "<b>Zorro</b>" not in fragment and "&lt;b&gt;Zorro&lt;/b&gt;" in fragment
    assert '<span class="ri-special">&lt;|im_start|&gt;</span>' in fragment
    assert "↵" in fragment and "⇥" in fragment
    assert _plain(fragment) == rendered


def test_token_view_reproduces_the_prompt_and_marks_letters_and_answer(context, inspection) -> None:
    prepared = inspection.prepared
    letter_ids = [token.token_id for token in prepared.letter_tokens]
    fragment = views.token_html(context.models.tokenizer("tiny-llama"), prepared.token_ids,
                                text=prepared.prompt.rendered, letter_ids=letter_ids,
                                answer_position=len(prepared.token_ids) - 1)
    cells = re.findall(r'<span class="(ri-tok[^"]*)" title="[^"]*"><span>(.*?)</span><span class="ri-id">(\d+)',
                       fragment, flags=re.S)
    assert [int(token_id) for _, _, token_id in cells] == list(prepared.token_ids)
    assert "".join(_plain(text) for _, text, _ in cells) == prepared.prompt.rendered
    assert "ri-answer" in cells[-1][0]
    marked = [int(token_id) for classes, _, token_id in cells if "ri-letter" in classes]
    assert marked and set(marked) <= set(letter_ids)


def test_audit_rows_with_flags_stand_out(context, inspection) -> None:
    tokens = list(inspection.prepared.letter_tokens)
    tokens[2] = replace(tokens[2], flags=("shared_id",))
    flagged = replace(inspection, prepared=replace(inspection.prepared, letter_tokens=tuple(tokens)))
    view = views.inspect_view(flagged, context.datasets.get("toy").dataset, context.models.tokenizer("tiny-llama"),
                              model_name="tiny-llama")
    assert "1 of 12 letters flagged" in view.audit_note and ": C" in view.audit_note
    styles = view.audit.row_styles
    assert styles[2] and not styles[1] and not styles[3]
    assert view.audit.data["flags"].tolist()[2] == "shared_id"
    clean = views.inspect_view(inspection, context.datasets.get("toy").dataset, context.models.tokenizer("tiny-llama"),
                               model_name="tiny-llama")
    assert "all 12 letters clean" in clean.audit_note


def test_inspections_are_cached_and_bad_requests_name_the_fix(context) -> None:
    settings = make_settings(count=8)
    first = context.inspections.inspect("toy", "tiny-llama", BASE, "u05", settings)
    assert context.inspections.inspect("toy", "tiny-llama", BASE, " u05 ", settings) is first
    with pytest.raises(SessionError, match="not in dataset toy"):
        context.inspections.inspect("toy", "tiny-llama", BASE, "nobody", settings)
    with pytest.raises(SessionError, match="no dataset named"):
        context.inspections.inspect("elsewhere", "tiny-llama", BASE, "u05", settings)
    with pytest.raises(ValueError, match="no adapter named"):
        context.inspections.inspect("toy", "tiny-llama", "missing-adapter", "u05", settings)
    with pytest.raises(SessionError, match="at most 3 adapters"):
        context.inspections.compare_user("toy", "tiny-llama", ["a", "b", "c", "d"], "u05", settings)


def test_compare_view_pairs_adapters_with_the_base(context) -> None:
    loaded = context.models.loaded("tiny-llama")
    make_adapter(loaded, context.config.adapters_root, "lora-a")
    assert "lora-a" in context.models.adapter_names("tiny-llama")
    settings = make_settings(count=10)
    inspections = context.inspections.compare_user("toy", "tiny-llama", ["lora-a"], "u01", settings)
    assert [item.system for item in inspections] == [BASE, "lora-a"]
    assert inspections[0].scores.letter_probs != inspections[1].scores.letter_probs
    figure = views.compare_user_chart(inspections)
    assert [trace.name for trace in figure.data] == [BASE, "lora-a"]
    assert views.compare_user_table(inspections)["truth rank"].tolist() == [item.rank for item in inspections]

    seen: list[tuple[int, int]] = []
    per_user, summary = context.inspections.compare_users("toy", "tiny-llama", ["lora-a"], settings, 12,
                                              progress=lambda done, total: seen.append((done, total)))
    assert seen[-1] == (24, 24)
    again = context.inspections.compare_users("toy", "tiny-llama", ["lora-a"], settings, 12)
    assert again[0] is per_user  # cached: switching back is instant
    view = views.compare_view(per_user, summary)
    # The baselines join the tables on the same candidates; scatter and movers stay with the adapter.
    assert view.metrics["system"].tolist() == [BASE, "lora-a", "random", "popularity", "retriever"]
    assert view.metrics.loc[0, "NDCG@10"] == pytest.approx(per_user[per_user.system == BASE]["NDCG@10"].mean(),
                                                          abs=1e-4)
    adapter_rows = view.differences[view.differences["system"] == "lora-a"]
    assert adapter_rows["metric"].tolist() == list(METRIC_NAMES)
    ndcg = adapter_rows.set_index("metric").loc["NDCG@10"]
    assert ndcg["improved"] + ndcg["unchanged"] + ndcg["worsened"] == 12
    assert f"improved **{ndcg['improved']}**" in view.counts
    assert [trace.name for trace in view.scatter.data] == ["lora-a vs base", "no change"]
    for row in view.movers.to_dict(orient="records"):
        assert row["reference"] == BASE
        assert (row["change"] == "improved") == (row["Δ NDCG@10"] > 0 or row["p(truth)"] > row["reference p(truth)"])
    # The same numbers as compare_systems on a fresh Inspector (a fresh model too: the app's now carries LoRA).
    direct = Inspector(context.datasets.get("toy").dataset, load_model(context.models.path("tiny-llama")),
                       adapters_root=str(context.config.adapters_root))
    _, direct_summary = compare_systems(direct, context.datasets.users("toy")[:12], settings, [BASE, "lora-a"])
    llm_rows = summary[summary["system"].isin([BASE, "lora-a"])]
    assert direct_summary["mean"].tolist() == pytest.approx(llm_rows["mean"].tolist(), abs=1e-4)


def test_data_view_counts_users_items_and_popularity() -> None:
    dataset = make_toy_dataset(users=10, items=40, length=5)
    view = views.data_view(dataset, top=5)
    assert "**10** users" in view.summary and "**40** items" in view.summary and "**50** interactions" in view.summary
    assert sorted(view.history_lengths.data[0].x) == [5] * 10
    counts = view.top_items["interactions"].tolist()
    assert counts == sorted(counts, reverse=True) and len(counts) == 5
    assert sum(view.popularity.data[0].y) == 50


def test_fine_tune_views_follow_the_job_status() -> None:
    assert "No fine-tune" in views.progress_html(None)
    status = JobStatus(job_id="j", name="my-lora", state="running", step=5, total_steps=20, uniform_loss=2.9957,
                       letter_losses=[(1, 3.2), (5, 2.5)], total_losses=[(1, 1.1), (5, 0.8)],
                       evals=[(0, {"NDCG@10": 0.2, "Recall@10": 0.5})], eta=61.0,
                       stage="training")
    bar = views.progress_html(status)
    assert 'style="width: 25.0%"' in bar and "step 5/20" in bar and "ETA 1:01" in bar
    assert "letter loss 2.5000 · ln N = 2.996 · total loss 0.8000" in bar
    loss = views.loss_chart(status)
    # The letter loss (the one ln N bounds) and the total, each on its own named trace.
    assert [trace.name for trace in loss.data] == ["letter loss (answer letter only)",
                                                   "total loss (letter + end-of-turn tokens)"]
    assert list(loss.data[0].y) == [3.2, 2.5] and list(loss.data[1].y) == [1.1, 0.8]
    assert loss.layout.shapes[0].y0 == pytest.approx(2.9957)
    assert [trace.name for trace in views.eval_chart(status).data] == ["validation NDCG@10", "validation Recall@10"]
    assert views.result_markdown(status) == ""
    done = replace(status, state="done", result={"validation": {"before": {"NDCG@10": 0.2}, "after": {"NDCG@10": 0.5}},
                                                 "samples": 300, "steps": 75, "loss_line": "letter loss 2.4400 "
                                                 "(ln N = 2.9957); total loss 0.8100 (letter + end-of-turn tokens)"})
    card = views.result_markdown(done)
    assert "`my-lora` is ready" in card and "| NDCG@10 | 0.200 | 0.500 | +0.3000 |" in card
    assert "final letter loss 2.4400 (ln N = 2.9957); total loss 0.8100 (letter + end-of-turn tokens)" in card
    failed = replace(status, state="failed", message="boom <x>")
    assert "failed" in views.result_markdown(failed) and "&lt;x&gt;" in views.result_markdown(failed)


def test_training_preview_highlights_the_answer_tokens(context) -> None:
    tokenizer, token_ids, loss_mask, caption = context.finetune.preview(
        "toy", "tiny-llama", "quick", {"candidates": 10, "preset": "seed_after"})
    carried = [token_id for token_id, flag in zip(token_ids, loss_mask) if flag]
    answer = re.search(r"answer letter '(\w)'", caption).group(1)
    assert tokenizer.decode(carried[:1]) == answer
    assert not any(loss_mask[:len(loss_mask) - len(carried)])
    fragment = views.training_sample_html(tokenizer, token_ids, loss_mask, caption)
    assert fragment.count("ri-tok ri-loss") == len(carried) + 1  # the legend shows one too
    with pytest.raises(ValueError, match=r"learning_rate must be in \(0, 1\]"):
        context.finetune.preview("toy", "tiny-llama", "quick", {"learning_rate": 0})


def test_uploads_are_sanitised_size_limited_and_validated(context, tmp_path: Path) -> None:
    good = tmp_path / "good"
    good.mkdir()
    (good / "items.csv").write_text("item_id,title\n" + "".join(f"i{i},Book {i}\n" for i in range(30)))
    (good / "interactions.csv").write_text("user_id,item_id,timestamp\n" + "".join(
        f"u{u},i{(u + k) % 30},{1000 + k}\n" for u in range(5) for k in range(6)))
    entry = context.datasets.add_upload([good / "items.csv", good / "interactions.csv"], "../../toy")
    assert entry.name == "toy-2"  # never shadows a registered dataset, never leaves the upload area
    assert entry.path.parent == context.config.upload_root
    assert sorted(p.name for p in entry.path.iterdir()) == ["interactions.csv", "items.csv"]
    assert context.datasets.get("toy-2").dataset.users == ["u0", "u1", "u2", "u3", "u4"]

    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "items.csv").write_text("item_id;title\ni1;A\n")
    (bad / "interactions.csv").write_text("user_id,item_id,timestamp\n")
    with pytest.raises(DataError) as caught:
        context.datasets.add_upload([bad / "items.csv", bad / "interactions.csv"], "bad")
    assert "items.csv" in str(caught.value) and "line 1" in str(caught.value)
    assert str(context.config.upload_root) not in str(caught.value)
    big = tmp_path / "big.csv"
    big.write_bytes(b"x" * (context.config.max_upload_bytes + 1))
    with pytest.raises(DataError, match="upload limit"):
        context.datasets.add_upload([big], "big")
    left = sorted(path.name for path in context.config.upload_root.iterdir())
    assert left == ["toy-2"]


def test_titles_from_uploads_are_escaped_everywhere(context) -> None:
    dataset = Dataset("xss", {f"i{i}": Item(f"i{i}", f"<img src=x onerror=alert({i})>") for i in range(30)},
                      {f"u{u}": [f"i{(u + k) % 30}" for k in range(5)] for u in range(3)})
    loaded = context.models.loaded("tiny-llama")
    result = Inspector(dataset, loaded).inspect("u1", InspectSettings(candidates=make_settings(count=5).candidates))
    view = views.inspect_view(result, dataset, loaded.tokenizer, model_name="tiny-llama")
    for fragment in (view.prompt, view.tokens, view.summary):
        assert "<img" not in fragment


def _report_movers(document: str) -> list[tuple[str, str, str, str]]:
    """(user, system, reference, change) of each row of the report's movers table, read back from its HTML."""
    section = document.split("<h2>Most improved and most worsened users", 1)[1].split("</table>", 1)[0]
    rows = re.findall(r"<tr>(.*?)</tr>", section.split("<tbody>", 1)[1], re.S)
    cells = [[html.unescape(cell) for cell in re.findall(r"<td>(.*?)</td>", row, re.S)] for row in rows]
    return [(user, system, reference, change) for user, system, reference, change, *_ in cells]


def test_the_page_and_the_report_list_the_same_movers_and_draw_the_same_charts(context) -> None:
    make_adapter(context.models.loaded("tiny-llama"), context.config.adapters_root, "lora-twin", preset="seed_after")
    settings = make_settings(count=10)
    per_user, summary = context.inspections.compare_users("toy", "tiny-llama", ["lora-twin"], settings, 12)
    view = views.compare_view(per_user, summary, movers=3)
    document = comparison_report(per_user, summary, settings, mover_count=3)
    page_movers = [(row["user_id"], row["system"], row["reference"], row["change"])
                   for row in view.movers.to_dict(orient="records")]
    assert page_movers == _report_movers(document)
    # The adapter against base on its preset, and that preset's own effect on the base: both listed.
    assert {system for _, system, _, _ in page_movers} <= {"lora-twin", "base @ seed_after"}
    assert page_movers and all(change in {"improved", "worsened"} for *_, change in page_movers)
    charts = json.loads(re.search(r'id="ri-figures">(.*?)</script>', document, re.S).group(1))
    drawn = [(trace.name, list(trace.x), list(trace.y), trace.marker.color) for trace in view.scatter.data
             if trace.mode == "markers"]
    written = [(trace["name"], trace["x"], trace["y"], trace["marker"]["color"])
               for trace in charts["scatter"]["data"] if trace["mode"] == "markers"]
    assert drawn == written and [name for name, *_ in drawn] == ["base @ seed_after vs base",
                                                                  "lora-twin vs base @ seed_after"]

    inspection = context.inspections.inspect("toy", "tiny-llama", "lora-twin", "u04", settings)
    bars = views.inspect_view(inspection, context.datasets.get("toy").dataset, context.models.tokenizer("tiny-llama"),
                              model_name="tiny-llama").chart["data"][0]
    (letters,) = json.loads(re.search(r'id="ri-figures">(.*?)</script>', inspection_report(
        inspection, context.datasets.get("toy").dataset), re.S).group(1))["letters"]["data"]
    assert (bars["x"], bars["y"], bars["marker"]["color"]) == (letters["x"], letters["y"], letters["marker"]["color"])
    assert letters["marker"]["color"].count(TRUTH_COLOR) == 1
