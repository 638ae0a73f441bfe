"""One thread for the tensor work of a process whose requests arrive on many threads (the app)."""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

__all__ = ["on_compute_thread", "serve_from_compute_thread"]

Params = ParamSpec("Params")
Result = TypeVar("Result")

# PyTorch's CPU ops run on OpenMP, and libgomp gives every thread that starts a parallel region a team of threads of
# its own. Once the teams hold more threads than the machine has cores, libgomp stops spinning between parallel
# regions and every op waits for its threads to wake: on 2 cores a 330-token forward pass took 145 ms from one
# thread and 205 ms from a second one, or from the first once a second had scored (AMX CPU, bf16). The app answers
# each request on a thread of Gradio's pool, so its scoring runs here, on one thread, one team.
_THIS_THREAD = threading.local()
_MAIN_THREAD_ROUTED = threading.Event()


def _mark_compute_thread() -> None:
    _THIS_THREAD.computes = True


_EXECUTOR = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rerank-compute", initializer=_mark_compute_thread)


def serve_from_compute_thread() -> None:
    """From now on the main thread's calls go to the compute thread too: a serving process (the app) loads models
    on its main thread, and a team left there would slow every request's forward pass."""
    _MAIN_THREAD_ROUTED.set()


def on_compute_thread(function: Callable[Params, Result]) -> Callable[Params, Result]:
    """The decorated function runs on the compute thread, unless it is called from the compute thread itself or
    from the main thread of a process that does not serve (a command, a training process: its only thread)."""

    @functools.wraps(function)
    def run(*args: Params.args, **kwargs: Params.kwargs) -> Result:
        on_main = threading.current_thread() is threading.main_thread()
        if getattr(_THIS_THREAD, "computes", False) or (on_main and not _MAIN_THREAD_ROUTED.is_set()):
            return function(*args, **kwargs)
        return _EXECUTOR.submit(function, *args, **kwargs).result()

    return run
