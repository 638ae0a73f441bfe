"""Load: 8 gradio_client clients switching users for 60 s while a fine-tune runs; errors, latency, server RSS.

Run: PYTHONPATH=. .venv/bin/python bench/bench_load.py [--clients 8] [--seconds 60] [--max-samples 64]

The app (default model, bundled sample data) runs in its own process so its RSS is its own; its adapters, runs
and uploads folders are temporary, so the benchmark neither sees nor leaves fine-tunes in the repository. Each
request is the Inspect tab's full round trip (/inspect); users come from one shuffled queue shared by all
clients, so no request is answered from a cache. The fine-tune is started through the app's /start_finetune
endpoint, exactly as the Fine-tune tab starts it. Targets: 0 errors; server RSS after <= 1.10 x before.
"""

from __future__ import annotations

import argparse
import os
import random
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

RSS_GROWTH_LIMIT = 0.10


def serve(port: int, work: Path) -> None:
    """The app as `python app.py` builds it, but with temporary adapters, runs and uploads folders."""
    from rerank_app.context import AppConfig, AppContext, DatasetEntry, ModelEntry
    from rerank_app.jobs import JobRunner
    from rerank_app.server import build_app, launch
    from rerank_core.loaders import bundled_sample_path, load_dataset
    from rerank_core.models import embedded_model_folder, load_model

    config = AppConfig(adapters_root=work / "adapters", upload_root=work / "uploads", runs_root=work / "runs")
    folder = embedded_model_folder()
    model = ModelEntry(folder.name, str(folder), loaded=load_model(folder))
    context = AppContext(config, [DatasetEntry("sample", load_dataset(None), bundled_sample_path())], [model],
                         jobs=JobRunner(config.runs_root, adapters=config.adapters_root))
    launch(build_app(context), port=port, max_upload_bytes=config.max_upload_bytes)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def connect(url: str, server: subprocess.Popen[bytes], timeout: float = 300.0):
    from gradio_client import Client

    deadline = time.monotonic() + timeout
    while True:
        if server.poll() is not None:
            raise SystemExit(f"the app exited with code {server.returncode} before serving")
        try:
            return Client(url, verbose=False)
        except Exception:  # not listening yet
            if time.monotonic() > deadline:
                raise
            time.sleep(1.0)


class RssMonitor(threading.Thread):
    """Samples the server's RSS and the fine-tune's (the server's child processes) once a second."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        import psutil

        self.process = psutil.Process(pid)
        self.server_peak = 0
        self.training_peak = 0
        self.trajectory: list[int] = []  # server RSS every 10 s: growth that levels off is not a leak
        self.stop = threading.Event()

    def run(self) -> None:
        import psutil

        ticks = 0
        while not self.stop.is_set():
            try:
                rss = self.process.memory_info().rss
                self.server_peak = max(self.server_peak, rss)
                if ticks % 10 == 0:
                    self.trajectory.append(rss)
                ticks += 1
                children = sum(child.memory_info().rss for child in self.process.children(recursive=True))
                self.training_peak = max(self.training_peak, children)
            except psutil.Error:
                pass
            self.stop.wait(1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent gradio_client clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the clients switch users")
    parser.add_argument("--max-samples", type=int, default=64, help="training samples of the fine-tune")
    parser.add_argument("--malloc-arena-max", type=int, metavar="N",
                        help="run the app with MALLOC_ARENA_MAX=N (glibc keeps one heap per thread by default)")
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        serve(options.serve, options.work)
        return

    import psutil

    from rerank_core.loaders import load_dataset

    print(f"machine: {os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f} at start "
          "(other work on the machine shares the cores)")
    work = Path(tempfile.mkdtemp(prefix="bench-load-"))
    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    arena = {} if options.malloc_arena_max is None else {"MALLOC_ARENA_MAX": str(options.malloc_arena_max)}
    if arena:
        print(f"app environment: MALLOC_ARENA_MAX={options.malloc_arena_max}")
    begin = time.perf_counter()
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port), "--work", str(work)], cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT), **arena}, stdout=subprocess.DEVNULL,
                              stderr=open(work / "server.log", "wb"))  # noqa: SIM115 - lives as long as the server
    try:
        run(options, url, server, work, begin, psutil.Process(server.pid), load_dataset(None).users)
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


def run(options: argparse.Namespace, url: str, server: subprocess.Popen[bytes], work: Path, begin: float,
        process: Any, users: list[str]) -> None:
    """Warm up, start the fine-tune, run the clients, and print the figures."""
    from gradio_client import Client

    client = connect(url, server)
    print(f"app up in {time.perf_counter() - begin:.1f} s (pid {server.pid}); logs in {work / 'server.log'}")
    queue = users[:]
    random.Random(0).shuffle(queue)
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def inspect_next(own: Any, record: bool) -> bool:
        with lock:
            if not queue:
                return False
            user = queue.pop()
        start = time.perf_counter()
        try:
            own.predict(user_id=user, api_name="/inspect")
        except Exception as error:
            with lock:
                errors.append(f"{user}: {type(error).__name__}: {error}")
            return True
        if record:
            with lock:
                latencies.append(time.perf_counter() - start)
        return True

    def in_parallel(work_of_one: Any) -> None:
        threads = [threading.Thread(target=work_of_one, args=(own,)) for own in clients]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()

    inspect_next(client, record=False)  # first figures, first tokenizer calls
    rss_idle = process.memory_info().rss

    name = f"bench-load-{int(time.time())}"
    status = client.predict(name=name, max_samples=options.max_samples, eval_users=4, eval_every=0,
                            api_name="/start_finetune")
    print(f"fine-tune {name!r} started (pid {status['pid']}): quick preset, {options.max_samples} samples, "
          "4 validation users")
    # The load starts once the run is in its training loop, so the clients compete with training steps,
    # not with the run's start-up.
    waited = time.perf_counter()
    while status["active"] and status["stage"] != "training" and time.perf_counter() - waited < 600:
        time.sleep(1.0)
        status = client.predict(api_name="/finetune_status")
    print(f"fine-tune in its training loop after {time.perf_counter() - waited:.0f} s "
          f"({status['state']}, {status['total_steps']} steps)")

    clients = [Client(url, verbose=False) for _ in range(options.clients)]
    # One concurrent round first: the server's worker threads and their buffers exist from here on, so the
    # before/after comparison measures growth under load, not the one-time cost of concurrency.
    in_parallel(lambda own: inspect_next(own, record=False))
    rss_before = process.memory_info().rss
    monitor = RssMonitor(server.pid)
    monitor.start()
    deadline = time.monotonic() + options.seconds

    def switch_users(own: Any) -> None:
        while time.monotonic() < deadline and inspect_next(own, record=True):
            pass

    wall = time.perf_counter()
    in_parallel(switch_users)
    wall = time.perf_counter() - wall
    rss_after = process.memory_info().rss
    trajectory = list(monitor.trajectory)
    during = client.predict(api_name="/finetune_status")
    finished = during
    give_up = time.monotonic() + 900
    while finished["active"] and time.monotonic() < give_up:
        time.sleep(2.0)
        finished = client.predict(api_name="/finetune_status")
    monitor.stop.set()

    growth = rss_after / rss_before - 1
    print(f"\nload: {options.clients} clients for {wall:.1f} s while the fine-tune ran")
    if latencies:
        print(f"  requests {len(latencies)}, errors {len(errors)}, throughput {len(latencies) / wall:.2f} users/s")
        print(f"  latency p50 {percentile(latencies, 0.5):.2f} s, p95 {percentile(latencies, 0.95):.2f} s, "
              f"max {max(latencies):.2f} s")
    else:
        print(f"  no request succeeded; errors {len(errors)}")
    for error in errors[:5]:
        print(f"  error: {error}")
    print(f"  server RSS idle {rss_idle / 2**20:.0f} MiB; before the load (after one concurrent round) "
          f"{rss_before / 2**20:.0f} MiB, after {rss_after / 2**20:.0f} MiB ({growth:+.1%}; limit "
          f"+{RSS_GROWTH_LIMIT:.0%}), peak {monitor.server_peak / 2**20:.0f} MiB")
    print("  server RSS every 10 s of the load (MiB): " + " ".join(f"{rss / 2**20:.0f}" for rss in trajectory))
    print(f"  fine-tune process peak RSS {monitor.training_peak / 2**20:.0f} MiB")
    print(f"fine-tune when the load ended: {during['state']}, step {during['step']}/{during['total_steps']}")
    result = finished.get("result") or {}
    print(f"fine-tune final: {finished['state']}, {finished['step']}/{finished['total_steps']} steps"
          + (f", {result['wall_time_s']:.0f} s in all" if result.get("wall_time_s") else "")
          + (f"; {finished['message']}" if finished["message"] else ""))
    passed = bool(latencies) and not errors and growth <= RSS_GROWTH_LIMIT and finished["state"] == "done"
    print("PASS" if passed else "FAIL")
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
