"""The Data tab: the bundled sample or uploaded files; validation messages with file and line, and statistics."""

from __future__ import annotations

from typing import Any

import gradio as gr

from rerank_app import views
from rerank_app.context import AppContext
from rerank_app.pickers import endpoint
from rerank_core.data.dataset import DataError
from rerank_core.data.loaders import FORMATS

__all__ = ["build", "statistics", "upload"]


def statistics(context: AppContext, dataset: str) -> tuple[Any, ...]:
    view = views.data_view(context.datasets.get(dataset).dataset)
    return view.summary, view.history_lengths, view.popularity, view.top_items


def upload(context: AppContext, paths: list[str] | None, name: str, chosen_format: str) -> tuple[Any, ...]:
    """Load an upload and offer it in this tab's and the Inspect tab's dataset lists; a bad file is a message."""
    try:
        entry = context.datasets.add_upload(paths or [], name or "upload",
                                            None if chosen_format == "auto" else chosen_format)
    except (DataError, ValueError, OSError) as error:
        gr.Warning(str(error))
        return f"**Could not load the upload:** {error}", gr.skip(), gr.skip()
    names = context.datasets.names
    text = (f"Loaded **{entry.name}**: {len(entry.dataset.sequences)} users, {len(entry.dataset.items)} items. "
            "Pick it in the Inspect tab's dataset list.")
    return text, gr.Dropdown(choices=names, value=entry.name), gr.Dropdown(choices=names)


def build(context: AppContext, dataset_picker: gr.Dropdown, demo: gr.Blocks) -> gr.Dropdown:
    """Lay out and wire the tab; an upload is added to dataset_picker (the Inspect tab's). Returns its picker."""
    with gr.Row():
        with gr.Column(scale=2):
            shown = gr.Dropdown(context.datasets.names, value=context.datasets.names[0], label="Dataset")
            summary = gr.Markdown(label="Statistics")
        with gr.Column(scale=3):
            files = gr.File(file_count="multiple", type="filepath", label=(
                "Upload a dataset: items.csv + interactions.csv, MovieLens u.data + u.item / ratings.dat + "
                "movies.dat / ratings.csv + movies.csv, or Amazon reviews + meta JSON lines "
                f"(at most {context.config.max_upload_bytes / 1024**2:g} MiB per file)"))
            with gr.Row():
                upload_name = gr.Textbox(label="Name", placeholder="my-data", scale=2)
                # Custom values reach the loader, whose refusal names the format (Gradio's would not).
                data_format = gr.Dropdown(["auto", *FORMATS], value="auto", label="Format", scale=1,
                                          allow_custom_value=True)
                upload_button = gr.Button("Load upload", variant="primary", scale=1)
            upload_message = gr.Markdown(label="Upload result", elem_id="upload-message")
    with gr.Row():
        lengths = gr.Plot(label="History lengths")
        popularity = gr.Plot(label="Item popularity")
    top_items = gr.Dataframe(wrap=True, label="Most popular items", interactive=False, max_height=320)

    stats_outputs = [summary, lengths, popularity, top_items]
    stats = endpoint(statistics, context)
    # Unpreprocessed, as refusals.api_endpoint: an unknown dataset is refused by name, not as "not in the list".
    shown.change(stats, [shown], stats_outputs, api_name="data_stats", preprocess=False)
    demo.load(stats, [shown], stats_outputs, api_visibility="private")
    upload_button.click(endpoint(upload, context), [files, upload_name, data_format],
                        [upload_message, shown, dataset_picker], api_name="upload_data", concurrency_limit=1,
                        concurrency_id="upload")
    upload_name.submit(endpoint(upload, context), [files, upload_name, data_format],
                       [upload_message, shown, dataset_picker], api_visibility="private", concurrency_limit=1,
                       concurrency_id="upload")
    return shown
