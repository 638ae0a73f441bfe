"""Fine-tune jobs for the app: one `python -m rerank_core train` subprocess at a time, surviving app restarts."""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rerank_core.adapters import adapters_root, remove_stale, validate_adapter_name
from rerank_core.fsutil import atomic_write_text, process_running
from rerank_core.metrics import METRIC_NAMES
from rerank_core.progress import read_events
from rerank_core.training.config import TrainConfig, training_config
from rerank_core.training.manifest import check_adapter_target

__all__ = ["JobBusy", "JobError", "JobRunner", "JobStatus", "TrainRequest"]

log = logging.getLogger(__name__)

_REPO_ROOT = Path(__file__).resolve().parent.parent
_JOB_FILE = "job.json"
_EVENTS_FILE = "events.jsonl"
_CONFIG_FILE = "config.json"
_CANCEL_FILE = "cancel"
_LOG_FILE = "train.log"
_TERMINAL = ("done", "cancelled", "failed")
_LOG_TAIL_CHARS = 2000


class JobError(ValueError):
    """A fine-tune request that cannot start, with what to change."""


class JobBusy(JobError):
    """A second Start while a run is going: only one fine-tune runs at a time."""


@dataclass(frozen=True)
class TrainRequest:
    """What the Fine-tune form asks for; paths come from the app's registries, never from the client."""

    name: str
    model_path: str  # the model reference the registry checked: a folder, a cached hub id or a .gguf file
    data_path: str
    training_preset: str = "quick"
    options: Mapping[str, Any] = field(default_factory=dict)  # setting → value as the form or the API gives it
    chat_template: str | None = None  # a template file the registry saved, used instead of the tokenizer's own

    def config(self) -> TrainConfig:
        """The training preset with the options; a bad or unknown setting raises ValueError naming it."""
        return training_config(self.training_preset, **self.options)

    def argv(self, config_file: Path, events: Path, cancel_file: Path, adapters: Path) -> list[str]:
        """The command line: paths only; every setting goes over in config_file (TrainConfig.to_json)."""
        template = ["--chat-template", self.chat_template] if self.chat_template else []
        return [sys.executable, "-m", "rerank_core", "train", "--name", validate_adapter_name(self.name),
                "--training-preset", self.training_preset, "--config", str(config_file), "--model", self.model_path,
                *template, "--data", self.data_path, "--adapters-dir", str(adapters), "--events", str(events),
                "--cancel-file", str(cancel_file), "--no-progress"]


@dataclass
class JobStatus:
    """A job as the Fine-tune tab shows it: state, progress, loss and metric curves, result or error."""

    job_id: str = ""
    name: str = ""
    state: str = "idle"
    pid: int | None = None
    started_at: float | None = None
    ended_at: float | None = None
    step: int = 0
    total_steps: int = 0
    epoch: float | None = None
    elapsed: float | None = None
    eta: float | None = None
    uniform_loss: float | None = None
    # Per step: the answer letter's loss (what ln N bounds) and the total over every loss-carrying token.
    letter_losses: list[tuple[int, float]] = field(default_factory=list)
    total_losses: list[tuple[int, float]] = field(default_factory=list)
    evals: list[tuple[int, dict[str, float]]] = field(default_factory=list)
    stage: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    result: dict[str, Any] | None = None
    message: str = ""
    log_tail: str = ""
    events: int = 0

    @property
    def active(self) -> bool:
        return self.state in ("running", "cancelling")

    def to_json(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in self.__dataclass_fields__} | {"active": self.active}


class JobRunner:
    """Starts, watches and cancels fine-tunes; job folders under runs_root let a restarted app re-attach."""

    def __init__(self, runs_root: str | os.PathLike[str], *, adapters: str | os.PathLike[str] | None = None,
                 env: Mapping[str, str] | None = None) -> None:
        self.runs_root = Path(runs_root).resolve()  # the run works in its own folder: its paths must be absolute
        self.runs_root.mkdir(parents=True, exist_ok=True)
        self.adapters = adapters_root(adapters).resolve()
        self._env = dict(env or {})
        self._lock = threading.Lock()
        self._process: subprocess.Popen[bytes] | None = None
        self._current: Path | None = None
        self._reattach()

    # -- public ----------------------------------------------------------------------------------

    def start(self, request: TrainRequest) -> JobStatus:
        """Launch the training subprocess, or raise JobBusy naming the run that is going."""
        config = request.config()  # the settings first: a bad one is named even when the name is also refused
        name = check_adapter_target(request.name, self.adapters).name
        with self._lock, self._file_lock():
            current = self._status_locked()
            if current.active:
                raise JobBusy(f"fine-tune {current.name!r} is still running (step {current.step}/"
                              f"{current.total_steps}): wait for it to finish or cancel it first")
            remove_stale(self.adapters)
            folder = self.runs_root / f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
            folder.mkdir(parents=True)
            atomic_write_text(folder / _CONFIG_FILE, json.dumps(config.to_json(), indent=2))
            argv = request.argv(folder / _CONFIG_FILE, folder / _EVENTS_FILE, folder / _CANCEL_FILE, self.adapters)
            # Offline by design: the run never waits on a model hub it cannot reach.
            env = {"HF_HUB_OFFLINE": "1", **os.environ, **self._env, "PYTHONUNBUFFERED": "1",
                   "PYTHONPATH": os.pathsep.join(filter(None, [str(_REPO_ROOT), os.environ.get("PYTHONPATH")]))}
            with (folder / _LOG_FILE).open("wb") as log_file:
                # A new session: the run outlives an app restart and a Ctrl-C in the app's terminal. It works in
                # its own folder: nothing lands beside the code (site-packages when pip-installed).
                self._process = subprocess.Popen(argv, cwd=folder, stdin=subprocess.DEVNULL, stdout=log_file,
                                                 stderr=subprocess.STDOUT, env=env, start_new_session=True)
            self._current = folder
            self._write_job(folder, {"id": folder.name, "name": name, "argv": argv, "pid": self._process.pid,
                                     "started_at": time.time(), "state": "running", "message": ""})
            log.info("started fine-tune %s (pid %d) in %s", name, self._process.pid, folder)
            return self._status_locked()

    def cancel(self) -> JobStatus:
        """Ask the run to stop at its next step boundary (a cancel file); asked again, send SIGTERM too.

        The file alone is safe at any moment, even while the process is still starting up, when a signal
        would kill it before its handlers are installed; a second request is for a run that does not react.
        """
        with self._lock:
            status = self._status_locked()
            if not status.active or self._current is None:
                raise JobError("no fine-tune is running, so there is nothing to cancel")
            if status.state == "cancelling":
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.kill(status.pid, signal.SIGTERM)
                message = "cancel requested again: SIGTERM sent"
            else:
                atomic_write_text(self._current / _CANCEL_FILE, "cancel requested from the app\n")
                message = "cancel requested: stopping at the next step"
            job = self._read_job(self._current)
            self._write_job(self._current, {**job, "state": "cancelling", "message": message})
            return self._status_locked()

    def status(self) -> JobStatus:
        """The running job, or the most recent one; finished jobs are recorded as such on disk."""
        with self._lock:
            return self._status_locked()

    def wait(self, timeout: float, poll: float = 0.2) -> JobStatus:
        """Block until the current job ends or timeout passes (tests and scripts)."""
        deadline = time.monotonic() + timeout
        status = self.status()
        while status.active and time.monotonic() < deadline:
            time.sleep(poll)
            status = self.status()
        return status

    # -- internals -------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _file_lock(self) -> Iterator[None]:
        """Two app processes sharing runs/ must not both start a run."""
        with (self.runs_root / ".lock").open("a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _reattach(self) -> None:
        folders = sorted((path for path in self.runs_root.iterdir() if (path / _JOB_FILE).is_file()),
                         key=lambda path: path.name)
        for folder in folders:
            job = self._read_job(folder)
            if job.get("state") in ("running", "cancelling"):
                if _alive(job.get("pid"), folder / _EVENTS_FILE):
                    self._current = folder
                    log.info("re-attached to fine-tune %s (pid %s)", job.get("name"), job.get("pid"))
                else:
                    self._finish(folder, job, None)
        if self._current is None and folders:
            self._current = folders[-1]
        remove_stale(self.adapters)

    def _status_locked(self) -> JobStatus:
        folder = self._current
        if folder is None:
            return JobStatus()
        job = self._read_job(folder)
        events = read_events(folder / _EVENTS_FILE)
        if job.get("state") in ("running", "cancelling"):
            returncode = None
            if self._process is not None and self._process.pid == job.get("pid"):
                returncode = self._process.poll()
                running = returncode is None
            else:
                running = _alive(job.get("pid"), folder / _EVENTS_FILE)
            if not running:
                # Read the events again: the process may have written its last one after the read above.
                job = self._finish(folder, job, returncode)
                events = read_events(folder / _EVENTS_FILE)
        return _status_from(folder, job, events)

    def _finish(self, folder: Path, job: dict[str, Any], returncode: int | None) -> dict[str, Any]:
        """Record how a run ended: its last event says so, else it died (crash, SIGKILL, machine restart)."""
        events = read_events(folder / _EVENTS_FILE)
        last = next((event for event in reversed(events) if event.get("event") in _TERMINAL), None)
        if last is not None:
            state = last["event"]
            message = str(last.get("error") or last.get("reason") or "")
        else:
            state = "failed"
            how = f"exited with code {returncode}" if returncode is not None else "is gone (killed or restarted)"
            message = (f"the training process {how} before reporting an end; nothing was published "
                       f"(its output: {folder / _LOG_FILE})")
        job = {**job, "state": state, "ended_at": time.time(), "message": message, "returncode": returncode}
        self._write_job(folder, job)
        if state != "done":
            remove_stale(self.adapters)
        if self._process is not None and self._process.pid == job.get("pid"):
            self._process = None
        return job

    @staticmethod
    def _read_job(folder: Path) -> dict[str, Any]:
        try:
            return json.loads((folder / _JOB_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError) as error:
            return {"id": folder.name, "name": "?", "state": "failed", "message": f"unreadable job record: {error}"}

    @staticmethod
    def _write_job(folder: Path, job: dict[str, Any]) -> None:
        atomic_write_text(folder / _JOB_FILE, json.dumps(job, indent=2))


def _alive(pid: Any, events_path: Path) -> bool:
    """The job's process still runs; its command line must name this job's events file (PID reuse)."""
    if not isinstance(pid, int) or not process_running(pid):
        return False
    try:
        text = Path(f"/proc/{pid}/cmdline").read_bytes().decode("utf-8", "replace")
    except OSError:
        return True  # no /proc (not Linux): trust the signal check
    # An empty command line is a process still starting up (exec in progress): it is ours.
    return not text or str(events_path) in text


def _tail(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, path.stat().st_size - _LOG_TAIL_CHARS))
            return handle.read().decode("utf-8", "replace").strip()
    except OSError:
        return "(no log)"


def _status_from(folder: Path, job: dict[str, Any], events: list[dict[str, Any]]) -> JobStatus:
    """Fold the run's events (training.train_adapter's start/stage/step/validation/done...) into one status."""
    status = JobStatus(job_id=str(job.get("id", folder.name)), name=str(job.get("name", "")),
                       state=str(job.get("state", "failed")), pid=job.get("pid"),
                       started_at=job.get("started_at"), ended_at=job.get("ended_at"),
                       message=str(job.get("message", "")), events=len(events))
    for event in events:
        kind = event.get("event")
        if kind == "start":
            status.config = event.get("config") or {}
            status.uniform_loss = event.get("uniform_loss", status.uniform_loss)
        elif kind == "stage":
            status.stage = str(event.get("stage") or "")
            status.total_steps = int(event.get("total_steps") or status.total_steps)
        elif kind == "step":
            status.stage = "training"
            status.step = int(event.get("step") or 0)
            status.total_steps = int(event.get("total_steps") or status.total_steps)
            status.epoch = event.get("epoch")
            status.elapsed = event.get("elapsed")
            status.eta = event.get("eta")
            status.uniform_loss = event.get("uniform_loss", status.uniform_loss)
            if event.get("letter_loss") is not None:
                status.letter_losses.append((status.step, float(event["letter_loss"])))
            total = event.get("total_loss", event.get("loss"))  # event logs from before total_loss say "loss"
            if total is not None:
                status.total_losses.append((status.step, float(total)))
        elif kind in ("validation", "eval"):
            values = {name: float(event[name]) for name in METRIC_NAMES if isinstance(event.get(name), int | float)}
            status.evals.append((int(event.get("step") or 0), values))
        elif kind in _TERMINAL:
            status.result = {"path": event.get("path"), **(event.get("report") or {})}
    if status.state == "failed":
        status.log_tail = _tail(folder / _LOG_FILE)
    return status
