"""The Blocks app assembled from its tabs, the context built from the command line, and the launch."""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gradio as gr

from rerank_app import views
from rerank_app.context import AppConfig, AppContext, DatasetEntry, ModelEntry
from rerank_app.jobs import JobRunner
from rerank_app.memory import keep_memory_flat
from rerank_app.pickers import endpoint, refresh_pickers
from rerank_app.tabs import compare, data, diagnose, finetune
from rerank_app.tabs import inspect as inspect_tab
from rerank_core.adapters import adapters_root
from rerank_core.compute import serve_from_compute_thread
from rerank_core.data.builtin import MOVIELENS_100K_REAL, builtin_dataset_path, bundled_sample_path
from rerank_core.data.dataset import DataError
from rerank_core.data.loaders import load_dataset
from rerank_core.model_catalog import list_models, models_dirs
from rerank_core.model_refs import parse_model_ref
from rerank_core.models import ModelError, embedded_model_folder, load_model

__all__ = ["REAL_DATASET", "SAMPLE_DATASET", "build_app", "build_context", "builtin_datasets", "cache_sizes",
           "end_session", "launch", "mark_missing_plot_libraries"]

log = logging.getLogger("rerank_app")

SAMPLE_DATASET = "sample"
REAL_DATASET = "MovieLens 100K (real)"
# How often an open page checks for new datasets and adapters (a cheap directory listing).
PICKER_REFRESH_S = 5.0
# Gradio keeps every session's copy of the page's configuration and last outputs (~0.2-1 MB each) for its 10,000
# most recent sessions, and never drops a closed one before that. An open page polls every PICKER_REFRESH_S, which
# keeps it among the most recent, so only closed pages (and idle API clients) are forgotten.
MAX_SESSIONS = 256


def build_app(context: AppContext) -> gr.Blocks:
    """The Blocks app over an already-built context (tests pass tiny models; main() the real ones)."""
    with gr.Blocks(title="Rerank Inspector") as demo:
        gr.Markdown("## Rerank Inspector\nEvery link of the letter-reranking chain: prompt → chat template → "
                    "letter token IDs → last-position logits → probabilities → ranking → metrics.")
        with gr.Tabs(selected="inspect") as tabs:
            with gr.Tab("Inspect", id="inspect"):
                controls, inspect_outputs, random_button = inspect_tab.build(context)
                inspect_tab.wire(context, controls, inspect_outputs, random_button, demo)
            with gr.Tab("Compare", id="compare"):
                compare_adapters = compare.build(context, controls, tabs, inspect_outputs, demo)
            with gr.Tab("Fine-tune", id="finetune"):
                finetune.build(context, controls, compare_adapters, demo)
            with gr.Tab("Data", id="data"):
                data_picker = data.build(context, controls.dataset, demo)
            with gr.Tab("Diagnose", id="diagnose"):
                diagnose_system, diagnose_adapters = diagnose.build(context, controls, demo)
        # Every picker follows the datasets and adapters on disk, whoever added them.
        seen = gr.State(None)
        outputs = [controls.adapter, diagnose_system, compare_adapters, diagnose_adapters, controls.dataset,
                   data_picker, controls.model, seen]
        refresher = endpoint(refresh_pickers, context)
        # A closed or reloaded page: its long runs stop instead of scoring for nobody.
        demo.unload(endpoint(end_session, context))
        timer = gr.Timer(PICKER_REFRESH_S)
        for trigger in (timer.tick, demo.load):
            trigger(refresher, [controls.model, seen], outputs, api_visibility="private", concurrency_limit=None,
                    show_progress="hidden")
    return demo


def cache_sizes(context: AppContext, demo: gr.Blocks) -> dict[str, tuple[int, int]]:
    """Entries and bound of everything the app keeps between requests: the load benchmark reports them."""
    holder = getattr(demo, "state_holder", None)  # set at launch
    sessions = (len(holder.session_data), MAX_SESSIONS) if holder is not None else (0, MAX_SESSIONS)
    return {**context.inspections.cache_sizes(), "views": inspect_tab.cached_views(), "sessions": sessions}


def end_session(context: AppContext, request: gr.Request = None) -> None:
    """A page went away: every long run it started stops at its next chunk."""
    context.stops.stop(getattr(request, "session_hash", None))


def build_context(args: argparse.Namespace) -> AppContext:
    """Load the datasets and the first model named on the command line (others load on first use)."""
    serve_from_compute_thread()  # the app's tensor work, this model's load included, runs on one thread
    defaults = AppConfig()
    config = AppConfig(adapters_root=adapters_root(args.adapters_dir), upload_root=defaults.upload_root,
                       runs_root=defaults.runs_root, max_upload_bytes=int(args.max_upload_mb * 1024**2),
                       device=args.device, dtype=args.dtype, chat_template=getattr(args, "chat_template", None),
                       max_memory=getattr(args, "max_memory", None),
                       typed_model_roots=typed_model_roots(getattr(args, "host", "127.0.0.1"),
                                                           getattr(args, "models_dir", None)))
    datasets = []
    if args.data:
        path = Path(args.data)
        datasets.append(DatasetEntry(path.name if path.is_dir() else path.parent.name,
                                     load_dataset(path, args.data_format), path))
    datasets.extend(builtin_datasets())
    paths = list(args.model or [])
    try:
        paths.append(str(embedded_model_folder()))
    except ModelError as error:
        if not paths:
            raise
        log.warning("the embedded model is not offered: %s", error)
    models = []
    for path in dict.fromkeys(paths):
        name = parse_model_ref(path).display_name
        if any(entry.name == name for entry in models):
            name = str(path)
        models.append(ModelEntry(name, path))
    models.extend(catalog_entries(getattr(args, "models_dir", None), taken={entry.name for entry in models}))
    models[0].loaded = load_model(models[0].path, device=args.device, dtype=args.dtype,
                                  chat_template=config.chat_template, max_memory=config.max_memory)
    jobs = JobRunner(config.runs_root, adapters=config.adapters_root)
    context = AppContext(config, datasets, models, jobs=jobs)
    context.datasets.restore_uploads()
    return context


def typed_model_roots(host: str, models_dirs_given: Sequence[str] | None) -> tuple[Path, ...] | None:
    """Where a model path typed into the page may lie: anywhere on an app bound to this machine only, else only
    in the --models-dir folders (others reaching the app must not load or probe the server's files)."""
    if host in ("127.0.0.1", "localhost", "::1"):
        return None
    return tuple(models_dirs(models_dirs_given))


def catalog_entries(models_dirs: Sequence[str] | None, taken: set[str]) -> list[ModelEntry]:
    """The model picker's further choices: every causal LM with weights in the local Hugging Face cache and every
    GGUF in --models-dir / $RERANK_INSPECTOR_MODELS, by reference (loaded on first pick); unreadable ones logged."""
    catalog = list_models(models_dirs, include_embedded=False)
    for note in catalog.notes:
        log.warning("model picker: %s", note)
    return [ModelEntry(entry.name, entry.reference) for entry in catalog.entries
            if entry.weights_present and entry.name not in taken]


def builtin_datasets() -> list[DatasetEntry]:
    """The synthetic sample (the default), then the real MovieLens 100K when the recbole package is installed."""
    entries = [DatasetEntry(SAMPLE_DATASET, load_dataset(None), bundled_sample_path())]
    try:
        real = builtin_dataset_path(MOVIELENS_100K_REAL)
        entries.append(DatasetEntry(REAL_DATASET, load_dataset(real, "recbole"), real))
    except DataError as error:  # the app still serves the sample; the message says how to install recbole
        log.warning("%s is not offered: %s", REAL_DATASET, error)
    return entries


def mark_missing_plot_libraries() -> None:
    """gradio's Plot asks for bokeh's version whenever a session copies the page's configuration (each page load,
    each call over the /call/ route): without bokeh installed that is a failed import searching sys.path for every
    Plot of the page, about three quarters of setting up a session here. A None in sys.modules is Python's own
    mark for "not importable": the import then fails at once."""
    if "bokeh" not in sys.modules and importlib.util.find_spec("bokeh") is None:
        sys.modules["bokeh"] = None  # type: ignore[assignment]


def launch(demo: gr.Blocks, *, host: str = "127.0.0.1", port: int | None = None, share: bool = False,
           auth: tuple[str, str] | None = None, max_upload_bytes: int = 100 * 1024**2, queue_size: int = 64,
           block: bool = True) -> Any:
    """Serve with queue limits: scoring, comparisons, jobs and uploads each have their own concurrency group."""
    keep_memory_flat()
    mark_missing_plot_libraries()
    demo.queue(default_concurrency_limit=2, max_size=queue_size)
    return demo.launch(server_name=host, server_port=port, share=share, auth=auth, css=views.APP_CSS, js=views.APP_JS,
                       theme=gr.themes.Soft(), max_file_size=max_upload_bytes, prevent_thread_lock=not block,
                       show_error=True, quiet=not block, state_session_capacity=MAX_SESSIONS)
