"""Inspect-update latency of the served app with the default model: new users, view-only updates, 4 clients.

Run: PYTHONPATH=. .venv/bin/python bench/bench_app.py [--rounds 3] [--users 20] [--clients 4] [--per-client 5]
Each request is the Inspect tab's full round trip as the page sends it (class PageEvent: the user picker's event
joined to the queue under the client's session, answered on its event stream, over plain HTTP): prompt, forward
pass, every table, figure and HTML block, serialised. Six ways, in interleaved rounds (bench/method.py), each
round's figure the p50 of its requests: "new user" (users never requested before, one after another),
"view only" (the same users again with the same settings: the scores are known, the built view is reused),
"new user, /call/ route" (as "new user", through the named endpoint /inspect over plain HTTP: the route
gradio_client and earlier runs of this bench use, which sets up a new session for every call),
"4 clients" (concurrent clients, each on users never requested before) and "empty endpoint" (a no-op event of a
second app launched the same way, sent like ours: the server's own round trip, the floor under every other figure);
the same empty endpoint through gradio_client is measured too, for scale, because that client adds a fixed wait of
its own to every call.
For "new user" and "view only" each request is split into stages (StageClock: wrappers around the functions that
do each one, so the stages add up to the round trip), printed as the median over rounds of each round's median:
prompt (split, candidates, texts, template), tokenize, forward, views (tables, HTML), figures (the chart, built and
serialised), handler (the rest of the handler: caches, checks, the model gate), postprocess (gradio's
processing of the other outputs), gradio (the rest of the server's work on the request) and transport (the
HTTP request, the queue and the event stream). A matmul probe in the same process and dtype
(rerank_core.throughput) gives the house target: the forward pass of the median prompt at the probe's speed,
plus 0.1 s.
"""

from __future__ import annotations

import argparse
import contextvars
import functools
import inspect
import json
import statistics
import sys
import threading
import time
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable
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
from rerank_core.throughput import forward_shape, matmul_probe

TARGETS_S = {"new user": 0.35, "view only": 0.08}  # p50 on a quiet machine (issue 24)
# The house target for a new user: the forward pass at the matmul probe's speed plus this much for the rest.
HOUSE_OVERHEAD_S = 0.1
STAGES = ("prompt", "tokenize", "forward", "views", "figures", "handler", "postprocess", "gradio", "transport")
STAGED_WAYS = ("new user", "view only")
API_WAY = "new user, /call/ route"


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def report(label: str, latencies: list[float], errors: int = 0) -> None:
    p50, p95 = percentile(latencies, 0.5), percentile(latencies, 0.95)
    print(f"{label}: n={len(latencies)} p50={p50:.3f}s p95={p95:.3f}s mean={statistics.fmean(latencies):.3f}s "
          f"max={max(latencies):.3f}s errors={errors}")


class PageEvent:
    """An event sent as the page sends it: joined to the queue under the client's session (one per client, like a
    browser tab), its answer read from the session's event stream, over plain HTTP. gradio_client adds about 0.09 s
    of its own waits to every call (its empty-endpoint round trip is printed beside ours), more than the view-only
    target itself."""

    def __init__(self, demo: Any, url: str, elem_id: str, event: str) -> None:
        trigger = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == elem_id)
        self.fn_index, block_fn = next((index, fn) for index, fn in demo.fns.items()
                                       if (trigger._id, event) in [tuple(target) for target in fn.targets])
        self.trigger_id = trigger._id
        # What a fresh page sends: each input's initial value; a State's value stays on the server.
        self.values = [None if getattr(block, "stateful", False) else getattr(block, "value", None)
                       for block in block_fn.inputs]
        ids = [block._id for block in block_fn.inputs]
        self.trigger_index = ids.index(trigger._id) if trigger._id in ids else None
        self.url = f"{url.rstrip('/')}/gradio_api"
        self.session = uuid.uuid4().hex

    def fork(self) -> PageEvent:
        """The same event from another client (a new session)."""
        other = object.__new__(PageEvent)
        other.__dict__.update(self.__dict__, session=uuid.uuid4().hex)
        return other

    def __call__(self, value: Any = None) -> float:
        """Seconds from the request to the complete answer, with `value` in the trigger's input; a failed or refused
        request raises with the server's message."""
        data = list(self.values)
        if value is not None:
            data[self.trigger_index] = value
        body = {"data": data, "event_data": None, "fn_index": self.fn_index, "trigger_id": self.trigger_id,
                "session_hash": self.session}
        begin = time.perf_counter()
        request = urllib.request.Request(f"{self.url}/queue/join", data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as answer:
            event_id = json.loads(answer.read())["event_id"]
        with urllib.request.urlopen(f"{self.url}/queue/data?session_hash={self.session}") as stream:
            text = stream.read().decode()  # the server ends the stream once the session has nothing pending
        elapsed = time.perf_counter() - begin
        messages = [json.loads(line[len("data: "):]) for line in text.splitlines() if line.startswith("data: ")]
        done = [m for m in messages if m.get("msg") == "process_completed" and m.get("event_id") == event_id]
        warnings = [m.get("log") for m in messages if m.get("msg") == "log" and m.get("level") == "warning"]
        if not done or not done[0].get("success") or warnings:
            raise RuntimeError(str(warnings or (done[0].get("output") if done else text[-300:])))
        return elapsed


class Endpoint:
    """A named endpoint over its /call/ route (a POST, then its event stream), as gradio_client calls it without the
    client's own waits: the route sets up a new session, with its copy of the page's configuration, for every call.
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


class StageClock:
    """Seconds the request in flight spent in each stage, from wrappers around the functions that do each one.

    A stage called inside another (the handler's forward pass, a figure inside the views) is taken out of the outer
    one, also across gradio's worker threads (they run in a copy of the caller's context), so the stages and the
    transport add up to the round trip. The totals are shared by every thread: only for one request at a time.
    """

    def __init__(self) -> None:
        self.exclusive: dict[str, float] = defaultdict(float)
        self.inclusive: dict[str, float] = defaultdict(float)
        self.missing: list[str] = []
        self._frame: contextvars.ContextVar[list | None] = contextvars.ContextVar("bench_stage", default=None)

    def wrap(self, owner: Any, name: str, stage: str) -> None:
        """Replace owner.name by a timed wrapper charging `stage` (a name that is gone is listed, not fatal)."""
        original = getattr(owner, name, None)
        if original is None:
            self.missing.append(f"{getattr(owner, '__name__', owner)}.{name}")
            return
        if inspect.iscoroutinefunction(original):
            @functools.wraps(original)
            async def timed(*args: Any, **kwargs: Any) -> Any:
                frame, token = self._enter()
                try:
                    return await original(*args, **kwargs)
                finally:
                    self._leave(stage, frame, token)
        else:
            @functools.wraps(original)
            def timed(*args: Any, **kwargs: Any) -> Any:
                frame, token = self._enter()
                try:
                    return original(*args, **kwargs)
                finally:
                    self._leave(stage, frame, token)
        setattr(owner, name, timed)

    def _enter(self) -> tuple[list, contextvars.Token]:
        frame = [time.perf_counter(), 0.0, self._frame.get()]  # start, time spent in inner stages, parent
        return frame, self._frame.set(frame)

    def _leave(self, stage: str, frame: list, token: contextvars.Token) -> None:
        elapsed = time.perf_counter() - frame[0]
        self._frame.reset(token)
        self.exclusive[stage] += elapsed - frame[1]
        self.inclusive[stage] += elapsed
        if frame[2] is not None:
            frame[2][1] += elapsed

    def reset(self) -> None:
        self.exclusive.clear()
        self.inclusive.clear()

    def take(self, round_trip: float) -> dict[str, float]:
        """The stages of the request just answered; transport is what the server's own work leaves of it."""
        stages = {stage: self.exclusive.get(stage, 0.0) for stage in STAGES}
        stages["transport"] = round_trip - self.inclusive.get("gradio", 0.0)
        self.reset()
        return stages


def off_main_thread(function: Callable[..., Any], *args: Any) -> Any:
    """function(*args) on a thread that ends with it: a probe run on this process's main thread would leave an
    OpenMP team there that slows the app's compute thread for the rest of the run (rerank_core/compute.py)."""
    results: list[Any] = []
    thread = threading.Thread(target=lambda: results.append(function(*args)))
    thread.start()
    thread.join()
    return results[0]


def instrument(clock: StageClock) -> None:
    """Time every stage of an Inspect request: the core's prompt, tokenizer and forward pass, the app's views and
    figure, gradio's handler call, output processing and request handling."""
    import gradio as gr
    from gradio.blocks import Blocks

    from rerank_app import plots, views
    from rerank_core import inspector, prompts

    for owner, name, stage in (
            (Blocks, "process_api", "gradio"), (Blocks, "call_function", "handler"),
            (Blocks, "postprocess_data", "postprocess"), (gr.Plot, "postprocess", "figures"),
            (views, "inspect_view", "views"), (views.StyledTable, "payload", "views"),
            (views, "letter_figure", "figures"), (plots, "plot_json", "figures"),
            (inspector.Inspector, "prepare", "prompt"), (inspector, "build_prompt", "prompt"),
            (prompts, "encode_rendered", "tokenize"),
            (prompts, "_cut_title", "tokenize"), (inspector, "answer_slot", "tokenize"),
            (inspector.Inspector, "letter_tokens", "tokenize"), (inspector, "score_token_ids", "forward")):
        clock.wrap(owner, name, stage)
    if clock.missing:
        print(f"stage clock: not found, so not timed: {', '.join(clock.missing)}")


def timed_inspect(send: Callable[[str], float], user: str, clock: StageClock | None = None,
                  stages: list[dict[str, float]] | None = None) -> float:
    """One Inspect round trip; with a clock, its stages are appended to `stages`."""
    if clock is not None:
        clock.reset()
    elapsed = send(user)
    if clock is not None and stages is not None:
        stages.append(clock.take(elapsed))
    return elapsed


def print_stages(name: str, measurements: list[Measurement]) -> None:
    """Each stage's median over rounds of its per-round median, in ms, and their sum beside the way's figure."""
    medians = {stage: statistics.median(statistics.median(request[stage] for request in m.details["stages"])
                                        for m in measurements) for stage in STAGES}
    parts = " · ".join(f"{stage} {seconds * 1000:.1f}" for stage, seconds in medians.items())
    print(f"{name} stages (ms, median over rounds of each round's median): {parts}; sum "
          f"{sum(medians.values()) * 1000:.1f} (p50 {statistics.median(m.value for m in measurements) * 1000:.1f})")


def empty_app() -> tuple[Any, str]:
    """A served app whose one event does nothing, launched like ours: the part of any figure gradio itself costs."""
    import gradio as gr

    with gr.Blocks() as empty:
        gr.Button(elem_id="noop").click(lambda: "ok", None, gr.Textbox(), api_name="noop")
    port = free_port()
    launch(empty, port=port, block=False)
    return empty, f"http://127.0.0.1:{port}/"


def concurrent(page: PageEvent, users: list[str], clients: int) -> tuple[list[float], list[str], float]:
    """Each client (its own session) requests its share of `users` one after another; all clients at once."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    per_client = len(users) // clients

    def worker(index: int) -> None:
        own = page.fork()
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
    clock = StageClock()
    instrument(clock)
    demo = build_app(context)
    port = free_port()
    launch(demo, port=port, block=False)
    url = f"http://127.0.0.1:{port}/"
    print(f"app up in {time.perf_counter() - begin:.1f} s at {url}; model {context.models.names[0]}, "
          f"dataset {context.datasets.names[0]} ({len(context.datasets.users(context.datasets.names[0]))} users)")
    users = context.datasets.users(context.datasets.names[0])
    per_round = 2 * options.users + options.clients * options.per_client
    needed = 6 + options.rounds * per_round
    if len(users) < needed:
        raise SystemExit(f"the dataset has {len(users)} users; this run needs {needed} distinct ones")
    client = PageEvent(demo, url, "user-picker", "input")
    api = Endpoint(Client(url, verbose=False), "/inspect")
    timed_inspect(client, users[0])  # warm-up: first figures, first tokenizer calls, the session

    # The machine's yardstick, in the dtype the core runs: the house target rests on it.
    dataset, model = context.datasets.names[0], context.models.names[0]
    loaded = context.models.loaded(model)
    probe, shape = off_main_thread(matmul_probe, loaded.dtype), forward_shape(loaded.model)
    print(probe.describe())

    # The forward pass alone, for scale: what the round trip adds on top of it (on the app's compute thread).
    core = []
    for user in users[-5:]:
        start = time.perf_counter()
        context.inspections.inspect(dataset, model, BASE, user, make_settings())
        core.append(time.perf_counter() - start)
    print(f"core inspect (prompt + forward pass, no UI): median {statistics.median(core):.3f}s over 5 users")

    empty_demo, empty_url = empty_app()
    empty_client = Client(empty_url, verbose=False)
    empty = PageEvent(empty_demo, empty_url, "noop", "click")
    empty()

    fresh = iter(users[1:1 + options.rounds * per_round])
    last_new: list[str] = []

    def new_user() -> Measurement:
        last_new[:] = [next(fresh) for _ in range(options.users)]
        stages: list[dict[str, float]] = []
        latencies = [timed_inspect(client, user, clock, stages) for user in last_new]
        return Measurement(percentile(latencies, 0.5), {"latencies": latencies, "stages": stages,
                                                        "users": list(last_new)})

    def view_only() -> Measurement:
        # The users the last "new user" round requested (round 1 always runs that way first).
        stages: list[dict[str, float]] = []
        latencies = [timed_inspect(client, user, clock, stages) for user in last_new]
        return Measurement(percentile(latencies, 0.5), {"latencies": latencies, "stages": stages})

    def new_user_api() -> Measurement:
        latencies = [timed_inspect(lambda user: api(user_id=user), next(fresh)) for _ in range(options.users)]
        return Measurement(percentile(latencies, 0.5), {"latencies": latencies})

    def clients() -> Measurement:
        chunk = [next(fresh) for _ in range(options.clients * options.per_client)]
        latencies, errors, wall = concurrent(client, chunk, options.clients)
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
        results = interleaved({"new user": new_user, "view only": view_only, API_WAY: new_user_api,
                               f"{options.clients} clients": clients,
                               "empty endpoint": empty_endpoint,
                               "empty endpoint, gradio_client": empty_through_gradio_client},
                              options.rounds, watch, describe=describe)
    demo.close()
    empty_demo.close()
    errors = [error for m in results[f"{options.clients} clients"] for error in m.details["errors"]]
    for error in errors[:5]:
        print(f"  error: {error}")
    for name, measurements in results.items():
        report(f"{name}, all rounds", [value for m in measurements for value in m.details["latencies"]],
               len([e for m in measurements for e in m.details.get("errors", [])]))
    print_summary(results)
    for name in STAGED_WAYS:
        print_stages(name, results[name])
    if not any(request["forward"] for m in results["new user"] for request in m.details["stages"]):
        print("stage clock: no forward pass was timed: rerank_core.inspector no longer calls score_token_ids; "
              "wrap the function it calls now in instrument(), or the forward pass counts as handler time")
    for name, target in TARGETS_S.items():
        middle = statistics.median(m.value for m in results[name])
        print(f"target {name} p50 <= {target} s: {'met' if middle <= target else 'MISSED'} (median {middle:.3f} s)")
    # The house target, from the median prompt of the new users (prepared again: no forward pass).
    settings = make_settings(dataset=dataset, model=model)
    with context.inspections.using(dataset, model) as inspector:
        tokens = statistics.median(len(inspector.prepare(user, settings).token_ids)
                                   for m in results["new user"] for user in m.details["users"])
    at_peak = shape.flops([round(tokens)]) / (probe.gflops * 1e9)
    house = at_peak + HOUSE_OVERHEAD_S
    middle = statistics.median(m.value for m in results["new user"])
    print(f"house target new user p50 <= {house:.3f} s (a {tokens:.0f}-token prompt's forward pass at the probe's "
          f"{probe.gflops:.0f} GFLOP/s, {at_peak:.3f} s, + {HOUSE_OVERHEAD_S} s): "
          f"{'met' if middle <= house else 'MISSED'} (median {middle:.3f} s)")
    watch.report()
    print_ratio("new_user_over_view_only", results["new user"], results["view only"])
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
