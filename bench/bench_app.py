"""Inspect-update latency of the served app with the default model: new users, view-only updates, 4 clients.

Run: PYTHONPATH=. .venv/bin/python bench/bench_app.py [--rounds 3] [--users 20] [--clients 4] [--per-client 5]
Each request is the Inspect tab's full round trip through gradio_client (/inspect): prompt, forward pass,
every table, figure and HTML block, serialised. Five ways, in interleaved rounds (bench/method.py), each
round's figure the p50 of its requests: "new user" (users never requested before, one after another),
"view only" (the same users again with the same settings: the scores are known, only the view is rebuilt),
"4 clients" (concurrent clients, each on users never requested before) and "empty endpoint" (a no-op endpoint
of a second app launched the same way: the server's own round trip, the floor under every other figure). Requests
go over plain HTTP as the page sends them (class Endpoint); the same empty endpoint through gradio_client is
measured too, for scale, because that client adds a fixed wait of its own to every call.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from method import LoadWatch, Measurement, add_method_args, interleaved, print_ratio, print_summary

import app as app_module
from rerank_app.pickers import make_settings
from rerank_app.ports import free_port
from rerank_app.server import build_app, build_context, launch
from rerank_core.inspector import BASE

TARGETS_S = {"new user": 0.35, "view only": 0.1}  # p50 on a quiet machine (issue 14)


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def report(label: str, latencies: list[float], errors: int = 0) -> None:
    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    print(f"{label}: n={len(latencies)} p50={p50:.3f}s p95={p95:.3f}s mean={statistics.fmean(latencies):.3f}s "
          f"max={max(latencies):.3f}s errors={errors}")


class Endpoint:
    """An endpoint called as the page calls it (a POST, then its event stream), without gradio_client's own waits.

    gradio_client adds about 0.09 s to every call here (its empty-endpoint round trip is printed beside ours), more
    than the view-only target itself, so the figures are taken over plain HTTP.
    """

    def __init__(self, client: Any, api_name: str) -> None:
        parameters = client.view_api(return_format="dict", print_info=False)["named_endpoints"][api_name]["parameters"]
        self.names = [parameter["parameter_name"] for parameter in parameters]
        self.defaults = [parameter.get("parameter_default") for parameter in parameters]
        self.url = f"{client.src.rstrip('/')}/gradio_api/call/{api_name.lstrip('/')}"

    def __call__(self, **values: Any) -> float:
        """Seconds from the request to the complete answer; an error event raises with the server's message."""
        unknown = set(values) - set(self.names)
        if unknown:
            raise ValueError(f"unknown parameters {sorted(unknown)}; the endpoint takes {self.names}")
        data = [values.get(name, default) for name, default in zip(self.names, self.defaults)]
        begin = time.perf_counter()
        request = urllib.request.Request(self.url, data=json.dumps({"data": data}).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as answer:
            event_id = json.loads(answer.read())["event_id"]
        with urllib.request.urlopen(f"{self.url}/{event_id}") as stream:
            body = stream.read().decode()
        elapsed = time.perf_counter() - begin
        if "event: complete" not in body:
            raise RuntimeError(body[-300:])
        return elapsed


def timed_inspect(inspect: Endpoint, user: str) -> float:
    return inspect(user_id=user)


def empty_app() -> str:
    """A served app whose one endpoint does nothing, launched like ours: the part of any figure gradio itself costs."""
    import gradio as gr

    with gr.Blocks() as empty:
        gr.Button().click(lambda: "ok", None, gr.Textbox(), api_name="noop")
    port = free_port()
    launch(empty, port=port, block=False)
    return f"http://127.0.0.1:{port}/"


def concurrent(url: str, users: list[str], clients: int) -> tuple[list[float], list[str], float]:
    """Each client requests its share of `users` one after another; all clients at once."""
    from gradio_client import Client

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_client = len(users) // clients

    def worker(index: int) -> None:
        own = Endpoint(Client(url, verbose=False), "/inspect")
        for user in users[index * per_client:(index + 1) * per_client]:
            try:
                elapsed = timed_inspect(own, user)
            except Exception as error:
                with lock:
                    errors.append(f"{user}: {error}")
                continue
            with lock:
                latencies.append(elapsed)

    wall = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(index,)) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return latencies, errors, time.perf_counter() - wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=20, help="new users per round, one after another")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--per-client", type=int, default=5, help="new users each concurrent client selects")
    add_method_args(parser)
    options = parser.parse_args()

    from gradio_client import Client

    begin = time.perf_counter()
    context = build_context(app_module.parse_args([]))
    demo = build_app(context)
    port = free_port()
    launch(demo, port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    print(f"app up in {time.perf_counter() - begin:.1f} s at {url}; model {context.models.names[0]}, "
          f"dataset {context.datasets.names[0]} ({len(context.datasets.users(context.datasets.names[0]))} users)")
    users = context.datasets.users(context.datasets.names[0])
    per_round = options.users + options.clients * options.per_client
    needed = 6 + options.rounds * per_round
    if len(users) < needed:
        raise SystemExit(f"the dataset has {len(users)} users; this run needs {needed} distinct ones")
    client = Endpoint(Client(url, verbose=False), "/inspect")
    timed_inspect(client, users[0])  # warm-up: first figures, first tokenizer calls

    # The forward pass alone, for scale: what the round trip adds on top of it.
    dataset, model = context.datasets.names[0], context.models.names[0]
    core = []
    for user in users[-5:]:
        start = time.perf_counter()
        context.inspections.inspect(dataset, model, BASE, user, make_settings())
        core.append(time.perf_counter() - start)
    print(f"core inspect (prompt + forward pass, no UI): median {statistics.median(core):.3f}s over 5 users")

    empty_client = Client(empty_app(), verbose=False)
    empty = Endpoint(empty_client, "/noop")
    empty()

    fresh = iter(users[1:1 + options.rounds * per_round])
    last_new: list[str] = []

    def new_user() -> Measurement:
        last_new[:] = [next(fresh) for _ in range(options.users)]
        latencies = [timed_inspect(client, user) for user in last_new]
        return Measurement(percentile(latencies, 0.5), {"latencies": latencies})

    def view_only() -> Measurement:
        # The users the last "new user" round requested (round 1 always runs that way first).
        latencies = [timed_inspect(client, user) for user in last_new]
        return Measurement(percentile(latencies, 0.5), {"latencies": latencies})

    def clients() -> Measurement:
        chunk = [next(fresh) for _ in range(options.clients * options.per_client)]
        latencies, errors, wall = concurrent(url, chunk, options.clients)
        return Measurement(percentile(latencies, 0.5) if latencies else float("nan"),
                           {"latencies": latencies, "errors": errors, "wall": wall})

    def empty_endpoint() -> Measurement:
        latencies = [empty() for _ in range(options.users)]
        return Measurement(percentile(latencies, 0.5), {"latencies": latencies})

    def empty_through_gradio_client() -> Measurement:
        latencies = []
        for _ in range(options.users):
            start = time.perf_counter()
            empty_client.predict(api_name="/noop")
            latencies.append(time.perf_counter() - start)
        return Measurement(percentile(latencies, 0.5), {"latencies": latencies})

    def describe(measurement: Measurement) -> str:
        latencies = measurement.details["latencies"]
        errors = measurement.details.get("errors", [])
        return (f"p50 of {len(latencies)}; p95 {percentile(latencies, 0.95):.3f} s, "
                f"max {max(latencies):.3f} s, errors {len(errors)}")

    with LoadWatch() as watch:
        results = interleaved({"new user": new_user, "view only": view_only,
                               f"{options.clients} clients": clients,
                               "empty endpoint": empty_endpoint,
                               "empty endpoint, gradio_client": empty_through_gradio_client},
                              options.rounds, watch, describe=describe)
    demo.close()
    errors = [error for m in results[f"{options.clients} clients"] for error in m.details["errors"]]
    for error in errors[:5]:
        print(f"  error: {error}")
    for name, measurements in results.items():
        report(f"{name}, all rounds", [value for m in measurements for value in m.details["latencies"]],
               len([e for m in measurements for e in m.details.get("errors", [])]))
    print_summary(results)
    for name, target in TARGETS_S.items():
        middle = statistics.median(m.value for m in results[name])
        print(f"target {name} p50 <= {target} s: {'met' if middle <= target else 'MISSED'} (median {middle:.3f} s)")
    watch.report()
    print_ratio("new_user_over_view_only", results["new user"], results["view only"])
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
