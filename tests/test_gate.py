"""Interactive requests go first: a long run steps aside at its next chunk; Stop and a closed page end it."""

from __future__ import annotations

import threading

import gradio as gr
import pytest
from app_helpers import make_context

from rerank_app.context import BACKGROUND_CHUNK
from rerank_app.gate import ModelGate, StopRegistry
from rerank_app.pickers import Pickers
from rerank_app.tabs import diagnose
from rerank_core.diagnostics import OrderSpec
from rerank_core.inspector import BASE
from rerank_core.progress import Cancelled

PICKERS = Pickers(dataset="toy", model="tiny-llama", count=6)


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    return make_context(tmp_path_factory.mktemp("gate"), smol_tokenizer)


def test_inspect_is_served_inside_a_long_diagnostic(context) -> None:
    """The inspect request that arrives during chunk 1 is answered before chunk 2 is scored."""
    gate = context.models.gate("tiny-llama")
    answered = threading.Event()
    seen_at_chunk: list[bool] = []

    def inspect_now() -> None:
        context.inspections.inspect("toy", "tiny-llama", BASE, "u05", PICKERS.settings())
        answered.set()

    def progress(done: int, total: int) -> None:
        seen_at_chunk.append(answered.is_set())
        if done == 1:  # the first user is scored: an Inspect request arrives and waits for the model
            threading.Thread(target=inspect_now, daemon=True).start()
            while gate.waiting == 0 and not answered.is_set():
                threading.Event().wait(0.005)

    summary = context.inspections.position_bias_users("toy", "tiny-llama", BASE, 6, PICKERS.settings(),
                                          OrderSpec(mode="permutations", count=40), progress=progress)
    assert len(summary.users) == 6
    # Not answered when user 1 finished (the request had only just arrived), answered by user 2.
    assert seen_at_chunk[1] is False and all(seen_at_chunk[2:])


# Long runs over users the app offers besides position bias, each with a user that no other test inspects.
LONG_RUNS = {
    "compare": (lambda context, progress: context.inspections.compare_users(
        "toy", "tiny-llama", [], PICKERS.settings(), 30, progress=progress), "u08"),
    "letter mass": (lambda context, progress: context.inspections.letter_mass(
        "toy", "tiny-llama", [], 30, PICKERS.settings(), progress=progress), "u09"),
    "letter prior": (lambda context, progress: context.inspections.letter_prior("toy", "tiny-llama", BASE, 30,
                                                                    PICKERS.settings(), "placeholder", "item",
                                                                    progress=progress), "u10"),
}


@pytest.mark.parametrize("run", list(LONG_RUNS))
def test_inspect_is_served_inside_a_long_run_over_users_at_diagnostic_granularity(context, run) -> None:
    """Compare over 30 users (and letter mass and prior) steps aside every BACKGROUND_CHUNK users, as position bias
    does: the inspect request that arrives after the first chunk is answered before the second is scored."""
    long_run, user = LONG_RUNS[run]
    gate = context.models.gate("tiny-llama")
    answered = threading.Event()
    seen: list[tuple[int, bool]] = []

    def inspect_now() -> None:
        context.inspections.inspect("toy", "tiny-llama", BASE, user, PICKERS.settings())
        answered.set()

    def progress(done: int, total: int) -> None:
        seen.append((done, answered.is_set()))
        if len(seen) == 1:  # the first chunk is scored: an Inspect request arrives and waits for the model
            threading.Thread(target=inspect_now, daemon=True).start()
            while gate.waiting == 0 and not answered.is_set():
                threading.Event().wait(0.005)

    long_run(context, progress)
    assert seen[0] == (BACKGROUND_CHUNK, False)  # the first look at the gate comes after one chunk, not 32 users
    assert seen[1] == (2 * BACKGROUND_CHUNK, True)  # the waiting request went before the second chunk


def test_stop_ends_a_long_run_at_the_next_chunk_and_frees_the_model(context) -> None:
    session = "page-1"

    class Request:
        session_hash = session

    def progress(done: float, desc: str = "") -> None:
        if done > 0:  # after the first user: the page's Stop button
            assert diagnose.stop_runs(context, Request()) == "Stop requested for 1 running job(s)."

    with pytest.raises(Cancelled, match="stopped on request after 1 of 8"):
        diagnose.diagnose_position_bias_users(context, PICKERS, BASE, users=8, orders="permutations",
                                              permutations=30, request=Request(), progress=progress)
    assert context.stops.running(session) == 0
    assert diagnose.stop_runs(context, Request()) == "Nothing is running."
    context.inspections.inspect("toy", "tiny-llama", BASE, "u06", PICKERS.settings())  # the gate is free again


def test_gate_and_registry_units() -> None:
    gate = ModelGate()
    with gate.background() as step_aside:
        step_aside()  # nobody waits: returns at once
    with gate.interactive():
        assert gate.waiting == 0
    registry = StopRegistry()
    with registry.run("a") as flag_a, registry.run("b") as flag_b:
        assert registry.stop("a") == 1 and flag_a.is_set() and not flag_b.is_set()
    assert registry.running("a") == 0


def test_every_picker_follows_new_adapters_and_uploads_come_back_after_a_restart(tmp_path, smol_tokenizer) -> None:
    from app_helpers import make_adapter

    from rerank_app.context import AppContext
    from rerank_app.pickers import refresh_pickers

    context = make_context(tmp_path, smol_tokenizer)
    first = refresh_pickers(context, "tiny-llama", None)
    unchanged = refresh_pickers(context, "tiny-llama", first[-1])
    assert len(first) == 8 and all(part == gr.skip() for part in unchanged[:7])  # nothing changed, nothing sent
    make_adapter(context.models.loaded("tiny-llama"), context.config.adapters_root, "fresh")
    _single, diagnose_single, multi, _diagnose_multi, *_rest, key = refresh_pickers(context, "tiny-llama", first[-1])
    assert ("fresh", "fresh") in diagnose_single.choices and ("fresh", "fresh") in multi.choices
    assert "fresh" in key[1]
    entry = context.datasets.add_upload([tmp_path / "toy" / "items.csv", tmp_path / "toy" / "interactions.csv"], "mine")
    assert entry.name in refresh_pickers(context, "tiny-llama", key)[-1][0]
    # A restart: a new context over the same folders offers the upload again.
    restarted = AppContext(context.config, [context.datasets.get("toy")], [context.models.entry("tiny-llama")])
    assert restarted.datasets.restore_uploads() == ["mine"] and "mine" in restarted.datasets.names
