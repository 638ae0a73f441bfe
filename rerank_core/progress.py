"""Progress events as JSON lines a front end can poll, and cancel requests by signal or by file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = ["CancelCheck", "CancelFlag", "Cancelled", "EventLog", "ProgressCallback", "cancel_requested",
           "checkpoint", "read_events"]

ProgressCallback = Callable[[int, int], None]


def _plain(value: Any) -> Any:
    """JSON without NaN/Infinity (which strict readers reject): non-finite numbers become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(item) for item in value]
    return value


class EventLog:
    """Appends one JSON object per line, each with a single write, so a poller sees every event whole."""

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # O_APPEND: each write lands at the end in one piece, even if a reader has the file open.
        self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o644)
        self._lock = threading.Lock()

    def write(self, event: dict[str, Any]) -> None:
        line = (json.dumps(_plain(event), default=str, allow_nan=False) + "\n").encode("utf-8")
        with self._lock:
            if self._fd < 0:
                raise ValueError(f"event log {self.path} is closed")
            os.write(self._fd, line)

    __call__ = write

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def __enter__(self) -> EventLog:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def read_events(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The complete events written so far; a line still being written (no newline yet) waits for next poll."""
    try:
        data = Path(path).read_bytes()
    except FileNotFoundError:
        return []
    complete, _, _ = data.rpartition(b"\n")
    events = []
    for line in complete.decode("utf-8", "replace").splitlines():
        try:
            event = json.loads(line) if line.strip() else None
        except ValueError:
            continue  # a line torn by a full disk or a crash: the others still tell how the run went
        if isinstance(event, dict):
            events.append(event)
    return events


class CancelFlag:
    """A stop request from SIGTERM/SIGINT, a cancel file that appears, or a direct call; checked at step ends."""

    def __init__(self, cancel_file: str | os.PathLike[str] | None = None) -> None:
        self.cancel_file = None if cancel_file is None else Path(cancel_file)
        self.reason: str | None = None
        self._event = threading.Event()

    def request(self, reason: str = "cancel requested") -> None:
        if not self._event.is_set():
            self.reason = reason
            self._event.set()

    @property
    def requested(self) -> bool:
        if not self._event.is_set() and self.cancel_file is not None and self.cancel_file.exists():
            self.request(f"cancel file {self.cancel_file} appeared")
        return self._event.is_set()

    @contextlib.contextmanager
    def handling_signals(self) -> Iterator[CancelFlag]:
        """While inside, SIGTERM and SIGINT request a stop; a second signal interrupts at once."""
        if threading.current_thread() is not threading.main_thread():
            yield self  # signal handlers can only be installed from the main thread
            return

        def handler(signum: int, frame: object) -> None:
            if self._event.is_set():
                raise KeyboardInterrupt(f"second {signal.Signals(signum).name}: stopping now")
            self.request(f"{signal.Signals(signum).name} received")

        previous = {number: signal.signal(number, handler) for number in (signal.SIGTERM, signal.SIGINT)}
        try:
            yield self
        finally:
            for number, old in previous.items():
                signal.signal(number, old)


class Cancelled(RuntimeError):
    """A long run stopped at a boundary because its caller asked; says how far it got."""

    def __init__(self, what: str, done: int, total: int) -> None:
        super().__init__(f"{what} stopped on request after {done} of {total}")
        self.what = what
        self.done = done
        self.total = total


# A stop request: an Event (set = stop), a CancelFlag, or any callable returning True to stop.
CancelCheck = threading.Event | CancelFlag | Callable[[], bool] | None


def cancel_requested(cancel: CancelCheck) -> bool:
    """Whether `cancel`, whatever its kind, asks to stop now."""
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    if isinstance(cancel, CancelFlag):
        return cancel.requested
    return bool(cancel())


def checkpoint(what: str, done: int, total: int, *, progress: ProgressCallback | None = None,
               cancel: CancelCheck = None) -> None:
    """At a loop boundary: report `done` of `total`, then raise Cancelled if a stop was requested."""
    if progress is not None:
        progress(done, total)
    if cancel_requested(cancel):
        raise Cancelled(what, done, total)
