"""What the app keeps between requests stays bounded: samplers, letter sets, score keys, Gradio sessions."""

from __future__ import annotations

import sys
from pathlib import Path

from app_helpers import make_context
from gradio_client import Client

from rerank_app.pickers import make_settings
from rerank_app.ports import free_port
from rerank_app.server import MAX_SESSIONS, build_app, cache_sizes, launch
from rerank_core.inspector import MAX_LETTER_SETS, MAX_SAMPLERS, Inspector


def test_a_client_walking_through_seeds_and_options_keeps_a_bounded_set_of_samplers_and_letters(
        toy_dataset, tiny_smol) -> None:
    inspector = Inspector(toy_dataset, tiny_smol)
    for seed in range(MAX_SAMPLERS + 5):
        inspector.prepare("u01", make_settings(count=5, seed=seed))
    for number in range(MAX_LETTER_SETS + 5):
        inspector.letter_tokens(make_settings(template_kwargs=f'{{"option": {number}}}'), 5)
    sizes = inspector.cache_sizes()
    assert sizes["samplers"] == (MAX_SAMPLERS, MAX_SAMPLERS)
    assert sizes["letter sets"] == (MAX_LETTER_SETS, MAX_LETTER_SETS)


def test_score_cache_keys_do_not_hold_the_prompt(toy_dataset, tiny_smol) -> None:
    inspector = Inspector(toy_dataset, tiny_smol)
    inspection = inspector.inspect("u01", make_settings(count=5))
    (key,) = list(inspector.cache.keys())
    prompt_size = sys.getsizeof(inspection.prepared.token_ids)
    assert sum(sys.getsizeof(part) for part in key) < prompt_size / 4, (key, prompt_size)
    assert inspector.inspect("u01", make_settings(count=5)).scores == inspection.scores  # answered from the cache


def test_the_served_app_keeps_a_bounded_number_of_sessions_and_reports_its_caches(tmp_path: Path,
                                                                                     smol_tokenizer) -> None:
    context = make_context(tmp_path, smol_tokenizer)
    demo = build_app(context)
    port = free_port()
    launch(demo, port=port, block=False)
    try:
        assert demo.state_session_capacity == MAX_SESSIONS  # Gradio's default keeps 10,000 sessions
        Client(f"http://127.0.0.1:{port}/", verbose=False).predict(user_id="u01", count=5, api_name="/inspect_json")
        sizes = cache_sizes(context, demo)
    finally:
        demo.close()
    assert sizes["inspections"][0] == 1 and sizes["sessions"][1] == MAX_SESSIONS
    assert all(entries <= bound for entries, bound in sizes.values()), sizes
