"""Inspect-update latency of the served app with the default model: 30 users in a row, then 4 concurrent clients.

Run: PYTHONPATH=. .venv/bin/python bench/bench_app.py [--users 30] [--clients 4] [--per-client 10]
Each request is the Inspect tab's full round trip through gradio_client (/inspect): prompt, forward pass,
every table, figure and HTML block, serialised. Users are never repeated, so no result comes from a cache.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import app as app_module
from rerank_app.pickers import make_settings
from rerank_app.server import build_app, build_context, launch
from rerank_core.inspector import BASE

TARGET_S = 1.0


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def report(label: str, latencies: list[float], errors: int = 0) -> None:
    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    print(f"{label}: n={len(latencies)} p50={p50:.3f}s p95={p95:.3f}s mean={statistics.fmean(latencies):.3f}s "
          f"max={max(latencies):.3f}s errors={errors}  (p50 is {p50 / TARGET_S:.2f}x the {TARGET_S:.0f} s target)")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def timed_inspect(client: object, user: str) -> float:
    begin = time.perf_counter()
    client.predict(user_id=user, api_name="/inspect")  # type: ignore[attr-defined]
    return time.perf_counter() - begin


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=30, help="users selected one after another")
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--per-client", type=int, default=10, help="users each concurrent client selects")
    options = parser.parse_args()

    from gradio_client import Client

    begin = time.perf_counter()
    context = build_context(app_module.parse_args([]))
    demo = build_app(context)
    port = free_port()
    launch(demo, port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    print(f"app up in {time.perf_counter() - begin:.1f} s at {url}; model {context.model_names[0]}, "
          f"dataset {context.dataset_names[0]} ({len(context.users(context.dataset_names[0]))} users)")
    users = context.users(context.dataset_names[0])
    needed = 1 + options.users + options.clients * options.per_client
    if len(users) < needed:
        raise SystemExit(f"the dataset has {len(users)} users; this run needs {needed} distinct ones")
    client = Client(url, verbose=False)
    timed_inspect(client, users[0])  # warm-up: first figures, first tokenizer calls

    # The forward pass alone, for scale: what the round trip adds on top of it.
    dataset, model = context.dataset_names[0], context.model_names[0]
    core = []
    for user in users[-5:]:
        start = time.perf_counter()
        context.inspect(dataset, model, BASE, user, make_settings())
        core.append(time.perf_counter() - start)
    print(f"core inspect (prompt + forward pass, no UI): median {statistics.median(core):.3f}s over 5 users")

    sequential = [timed_inspect(client, user) for user in users[1:1 + options.users]]
    report(f"sequential, {options.users} users one after another", sequential)

    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    offset = 1 + options.users

    def worker(index: int) -> None:
        own = Client(url, verbose=False)
        chunk = users[offset + index * options.per_client: offset + (index + 1) * options.per_client]
        for user in chunk:
            try:
                elapsed = timed_inspect(own, user)
            except Exception as error:
                with lock:
                    errors.append(f"{user}: {error}")
                continue
            with lock:
                latencies.append(elapsed)

    wall = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(index,)) for index in range(options.clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - wall
    report(f"concurrent, {options.clients} clients x {options.per_client} users", latencies, len(errors))
    print(f"concurrent throughput: {len(latencies) / wall:.2f} users/s over {wall:.1f} s")
    for error in errors[:5]:
        print(f"  error: {error}")
    demo.close()
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
