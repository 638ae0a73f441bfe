"""Tensor work of a serving process runs on one thread: calls from request threads are handed to it."""

from __future__ import annotations

import threading

import pytest

from rerank_core import compute


@pytest.fixture
def routed_main(monkeypatch):
    """The main thread routed as in the app, undone after the test (the flag is process-wide)."""
    event = threading.Event()
    monkeypatch.setattr(compute, "_MAIN_THREAD_ROUTED", event)
    return event


def test_request_threads_share_one_compute_thread_and_commands_stay_on_main(routed_main) -> None:
    @compute.on_compute_thread
    def where(nested: bool = False) -> tuple[str, ...]:
        here = threading.current_thread().name
        return (here, *where()) if nested else (here,)

    main = threading.current_thread().name
    assert where() == (main,)  # a command's main thread computes itself
    seen: list[tuple[str, ...]] = []
    threads = [threading.Thread(target=lambda: seen.append(where(nested=True))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    names = {name for pair in seen for name in pair}
    assert len(seen) == 3 and len(names) == 1 and names.pop().startswith("rerank-compute")  # nested: no deadlock
    compute.serve_from_compute_thread()
    assert where()[0].startswith("rerank-compute")  # the app's main thread hands its work over too


def test_errors_reach_the_caller(routed_main) -> None:
    @compute.on_compute_thread
    def fail() -> None:
        raise ValueError("user_id: unknown")

    routed_main.set()
    with pytest.raises(ValueError, match="user_id"):
        fail()
