"""Real data: MovieLens 100K, the base model, a quick adapter and the three baselines on the same candidates.

Run: `PYTHONPATH=. python bench/bench_real.py [--users 200] [--sources random,retriever] [--lr ...]`, or spread
over N CPU processes with `torchrun --nproc_per_node N bench/bench_real.py --adapters-root DIR ...` (the
fine-tune is data-parallel, scoring is split by Inspector's shard; rank 0 prints).
For each candidate source: base with the `seed` and `seed_after` prompts, the quick adapter trained on
MovieLens (seed_after), and the random / popularity / retriever baselines, on the same held-out test users
and candidates; NDCG@10 with its paired bootstrap 95% CI against the base (seed_after) and against
popularity, Recall@10, MRR@10. Every step prints wall time, CPU time, peak RSS so far and the load average;
the fine-tune prints its letter loss as the mean of each 8-step window next to ln N.
A shorter run: `--users 100 --sources random --llm-rows "quick adapter"` (one source, no `seed` base row).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
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
from rerank_core.inspector import BASE, Inspector, InspectSettings
from rerank_core.models import load_model
from rerank_core.prompts import get_preset
from rerank_core.training.run import train_adapter

ADAPTER = "movielens-quick"
# The rows of each table, in order: (label, system, preset); baselines read no prompt.
LLM_RUNS = (("base (seed)", BASE, get_preset("seed")), ("base (seed_after)", BASE, get_preset("seed_after")),
            ("quick adapter", ADAPTER, get_preset("seed_after")))
REFERENCE, POPULARITY = "base (seed_after)", "popularity"
# One step holds 4 samples, so single-step letter losses are noise; the trajectory is the mean of each window.
LOSS_WINDOW = 8


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


def cell(row: pd.Series) -> str:
    if pd.isna(row["difference"]):
        return "—"
    return f"{row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}]"


def source_table(per_user: pd.DataFrame, users: list[str]) -> tuple[str, list[dict[str, Any]]]:
    """Markdown rows for one candidate source: mean, Δ vs the base (seed_after) and Δ vs popularity."""
    labels = list(dict.fromkeys(per_user["system"]))
    against = {reference: pd.DataFrame([row for label in labels for row in paired_rows(
        per_user, users, label, reference, SUMMARY_COLUMNS, 2000, 0)]) for reference in (REFERENCE, POPULARITY)}
    lines, records = [], []
    for label in labels:
        by_metric = {reference: frame[frame.system == label].set_index("metric")
                     for reference, frame in against.items()}
        ndcg = by_metric[REFERENCE].loc["NDCG@10"]
        lines.append(f"| {label} | {ndcg['mean']:.4f} | {cell(ndcg)} | {cell(by_metric[POPULARITY].loc['NDCG@10'])} "
                     f"| {by_metric[REFERENCE].loc['Recall@10', 'mean']:.4f} "
                     f"| {by_metric[REFERENCE].loc['MRR@10', 'mean']:.4f} |")
        records.append({"system": label, **{f"{metric}": float(by_metric[REFERENCE].loc[metric, "mean"])
                                             for metric in ("NDCG@10", "Recall@10", "MRR@10")},
                        "vs_base": by_metric[REFERENCE].loc["NDCG@10"][["difference", "ci_low", "ci_high"]].tolist(),
                        "vs_popularity": by_metric[POPULARITY].loc["NDCG@10"][
                            ["difference", "ci_low", "ci_high"]].tolist()})
    return "\n".join(lines), records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200, help="held-out test users (default %(default)s)")
    parser.add_argument("--sources", default="random,retriever", help="candidate sources (default %(default)s)")
    parser.add_argument("--text-field", help="item text (default: the training preset's, title with the year)")
    parser.add_argument("--history-items", type=int, help="recent history items the prompt budget holds")
    parser.add_argument("--train-negatives", choices=CANDIDATE_SOURCES,
                        help="where the training samples' negatives come from (default: the training preset's)")
    parser.add_argument("--llm-rows", default=",".join(label for label, _, _ in LLM_RUNS),
                        help="LLM rows to score, comma-separated (default: all: %(default)s); fewer rows, "
                             "shorter run (base (seed_after) is the reference and always runs)")
    parser.add_argument("--json-out", help="also write the tables and steps as JSON here")
    parser.add_argument("--adapters-root", help="where the adapter is written (needed under torchrun: one path "
                                                "for every process; default: a new temporary folder)")
    add_overrides(parser)
    args = parser.parse_args(argv)
    rows = {part.strip() for part in args.llm_rows.split(",") if part.strip()} | {REFERENCE}
    known = [label for label, _, _ in LLM_RUNS]
    if rows - set(known):
        parser.error(f"--llm-rows: unknown {', '.join(sorted(rows - set(known)))}; known: {', '.join(known)}")
    args.llm_runs = [run for run in LLM_RUNS if run[0] in rows]
    if launched_world_size() > 1 and not args.adapters_root:
        parser.error("under torchrun give --adapters-root: every process must load the adapter rank 0 writes")
    if int(os.environ.get("RANK", "0")) > 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - rank 0 prints the tables
    steps = Steps()
    # One pass, not interleaved rounds: the figures here are quality with CIs; the times are one run's.
    with LoadWatch() as watch:
        tables, report, config, letter_losses = run_all(args, steps)
    print("steps:")
    for row in steps.rows:
        print(f"  {row['step']}: {row['wall_s']} s wall, {row['cpu_s']} CPU s, peak RSS {row['peak_rss_mb']} MB, "
              f"load {row['load_before']} -> {row['load_after']}")
    watch.report()
    if args.json_out and int(os.environ.get("RANK", "0")) == 0:
        Path(args.json_out).write_text(json.dumps({
            "config": config.to_json(), "prompt_budget": report.prompt_budget, "users": args.users,
            "train": {"samples": report.samples, "steps": report.steps, "letter_loss": report.final_letter_loss,
                      "uniform_loss": report.uniform_loss, "validation": report.validation,
                      "letter_loss_by_step": letter_losses},
            "tables": tables, "steps": steps.rows, "noisy": watch.noisy}, indent=2))
    return 0


def run_all(args: argparse.Namespace,
            steps: Steps) -> tuple[dict[str, list[dict[str, Any]]], Any, Any, list[float]]:
    """Train, then score every system on each candidate source; returns the tables, the report, the config and
    the letter loss of every training step."""
    dataset, loaded = steps.run("load data and model", lambda: (load_dataset(MOVIELENS_100K_REAL), load_model()))
    config = config_from(args, text_field=args.text_field, history_items=args.history_items,
                         candidate_source=args.train_negatives)
    print(f"dataset {dataset.name}: {len(dataset.users)} users, {len(dataset.items)} items; model {loaded.name} "
          f"({str(loaded.dtype).replace('torch.', '')} on {loaded.device})\nconfig: {config.to_json()}", flush=True)
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

    report = steps.run("train quick adapter", lambda: train_adapter(
        loaded, dataset, config, ADAPTER, root=root, on_event=on_event, training_preset=args.training_preset))
    print(f"  {report.samples} samples, {report.steps} steps, {report.train_time_s:.0f} s in the training loop; "
          f"final letter loss {report.final_letter_loss:.3f} vs ln(N) {report.uniform_loss:.3f}; validation "
          f"before {report.validation.get('before')}, after {report.validation.get('after')}", flush=True)
    trajectory = ", ".join(f"{value:.3f}" for value in window_means(letter_losses))
    print(f"  letter loss by {LOSS_WINDOW}-step window: {trajectory}", flush=True)
    budget = report.prompt_budget.get("tokens", config.max_prompt_tokens)

    users = test_users(dataset, args.users)
    # Under torchrun the Trainer has joined the process group; scoring splits over the same processes.
    inspector = Inspector(dataset, loaded, adapters_root=root, batch_size=8, shard=process_shard("cpu"))
    tables: dict[str, list[dict[str, Any]]] = {}
    for source in [part.strip() for part in args.sources.split(",") if part.strip()]:
        candidates = CandidateConfig(source=source, count=config.candidates, seed=config.seed)
        settings = InspectSettings(strategy=config.strategy, text_field=config.text_field, split="test",
                                   candidates=candidates, max_prompt_tokens=budget, use_adapter_preset=False)
        frames = [steps.run(f"{source}: baselines", lambda candidates=candidates: pd.concat([evaluate_baseline(
            dataset, users, "test", candidates, name, inspector.sampler) for name in BASELINES]))]
        for label, system, preset in args.llm_runs:
            run = replace(settings, preset=preset)
            frame = steps.run(f"{source}: {label}", lambda run=run, system=system:
                              inspector.evaluate(users, run, system))
            frames.append(frame.assign(system=label))
        per_user = pd.concat(frames, ignore_index=True)
        lines, tables[source] = source_table(per_user, users)
        print(f"\ncandidates: {source}, {config.candidates} per user, {len(users)} test users "
              f"(Δ: paired difference, bootstrap 95% CI)\n"
              "| system | NDCG@10 | Δ vs base (seed_after) | Δ vs popularity | Recall@10 | MRR@10 |\n"
              f"|---|---|---|---|---|---|\n{lines}\n", flush=True)
    return tables, report, config, letter_losses


if __name__ == "__main__":
    sys.exit(main())
