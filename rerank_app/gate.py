"""Who gets a model next: interactive requests before long runs, and a long run stops when its page asks or goes."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["ModelGate", "StopRegistry"]

# After an interactive request, a long run waits this long before taking the model back: a client that
# inspects user after user sends its next request within it, and so never queues behind a chunk.
INTERACTIVE_GRACE_S = 0.25


class ModelGate:
    """One model, many request threads; an interactive request (Inspect, one-user Compare) goes first.

    A long run holds the gate only between its chunk boundaries: at each boundary (the core's stop check)
    it steps aside while interactive requests wait, so an Inspect request waits for one chunk at most,
    never for a whole diagnostic. Adapters switch per scoring call, so stepping aside is safe.
    """

    def __init__(self, grace_s: float = INTERACTIVE_GRACE_S) -> None:
        self._condition = threading.Condition()
        self._busy = False
        self._interactive_waiting = 0
        self._grace_s = grace_s
        self._interactive_ended = -float("inf")

    @contextmanager
    def interactive(self) -> Iterator[None]:
        with self._condition:
            self._interactive_waiting += 1
            self._condition.wait_for(lambda: not self._busy)
            self._interactive_waiting -= 1
            self._busy = True
        try:
            yield
        finally:
            with self._condition:
                self._interactive_ended = time.monotonic()
            self._release()

    @contextmanager
    def background(self) -> Iterator[Callable[[], None]]:
        """Held for a long run; yields step_aside, to call at every chunk boundary."""
        with self._condition:
            self._wait_for_background_turn()
            self._busy = True
        try:
            yield self._step_aside
        finally:
            self._release()

    @property
    def waiting(self) -> int:
        """Interactive requests waiting for the model right now."""
        with self._condition:
            return self._interactive_waiting

    def _free_for_background(self) -> bool:
        return not self._busy and self._interactive_waiting == 0

    def _wait_for_background_turn(self) -> None:
        """Called holding the condition: until no interactive request waits, runs or ended within the grace."""
        while True:
            self._condition.wait_for(self._free_for_background)
            quiet_for = time.monotonic() - self._interactive_ended
            if quiet_for >= self._grace_s:
                return
            self._condition.wait(self._grace_s - quiet_for)

    def _step_aside(self) -> None:
        with self._condition:
            recent = time.monotonic() - self._interactive_ended < self._grace_s
            if not self._interactive_waiting and not recent:
                return
            self._busy = False
            self._condition.notify_all()
            self._wait_for_background_turn()
            self._busy = True

    def _release(self) -> None:
        with self._condition:
            self._busy = False
            self._condition.notify_all()


class StopRegistry:
    """Stop flags of the long runs in flight, per browser session: the Stop button and a closed page set them."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._runs: dict[str, set[threading.Event]] = {}

    @contextmanager
    def run(self, session: str | None) -> Iterator[threading.Event]:
        """A fresh flag for one run of `session` (None: an API call without a page), forgotten when it ends."""
        flag = threading.Event()
        key = session or ""
        with self._lock:
            self._runs.setdefault(key, set()).add(flag)
        try:
            yield flag
        finally:
            with self._lock:
                flags = self._runs.get(key, set())
                flags.discard(flag)
                if not flags:
                    self._runs.pop(key, None)

    def stop(self, session: str | None) -> int:
        """Ask every run of `session` to stop; returns how many were running."""
        with self._lock:
            flags = list(self._runs.get(session or "", ()))
        for flag in flags:
            flag.set()
        return len(flags)

    @property
    def active(self) -> int:
        """Long runs in flight, over every session."""
        with self._lock:
            return sum(len(flags) for flags in self._runs.values())

    def running(self, session: str | None) -> int:
        with self._lock:
            return len(self._runs.get(session or "", ()))
