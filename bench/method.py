"""The benchmark method every bench/ script uses, so a figure holds on a shared 2-core machine.

The ways being compared run in interleaved rounds (A B, B A, A B, ...: a slow drift of the machine hits
every way alike) on the same inputs; each round is printed, then each way's median and spread, then the
load average before, during and after, and the run is marked `noisy` when the load of OTHER work
exceeded 1.0 at any point. The last line a script prints stays the ratio of medians.

Why "other work": a benchmark that keeps both cores busy raises the 1-minute load average to about 2 by
itself, so the raw `os.getloadavg()` (printed too) cannot tell a quiet machine from a busy one. The
monitor samples, once a second, the kernel's count of runnable threads (/proc/loadavg) minus the
runnable threads of this process and its children, and smooths it exactly like the kernel's 1-minute
load average (exponential, 60 s time constant), starting from the load average before the run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "NOISY_LOAD",
    "LoadWatch",
    "Measurement",
    "add_method_args",
    "interleaved",
    "median",
    "print_ratio",
    "print_summary",
    "run_fresh",
]

NOISY_LOAD = 1.0
_SAMPLE_SECONDS = 1.0
_LOAD_WINDOW_SECONDS = 60.0  # the kernel's 1-minute load average


@dataclass
class Measurement:
    """One round of one way: the figure being compared, and anything else worth printing or keeping."""

    value: float
    details: dict[str, Any] = field(default_factory=dict)


def add_method_args(parser: argparse.ArgumentParser, rounds: int = 3) -> None:
    """The options every bench script shares."""
    parser.add_argument("--rounds", type=int, default=rounds,
                        help=f"interleaved rounds per way (default {rounds}; fewer than 3 is never publishable)")


def _own_tree(root: int) -> list[int]:
    """This process and all its descendants, via /proc/<pid>/task/<tid>/children."""
    pids, queue = [], [root]
    while queue:
        pid = queue.pop()
        pids.append(pid)
        try:
            for task in os.listdir(f"/proc/{pid}/task"):
                with open(f"/proc/{pid}/task/{task}/children") as handle:
                    queue.extend(int(child) for child in handle.read().split())
        except OSError:  # the process ended between listing and reading
            continue
    return pids


def _running_threads(pids: Sequence[int]) -> int:
    running = 0
    for pid in pids:
        try:
            tasks = os.listdir(f"/proc/{pid}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{pid}/task/{task}/stat") as handle:
                    # The state follows the command name, which is in parentheses and may hold spaces.
                    state = handle.read().rsplit(")", 1)[1].split()[0]
            except (OSError, IndexError):
                continue
            running += state == "R"
    return running


def _system_running() -> int:
    with open("/proc/loadavg") as handle:
        return int(handle.read().split()[3].split("/")[0])


class LoadWatch:
    """Samples the load average and the load of other work during a run; `noisy` if the latter passed 1.0."""

    def __init__(self) -> None:
        self.before = os.getloadavg()
        self.after: tuple[float, float, float] | None = None
        self.max_load = self.before[0]
        self.others = self.before[0]
        self.max_others = self.others
        self.samples = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> LoadWatch:
        print(f"load average before: {_fmt(self.before)} ({os.cpu_count()} cores)", flush=True)
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()
        self.after = os.getloadavg()

    def _run(self) -> None:
        decay = math.exp(-_SAMPLE_SECONDS / _LOAD_WINDOW_SECONDS)
        root = os.getpid()
        while not self._stop.wait(_SAMPLE_SECONDS):
            try:
                others = max(0, _system_running() - _running_threads(_own_tree(root)))
            except OSError:
                continue
            self.others = self.others * decay + others * (1 - decay)
            self.max_others = max(self.max_others, self.others)
            self.max_load = max(self.max_load, os.getloadavg()[0])
            self.samples += 1

    def now(self) -> str:
        """The current figures, for a round's line."""
        return f"load {os.getloadavg()[0]:.2f}, others {self.others:.2f}"

    @property
    def noisy(self) -> bool:
        return self.before[0] > NOISY_LOAD or self.max_others > NOISY_LOAD

    def report(self) -> None:
        after = self.after or os.getloadavg()
        print(f"load average before: {_fmt(self.before)}; after: {_fmt(after)}; highest 1-min during the run "
              f"{self.max_load:.2f} (this benchmark's own threads included)")
        print(f"load of other work (1-min, own threads excluded, {self.samples} samples): highest "
              f"{self.max_others:.2f}, at the end {self.others:.2f}")
        if self.noisy:
            print(f"run: noisy (other work's load exceeded {NOISY_LOAD:.1f}): do not publish these figures")
        else:
            print(f"run: quiet (other work's load stayed at or below {NOISY_LOAD:.1f})")


def _fmt(load: Sequence[float]) -> str:
    return " ".join(f"{value:.2f}" for value in load)


def interleaved(ways: Mapping[str, Callable[[], Measurement]], rounds: int, watch: LoadWatch, *,
                unit: str = "s", describe: Callable[[Measurement], str] | None = None) -> dict[str, list[Measurement]]:
    """Run every way once per round, alternating the order each round; print each round as it ends."""
    if rounds < 1:
        raise ValueError(f"--rounds must be at least 1, got {rounds}")
    names = list(ways)
    results: dict[str, list[Measurement]] = {name: [] for name in names}
    width = max(len(name) for name in names)
    for index in range(rounds):
        order = names if index % 2 == 0 else names[::-1]
        for name in order:
            measurement = ways[name]()
            results[name].append(measurement)
            extra = f"  {describe(measurement)}" if describe is not None else ""
            print(f"round {index + 1}/{rounds}  {name:{width}s}  {measurement.value:10.4f} {unit}{extra}  "
                  f"({watch.now()})", flush=True)
    return results


def median(measurements: Sequence[Measurement]) -> float:
    return statistics.median(measurement.value for measurement in measurements)


def print_summary(results: Mapping[str, Sequence[Measurement]], unit: str = "s") -> None:
    """Each way's median and spread (min..max, and the half-range as a share of the median)."""
    width = max(len(name) for name in results)
    for name, measurements in results.items():
        values = [measurement.value for measurement in measurements]
        middle = statistics.median(values)
        spread = (max(values) - min(values)) / 2 / middle if middle else float("nan")
        print(f"{name:{width}s}  median {middle:.4f} {unit}  spread {min(values):.4f}..{max(values):.4f} "
              f"(±{spread:.1%}) over {len(values)} rounds")


def print_ratio(label: str, numerator: Sequence[Measurement], denominator: Sequence[Measurement]) -> float:
    """The last line: the ratio of the medians."""
    ratio = median(numerator) / median(denominator)
    print(f"{label}: {ratio:.2f}")
    return ratio


def run_fresh(script: str | Path, argv: Sequence[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Run one way in a fresh process (its peak RSS is its own); it prints a JSON object as its last line."""
    completed = subprocess.run([sys.executable, str(script), *argv], capture_output=True, text=True,
                               env=None if env is None else {**os.environ, **env})
    if completed.returncode != 0:
        raise SystemExit(f"{Path(script).name} {' '.join(argv)} failed ({completed.returncode}):\n"
                         f"{completed.stderr[-3000:]}")
    return json.loads(completed.stdout.strip().splitlines()[-1])
