"""Load: 8 gradio_client clients switching users for 60 s, alone and while a fine-tune runs; errors, latency, RSS.

Run: PYTHONPATH=. .venv/bin/python bench/bench_load.py [--rounds 3] [--clients 8] [--seconds 60] [--max-samples 64]
     PYTHONPATH=. .venv/bin/python bench/bench_load.py --case diagnostic [--clients 4] [--seconds 60]

--case mixed (the memory check): one round of --seconds (600 for the published figure) in which the clients inspect
while one more client runs Compare on 20 users and another the diagnostics (letter prior, position bias, letter
mass, history influence) in turn, each with a new candidate seed every time, and a fine-tune trains; the figure is
the server's RSS growth (target +10%), printed with the size and bound of every cache the app keeps.

--case diagnostic: the clients inspect alone, and while one more client runs the longest diagnostic the limits
allow (position bias over 25 users x 200 permuted orders = 5000 scored prompts); each round's figure is the p95
latency of the inspecting clients, and the target is p95 during the diagnostic <= 2 x p95 alone (interactive
requests go first: rerank_app/gate.py). The diagnostic is stopped through /stop_diagnostics after each round.

Two ways in interleaved rounds (bench/method.py), each round's figure the p50 latency of its requests: "clients
alone" and "during a fine-tune" (a fine-tune started through the app, the clients switching users while it is in
its training loop; the round ends when the fine-tune is done). The load of other work excludes this benchmark's
own processes (the app and its fine-tunes), which load the 2 cores on purpose.

The app (default model, bundled sample data) runs in its own process so its RSS is its own; its adapters, runs
and uploads folders are temporary, so the benchmark neither sees nor leaves fine-tunes in the repository. Each
request is the Inspect tab's full round trip (/inspect); users come from one shuffled queue shared by all
clients (refilled with a new candidate seed when every user was asked), so no request is answered from a
cache. The fine-tune is started through the app's /start_finetune
endpoint, exactly as the Fine-tune tab starts it. Targets: 0 errors; server RSS after <= 1.10 x before.
"""

from __future__ import annotations

import argparse
import functools
import os
import random
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from method import LoadWatch, Measurement, add_method_args, interleaved, print_ratio, print_summary  # noqa: E402

from rerank_app.memory import HEAP_TRIM_EVERY_S  # noqa: E402
from rerank_app.ports import free_port  # noqa: E402

RSS_GROWTH_LIMIT = 0.10
# The server writes its caches' sizes here every few seconds (it runs in its own process).
CACHE_FILE = "cache_sizes.json"
CACHE_WRITE_S = 5.0
P95_SLOWDOWN_LIMIT = 2.0
# The longest diagnostic the core allows: 25 users x 200 orders = LIMITS["diagnostic_prompts"].high prompts.
LONGEST_DIAGNOSTIC = {"users": 25, "orders": "permutations", "permutations": 200}


def serve(port: int, work: Path) -> None:
    """The app as `python app.py` builds it, but with temporary adapters, runs and uploads folders."""
    from rerank_app.context import AppConfig, AppContext, DatasetEntry, ModelEntry
    from rerank_app.jobs import JobRunner
    from rerank_app.server import build_app, launch
    from rerank_core.compute import serve_from_compute_thread
    from rerank_core.data.builtin import bundled_sample_path
    from rerank_core.data.loaders import load_dataset
    from rerank_core.models import embedded_model_folder, load_model

    serve_from_compute_thread()  # as the app's build_context does
    config = AppConfig(adapters_root=work / "adapters", upload_root=work / "uploads", runs_root=work / "runs")
    folder = embedded_model_folder()
    model = ModelEntry(folder.name, str(folder), loaded=load_model(folder))
    context = AppContext(config, [DatasetEntry("sample", load_dataset(None), bundled_sample_path())], [model],
                         jobs=JobRunner(config.runs_root, adapters=config.adapters_root))
    demo = build_app(context)
    threading.Thread(target=write_cache_sizes, args=(context, demo, work / CACHE_FILE), daemon=True).start()
    launch(demo, port=port, max_upload_bytes=config.max_upload_bytes)


def write_cache_sizes(context: Any, demo: Any, path: Path) -> None:
    """Every CACHE_WRITE_S, the entries and bound of each cache of the serving app, for the report."""
    import json

    from rerank_app.server import cache_sizes
    from rerank_core.fsutil import atomic_write_text

    while True:
        time.sleep(CACHE_WRITE_S)
        atomic_write_text(path, json.dumps(cache_sizes(context, demo)))


def print_cache_sizes(work: Path) -> None:
    """The server's caches as last written: entries / bound each."""
    import json

    try:
        sizes = json.loads((work / CACHE_FILE).read_text())
    except (OSError, ValueError):
        print("cache sizes: not written yet")
        return
    print("cache sizes (entries / bound): " + ", ".join(f"{name} {entries}/{bound}"
                                                         for name, (entries, bound) in sizes.items()))


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


def describe_round(measurement: Measurement, headline: str = "p50") -> str:
    """One round of inspecting clients: the percentile it is measured by, the other one, max, errors, rate, and
    what ran beside them (a fine-tune or a diagnostic)."""
    details = measurement.details
    other = "p95" if headline == "p50" else "p50"
    text = (f"{headline} of {details['requests']} requests; {other} {details[other]:.2f} s, "
            f"max {details['max']:.2f} s, errors {details['errors']}, "
            f"{details['requests'] / details['wall']:.2f} users/s")
    return text + (f"; {details['beside']}" if "beside" in details else "")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, default=8, help="concurrent gradio_client clients")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the clients switch users")
    parser.add_argument("--max-samples", type=int, default=64, help="training samples of the fine-tune")
    parser.add_argument("--case", choices=("finetune", "diagnostic", "mixed"), default="finetune",
                        help="what runs beside the clients: a fine-tune, the longest diagnostic, or Compare, "
                             "diagnostics and a fine-tune at once (one round, for the memory figure)")
    parser.add_argument("--malloc-arena-max", type=int, metavar="N",
                        help="run the app with MALLOC_ARENA_MAX=N (glibc keeps one heap per thread by default)")
    add_method_args(parser)
    parser.add_argument("--serve", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.serve:
        serve(options.serve, options.work)
        return

    import psutil

    from rerank_core.data.loaders import load_dataset

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

    candidate_seed = [0]

    def inspect_next(own: Any, record: bool) -> bool:
        with lock:
            if not queue:  # every user asked once: again with new candidates, so still nothing is cached
                queue.extend(users)
                random.Random(candidate_seed[0]).shuffle(queue)
                candidate_seed[0] += 1
            user, seed = queue.pop(), candidate_seed[0]
        start = time.perf_counter()
        try:
            own.predict(user_id=user, seed=seed, api_name="/inspect")
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
    clients = [Client(url, verbose=False) for _ in range(options.clients)]
    # One concurrent round first: the server's worker threads and their buffers exist from here on, so the
    # before/after comparison measures growth under load, not the one-time cost of concurrency.
    in_parallel(lambda own: inspect_next(own, record=False))
    rss_before = process.memory_info().rss
    monitor = RssMonitor(server.pid)
    monitor.start()
    finetunes: list[dict[str, Any]] = []

    def switch_users() -> Measurement:
        latencies.clear()
        errors_before = len(errors)
        deadline = time.monotonic() + options.seconds

        def work(own: Any) -> None:
            while time.monotonic() < deadline and inspect_next(own, record=True):
                pass

        wall = time.perf_counter()
        in_parallel(work)
        wall = time.perf_counter() - wall
        if not latencies:
            raise SystemExit(f"no request succeeded; errors: {errors[:5]}")
        p50 = percentile(latencies, 0.5)
        return Measurement(p50, {
            "requests": len(latencies), "errors": len(errors) - errors_before, "wall": wall,
            "p50": p50, "p95": percentile(latencies, 0.95), "max": max(latencies)})

    def during_finetune() -> Measurement:
        name = f"bench-load-{int(time.time())}"
        status = client.predict(name=name, max_samples=options.max_samples, eval_users=4, eval_every=0,
                                api_name="/start_finetune")
        # The load starts once the run is in its training loop, so the clients compete with training steps,
        # not with the run's start-up.
        waited = time.perf_counter()
        while status["active"] and status["stage"] != "training" and time.perf_counter() - waited < 600:
            time.sleep(1.0)
            status = client.predict(api_name="/finetune_status")
        measurement = switch_users()
        during = client.predict(api_name="/finetune_status")
        finished = during
        give_up = time.monotonic() + 900
        while finished["active"] and time.monotonic() < give_up:
            time.sleep(2.0)
            finished = client.predict(api_name="/finetune_status")
        finetunes.append(finished)
        result = finished.get("result") or {}
        measurement.details["beside"] = (
            f"fine-tune {name} ({options.max_samples} samples): step {during['step']}/{during['total_steps']} "
            f"when the load ended; final {finished['state']}"
            + (f", {result['wall_time_s']:.0f} s in all" if result.get("wall_time_s") else "")
            + (f"; {finished['message']}" if finished["message"] else ""))
        return measurement

    if options.case == "diagnostic":
        run_diagnostic_case(options, url, client, switch_users, errors)
        return
    if options.case == "mixed":
        run_mixed_case(options, url, during_finetune, errors, process, rss_before, monitor, finetunes, work)
        return
    print(f"{options.clients} clients for {options.seconds:.0f} s per round; fine-tunes: quick preset, "
          f"{options.max_samples} samples, 4 validation users")
    with LoadWatch() as watch:
        results = interleaved({"clients alone": switch_users, "during a fine-tune": during_finetune},
                              options.rounds, watch, describe=describe_round)
    rss_after = process.memory_info().rss
    trajectory = list(monitor.trajectory)
    monitor.stop.set()

    growth = rss_after / rss_before - 1
    for error in errors[:5]:
        print(f"  error: {error}")
    print(f"requests in all {sum(m.details['requests'] for ms in results.values() for m in ms)}, errors {len(errors)}")
    print(f"server RSS idle {rss_idle / 2**20:.0f} MiB; before the load (after one concurrent round) "
          f"{rss_before / 2**20:.0f} MiB, after {rss_after / 2**20:.0f} MiB ({growth:+.1%}; limit "
          f"+{RSS_GROWTH_LIMIT:.0%}), peak {monitor.server_peak / 2**20:.0f} MiB")
    print("server RSS every 10 s of the load (MiB): " + " ".join(f"{rss / 2**20:.0f}" for rss in trajectory))
    print(f"fine-tune process peak RSS {monitor.training_peak / 2**20:.0f} MiB")
    print_cache_sizes(work)
    passed = not errors and growth <= RSS_GROWTH_LIMIT and all(run["state"] == "done" for run in finetunes)
    print("PASS" if passed else "FAIL")
    print_summary(results)
    watch.report()
    print_ratio("slowdown_during_finetune", results["during a fine-tune"], results["clients alone"])
    if not passed:
        raise SystemExit(1)


def run_mixed_case(options: argparse.Namespace, url: str, during_finetune: Any, errors: list[str], process: Any,
                   rss_before: int, monitor: RssMonitor, finetunes: list[dict[str, Any]], work: Path) -> None:
    """Inspect, Compare, Diagnose and a fine-tune at once for one round; the figure is the server's RSS growth."""
    from gradio_client import Client

    from rerank_core.models import embedded_model_folder

    pickers = {"dataset": "sample", "model": embedded_model_folder().name, "split": "test", "source": "random",
               "preset": "seed", "strategy": "as_trained", "text_field": "title", "count": 20,
               "use_adapter_preset": True, "template_kwargs": ""}
    calls = [("/compare", {"adapters": [], "users": 20}),
             ("/diagnose_letter_prior", {"system": "base", "users": 5, "mode": "placeholder", "placeholder": "item"}),
             ("/diagnose_position_bias", {"system": "base", "user_id": "u0001", "orders": "rotations",
                                          "permutations": 20}),
             ("/diagnose_letter_mass", {"adapters": [], "users": 5}),
             ("/diagnose_history", {"system": "base", "user_id": "u0002"})]
    stop = threading.Event()
    done = {name: 0 for name, _ in calls}

    def loop(own: Any, chosen: list[tuple[str, dict[str, Any]]]) -> None:
        seed = 1000
        while not stop.is_set():
            for api_name, arguments in chosen:
                seed += 1  # a new candidate seed each time: nothing is answered from a cache
                try:
                    own.predict(**pickers, **arguments, seed=seed, api_name=api_name)
                    done[api_name] += 1
                except Exception as error:
                    errors.append(f"{api_name}: {type(error).__name__}: {str(error)[:200]}")
                if stop.is_set():
                    return

    side_clients = [Client(url, verbose=False) for _ in range(2)]
    # Each kind of request once before "before": its first batch shapes cost oneDNN kernels and buffers once (a
    # noisy first run rose 200 MiB in its first 10 s, then stayed within 1400-1570 MiB for 7 minutes).
    for api_name, arguments in calls:
        side_clients[0].predict(**pickers, **arguments, seed=999, api_name=api_name)
    warmed = process.memory_info().rss
    print(f"server RSS after inspecting {rss_before / 2**20:.0f} MiB, after one call of each kind "
          f"{warmed / 2**20:.0f} MiB: the growth is measured from there")
    rss_before = warmed
    side = [threading.Thread(target=loop, args=(own, chosen), daemon=True)
            for own, chosen in zip(side_clients, (calls[:1], calls[1:]), strict=True)]
    print(f"{options.clients} inspecting clients for {options.seconds:.0f} s, beside Compare on 20 users, the "
          f"diagnostics in turn and a quick fine-tune of {options.max_samples} samples")
    with LoadWatch() as watch:
        for thread in side:
            thread.start()
        measurement = during_finetune()
        stop.set()
        for thread in side:
            thread.join(timeout=600)
    rss_after = process.memory_info().rss
    # The last requests' buffers are freed but stay in the heap until the app's next trim: read again after one.
    time.sleep(HEAP_TRIM_EVERY_S + 2)
    rss_settled = process.memory_info().rss
    trajectory = list(monitor.trajectory)
    monitor.stop.set()
    growth = rss_after / rss_before - 1
    print(f"inspect: {describe_round(measurement)}")
    print("beside them: " + ", ".join(f"{name} x{count}" for name, count in done.items()))
    for error in errors[:5]:
        print(f"  error: {error}")
    print(f"server RSS before {rss_before / 2**20:.0f} MiB, after {rss_after / 2**20:.0f} MiB ({growth:+.1%}; "
          f"limit +{RSS_GROWTH_LIMIT:.0%}), peak {monitor.server_peak / 2**20:.0f} MiB; "
          f"{HEAP_TRIM_EVERY_S + 2:.0f} s later, after a heap trim: {rss_settled / 2**20:.0f} MiB "
          f"({rss_settled / rss_before - 1:+.1%}; the pass/fail figure is the first)")
    print("server RSS every 10 s of the load (MiB): " + " ".join(f"{rss / 2**20:.0f}" for rss in trajectory))
    print_cache_sizes(work)
    watch.report()
    passed = not errors and growth <= RSS_GROWTH_LIMIT and all(run["state"] == "done" for run in finetunes)
    print("PASS" if passed else "FAIL")
    print(f"rss_growth: {growth:+.3f}")
    if not passed:
        raise SystemExit(1)


def run_diagnostic_case(options: argparse.Namespace, url: str, client: Any, switch_users: Any,
                        errors: list[str]) -> None:
    """Inspect p95 alone and beside the longest diagnostic, in interleaved rounds; the ratio is the verdict."""
    from gradio_client import Client

    from rerank_core.models import embedded_model_folder

    diagnostic = Client(url, verbose=False)  # its own session: /stop_diagnostics stops this client's runs only
    arguments = {"dataset": "sample", "model": embedded_model_folder().name, "split": "test", "source": "random",
                 "preset": "seed", "strategy": "as_trained", "text_field": "title", "count": 20, "seed": 0,
                 "use_adapter_preset": True, "system": "base", **LONGEST_DIAGNOSTIC}

    def p95(measurement: Measurement) -> Measurement:
        return Measurement(measurement.details["p95"], measurement.details)

    def alone() -> Measurement:
        return p95(switch_users())

    def beside_diagnostic() -> Measurement:
        job = diagnostic.submit(api_name="/diagnose_position_bias_users", **arguments)
        time.sleep(5.0)  # the run holds the model and is scoring when the clients start
        measurement = p95(switch_users())
        running = not job.done()
        stopped = diagnostic.predict(api_name="/stop_diagnostics")
        try:
            job.result(timeout=300)
        except Exception as error:  # a stopped run ends with the core's Cancelled message
            outcome = str(error).splitlines()[0][:80]
        else:
            outcome = "finished"
        measurement.details["beside"] = (f"diagnostic still running when the round ended: {running}; "
                                             f"{stopped} -> {outcome}")
        return measurement

    print(f"{options.clients} inspecting clients for {options.seconds:.0f} s per round; beside them: position "
          f"bias over {LONGEST_DIAGNOSTIC['users']} users x {LONGEST_DIAGNOSTIC['permutations']} orders")
    with LoadWatch() as watch:
        results = interleaved({"inspect alone": alone, "inspect beside the diagnostic": beside_diagnostic},
                              options.rounds, watch, describe=functools.partial(describe_round, headline="p95"))
    for error in errors[:5]:
        print(f"  error: {error}")
    print_summary(results)
    watch.report()
    ratio = print_ratio("p95_slowdown_beside_diagnostic", results["inspect beside the diagnostic"],
                        results["inspect alone"])
    passed = not errors and ratio <= P95_SLOWDOWN_LIMIT
    print(f"{'PASS' if passed else 'FAIL'} (target: p95 beside the diagnostic <= {P95_SLOWDOWN_LIMIT:.0f} x alone, "
          "0 errors)")
    print(f"p95_slowdown_beside_diagnostic: {ratio:.2f}")
    if not passed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
