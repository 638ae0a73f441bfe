"""Real data: MovieLens 100K, the base model, a preset's adapter and the three baselines on the same candidates.

Run: `PYTHONPATH=. python bench/bench_real.py [--users 200] [--training-preset movielens] [--out bench_real]`, or
spread over N CPU processes with `torchrun --nproc_per_node N bench/bench_real.py --adapters-root DIR ...` (the
fine-tune is data-parallel, scoring is split by Inspector's shard; rank 0 prints).
Trains the adapter with the training preset (default `movielens`), then, for each candidate source (default random
and retriever), scores the random / popularity / retriever baselines, the base model and the adapter (both with
the preset's prompt) on the same held-out test users and candidates. ONE table covers every source: the
candidate recall (users whose target is among the candidates, with both counts), then each system's NDCG@10,
Recall@10 and MRR@10 over all users (a target not among the candidates is a miss) and, where the recall is below
1, over the users whose target is among them (LlamaRec's subset), with paired bootstrap 95% CIs against the base,
popularity and the retriever, and the seconds and load average of each row. The table is printed; `--out PREFIX`
also writes PREFIX.md and PREFIX.json (with the config, the fine-tune's letter loss per step and every step's
wall time, CPU time, peak RSS and load).
A shorter run: `--users 100 --sources random` (one source). A smoke run: `--users 8 --max-samples 8`.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import pandas as pd
from bench_finetune import add_overrides, config_from, step_printer, test_users
from method import LoadWatch

from rerank_core.baselines import BASELINES, evaluate_baseline, paired_rows
from rerank_core.candidates import CANDIDATE_SOURCES, CandidateConfig
from rerank_core.compare import SUMMARY_COLUMNS
from rerank_core.data.builtin import MOVIELENS_100K_REAL
from rerank_core.data.loaders import load_dataset
from rerank_core.distributed import launched_world_size, process_shard
from rerank_core.fsutil import atomic_write_text
from rerank_core.inspector import BASE, Inspector, InspectSettings
from rerank_core.metrics import candidate_recall
from rerank_core.models import load_model
from rerank_core.throughput import ForwardShape, MatmulProbe, forward_shape, matmul_probe
from rerank_core.training.run import train_adapter

ADAPTER = "movielens-preset"
# The LLM rows of each source, in order: (label, system); both use the training preset's prompt preset.
BASE_ROW, ADAPTER_ROW = "base", "adapter"
LLM_ROWS = ((BASE_ROW, BASE), (ADAPTER_ROW, ADAPTER))
# Every row's paired difference is shown against each of these runs of the same source.
REFERENCES = (BASE_ROW, "popularity", "retriever")
METRICS = ("NDCG@10", "Recall@10", "MRR@10")
# One step holds 4 samples, so single-step letter losses are noise; the trajectory is the mean of each window.
LOSS_WINDOW = 8
TABLE_HEADER = ("| candidates | recall | system | population | users | NDCG@10 | Δ vs base | Δ vs popularity "
                "| Δ vs retriever | Recall@10 | MRR@10 | seconds | load |\n"
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|")


def window_means(values: list[float]) -> list[float]:
    """The mean of each full LOSS_WINDOW-step window, in order."""
    return [sum(values[start:start + LOSS_WINDOW]) / LOSS_WINDOW
            for start in range(0, len(values) - LOSS_WINDOW + 1, LOSS_WINDOW)]


class Steps:
    """Times each step (wall, CPU) and records the peak RSS so far and the load average after it."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def run(self, name: str, work: Callable[[], Any]) -> Any:
        load_before = os.getloadavg()[0]
        wall, cpu = time.monotonic(), time.process_time()
        result = work()
        row = {"step": name, "wall_s": round(time.monotonic() - wall, 1), "cpu_s": round(time.process_time() - cpu, 1),
               "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               "load_before": round(load_before, 2), "load_after": round(os.getloadavg()[0], 2)}
        self.rows.append(row)
        print(f"[step] {name}: {row['wall_s']} s wall, {row['cpu_s']} CPU s, peak RSS {row['peak_rss_mb']} MB, "
              f"load {row['load_before']} -> {row['load_after']}", flush=True)
        return result


def number(value: Any) -> float | None:
    """A float for the JSON, None for NaN (an empty population, or no difference to the run itself)."""
    return None if value is None or math.isnan(float(value)) else float(value)


def ci_cell(row: dict[str, Any] | None) -> str:
    """A paired difference with its CI; '—' for the run itself or an empty population."""
    if row is None or row["difference"] is None:
        return "—"
    return f"{row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def source_rows(source: str, per_user: pd.DataFrame, users: list[str], timing: dict[str, dict[str, Any]],
                candidates: int) -> list[dict[str, Any]]:
    """One record per (system, population) of one candidate source: means, paired differences, time and load."""
    recall = candidate_recall(per_user, source, candidates)
    labels = list(dict.fromkeys(per_user["system"]))
    against = {reference: {(row["system"], row["population"], row["metric"]): row
                           for label in labels for row in paired_rows(per_user, users, label, reference,
                                                                      SUMMARY_COLUMNS, 2000, 0)}
               for reference in REFERENCES if reference in labels}
    own = against[BASE_ROW]
    records = []
    for label in labels:
        for population in dict.fromkeys(key[1] for key in own if key[0] == label):
            first = own[(label, population, METRICS[0])]
            records.append({
                "source": source, "recall": recall.to_json(), "system": label, "population": population,
                "users": int(first["n"]),
                **{metric: number(own[(label, population, metric)]["mean"]) for metric in METRICS},
                **{f"NDCG@10 vs {reference}": None if reference == label else {
                    key: number(against[reference][(label, population, "NDCG@10")][key])
                    for key in ("difference", "ci_low", "ci_high")} for reference in against},
                "seconds": timing[label]["wall_s"], "load": timing[label]["load_after"]})
    return records


def markdown_row(record: dict[str, Any]) -> str:
    recall = record["recall"]
    share = "—" if recall["recall"] is None else f"{recall['recall']:.3f}"
    means = ["—" if record[metric] is None else f"{record[metric]:.4f}" for metric in METRICS]
    return (f"| {record['source']} | {share} ({recall['target_among_candidates']}/{recall['users']}) "
            f"| {record['system']} | {record['population']} | {record['users']} | {means[0]} | "
            + " | ".join(ci_cell(record.get(f"NDCG@10 vs {reference}")) for reference in REFERENCES)
            + f" | {means[1]} | {means[2]} | {record['seconds']} | {record['load']} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200, help="held-out test users (default %(default)s)")
    parser.add_argument("--sources", default="random,retriever", help="candidate sources (default %(default)s)")
    parser.add_argument("--text-field", help="item text: a named text or a spec such as title+release_year+class+count "
                        "(default: the training preset's)")
    parser.add_argument("--history-items", type=int, help="recent history items the prompt budget holds")
    parser.add_argument("--train-negatives", choices=CANDIDATE_SOURCES,
                        help="where the training samples' candidates come from (default: the training preset's)")
    parser.add_argument("--out", metavar="PREFIX", help="also write the table to PREFIX.md and PREFIX.json")
    parser.add_argument("--adapters-root", help="where the adapter is written (needed under torchrun: one path "
                                                "for every process; default: a new temporary folder)")
    add_overrides(parser)
    parser.set_defaults(training_preset="movielens")
    args = parser.parse_args(argv)
    if launched_world_size() > 1 and not args.adapters_root:
        parser.error("under torchrun give --adapters-root: every process must load the adapter rank 0 writes")
    main_rank = int(os.environ.get("RANK", "0")) == 0
    if not main_rank:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 prints the table
    steps = Steps()
    # One pass, not interleaved rounds: the figures here are quality with CIs; the times are one run's.
    with LoadWatch() as watch:
        records, report, config, letter_losses = run_all(args, steps)
    table = "\n".join([TABLE_HEADER, *map(markdown_row, records)])
    train_step = next(row for row in steps.rows if row["step"] == "train adapter")
    heading = (f"MovieLens 100K, {args.users} held-out test users, {config.candidates} candidates; adapter: training "
               f"preset {args.training_preset} ({report.samples} samples, {report.steps} steps, "
               f"{train_step['wall_s']} s, load {train_step['load_before']} -> {train_step['load_after']}); "
               f"prompt preset {config.preset}, item text {config.text_field}. Δ: paired difference of NDCG@10, "
               "bootstrap 95% CI; 'target among candidates' only where the recall is below 1.")
    print(f"\n{heading}\n\n{table}\n", flush=True)
    print("steps:")
    for row in steps.rows:
        print(f"  {row['step']}: {row['wall_s']} s wall, {row['cpu_s']} CPU s, peak RSS {row['peak_rss_mb']} MB, "
              f"load {row['load_before']} -> {row['load_after']}")
    watch.report()
    if args.out and main_rank:
        atomic_write_text(Path(f"{args.out}.md"), f"{heading}\n\n{table}\n")
        atomic_write_text(Path(f"{args.out}.json"), json.dumps({
            "config": config.to_json(), "training_preset": args.training_preset,
            "prompt_budget": report.prompt_budget, "users": args.users,
            "train": {"samples": report.samples, "steps": report.steps, "dropped": report.dropped,
                      "letter_loss": report.final_letter_loss, "uniform_loss": report.uniform_loss,
                      "validation": report.validation, "letter_loss_by_step": letter_losses,
                      "seconds": train_step["wall_s"]},
            "rows": records, "markdown": table, "steps": steps.rows, "noisy": watch.noisy}, indent=2))
        print(f"wrote {args.out}.md and {args.out}.json")
    return 0


def scoring_rate(frame: pd.DataFrame, seconds: float, shape: ForwardShape, probe: MatmulProbe) -> str:
    """A scoring step's prompt tokens/s and its from-scratch FLOPs/s as a share of every process's probe."""
    processes = max(launched_world_size(), 1)
    gflops = shape.flops(frame["prompt_tokens"]) / max(seconds, 1e-9) / 1e9
    return (f"  {len(frame) / max(seconds, 1e-9):.2f} users/s, {frame['prompt_tokens'].sum() / max(seconds, 1e-9):.0f} "
            f"prompt tokens/s (mean {frame['prompt_tokens'].mean():.0f} a prompt), {gflops:.0f} GFLOP/s = "
            f"{gflops / (probe.gflops * processes):.0%} of the matmul probe x {processes} process(es)")


def run_all(args: argparse.Namespace, steps: Steps) -> tuple[list[dict[str, Any]], Any, Any, list[float]]:
    """Train, then score every system on each candidate source; returns the table's records, the training report,
    the config and the letter loss of every training step."""
    dataset, loaded = steps.run("load data and model", lambda: (load_dataset(MOVIELENS_100K_REAL), load_model()))
    config = config_from(args, text_field=args.text_field, history_items=args.history_items,
                         candidate_source=args.train_negatives)
    print(f"dataset {dataset.name}: {len(dataset.users)} users, {len(dataset.items)} items; model {loaded.name} "
          f"({str(loaded.dtype).replace('torch.', '')} on {loaded.device})\nconfig: {config.to_json()}", flush=True)
    probe, shape = matmul_probe(loaded.dtype), forward_shape(loaded.model)
    print(probe.describe(), flush=True)
    root = args.adapters_root or tempfile.mkdtemp(prefix="bench-real-")
    printer = step_printer(every=LOSS_WINDOW)
    letter_losses: list[float] = []

    def on_event(event: dict[str, Any]) -> None:
        if event.get("detail"):
            print(f"  [{event['stage']}] {event['detail']}", flush=True)  # the data-sized prompt budget
            return
        printer(event)
        if event["event"] == "step":
            letter_losses.append(event["letter_loss"])
            if len(letter_losses) % LOSS_WINDOW == 0:
                print(f"  letter loss, mean of steps {len(letter_losses) - LOSS_WINDOW + 1}-{len(letter_losses)}: "
                      f"{window_means(letter_losses)[-1]:.3f} (ln N {event['uniform_loss']:.3f})", flush=True)

    report = steps.run("train adapter", lambda: train_adapter(
        loaded, dataset, config, ADAPTER, root=root, on_event=on_event, training_preset=args.training_preset))
    print(f"  {report.samples} samples (dropped {report.dropped}), {report.steps} steps, {report.train_time_s:.0f} s "
          f"in the training loop; final letter loss {report.final_letter_loss:.3f} vs ln(N) "
          f"{report.uniform_loss:.3f}; validation before {report.validation.get('before')}, after "
          f"{report.validation.get('after')}", flush=True)
    trajectory = ", ".join(f"{value:.3f}" for value in window_means(letter_losses))
    print(f"  letter loss by {LOSS_WINDOW}-step window: {trajectory}", flush=True)
    budget = report.prompt_budget.get("tokens", config.max_prompt_tokens)

    users = test_users(dataset, args.users)
    # Under torchrun the Trainer has joined the process group; scoring splits over the same processes.
    inspector = Inspector(dataset, loaded, adapters_root=root, batch_size=8, shard=process_shard("cpu"))
    records: list[dict[str, Any]] = []
    for source in [part.strip() for part in args.sources.split(",") if part.strip()]:
        candidates = CandidateConfig(source=source, count=config.candidates, seed=config.seed)
        settings = InspectSettings(preset=config.prompt_preset, strategy=config.strategy,
                                   text_field=config.text_field, split="test", candidates=candidates,
                                   max_prompt_tokens=budget, use_adapter_preset=False)
        frames, timing = [], {}
        for name in BASELINES:
            frames.append(steps.run(f"{source}: {name}", lambda name=name, candidates=candidates: evaluate_baseline(
                dataset, users, "test", candidates, name, inspector.sampler)))
            timing[name] = steps.rows[-1]
        for label, system in LLM_ROWS:
            frame = steps.run(f"{source}: {label}", lambda system=system, settings=settings:
                              inspector.evaluate(users, settings, system))
            frames.append(frame.assign(system=label))
            timing[label] = steps.rows[-1]
            print(scoring_rate(frame, timing[label]["wall_s"], shape, probe), flush=True)
        rows = source_rows(source, pd.concat(frames, ignore_index=True), users, timing, config.candidates)
        records += rows
        print(f"\ncandidates: {source}; {rows[0]['recall']['target_among_candidates']} of {len(users)} targets among "
              f"them\n{TABLE_HEADER}\n" + "\n".join(map(markdown_row, rows)) + "\n", flush=True)
    return records, report, config, letter_losses


if __name__ == "__main__":
    sys.exit(main())
