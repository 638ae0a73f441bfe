"""Measured gain of the quick fine-tune: base vs adapter on the same held-out test users (issue 3).

Run: `PYTHONPATH=. python bench/bench_finetune.py [--rounds 1] [--users 200] [--lr 1e-3 ...]`. Each round trains
the adapter in a fresh process (as the app's Fine-tune tab does: kernel caches start cold, peak RSS is the run's
own) and prints its wall time (samples, validation, training, save; not the model load), CPU time, peak RSS and
samples/s; then round 1's adapter is evaluated against the base on held-out test users: NDCG@10 / Recall@10 /
MRR@10 with paired differences and 95% CIs. One way only, so the rounds are repeats (bench/method.py prints
them, their median and spread, and the load). The default is ONE round, because a round takes about 3 minutes
and the evaluation 2 more; a figure for the README needs `--rounds 3` (about 15 minutes).
Targets on the 2-core CPU: at most 180 s wall, NDCG@10 gain with its 95% CI lower bound above +0.30.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from method import LoadWatch, Measurement, add_method_args, interleaved, print_ratio, print_summary, run_fresh

from rerank_core.compare import compare_systems, comparison_table
from rerank_core.data.loaders import load_dataset
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.models import load_model
from rerank_core.training.config import TrainConfig, training_config
from rerank_core.training.run import train_adapter
from rerank_core.training.samples import validation_users

TARGET_SECONDS = 180.0
TARGET_CI_LOW = 0.30
LAST_STEPS = 10


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """CPU time of this process: with other jobs on the cores, wall time overstates an idle machine's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def step_printer(every: int = 10):
    """Prints a compact line every few steps so a log shows loss against ln(N) as the run goes."""
    def on_event(event: dict) -> None:
        kind = event["event"]
        if kind == "step" and (event["step"] % every == 0 or event["step"] == event["total_steps"]):
            print(f"  step {event['step']}/{event['total_steps']} loss {event['loss']:.3f} "
                  f"letter {event['letter_loss']:.3f} (ln N {event['uniform_loss']:.3f}) "
                  f"elapsed {event['elapsed']:.0f}s eta {event['eta']:.0f}s", flush=True)
        elif kind == "validation":
            print(f"  validation step {event['step']}: NDCG@10 {event['NDCG@10']:.4f} "
                  f"Recall@10 {event['Recall@10']:.4f}", flush=True)
        elif kind in ("stage", "start", "done", "cancelled", "failed"):
            detail = event.get("stage") or event.get("error") or ""
            print(f"  [{kind}] {detail}", flush=True)
    return on_event


def add_overrides(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--training-preset", default="quick")
    parser.add_argument("--lr", type=float, dest="learning_rate")
    parser.add_argument("--max-samples", type=int)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--batch-size", type=int)
    parser.add_argument("--max-prompt-tokens", type=int)
    parser.add_argument("--sample-mode")
    parser.add_argument("--candidates", type=int)
    parser.add_argument("--eval-every", type=int)
    parser.add_argument("--eval-users", type=int)
    parser.add_argument("--lora-r", type=int)
    parser.add_argument("--seed", type=int)


def config_from(args: argparse.Namespace, **fixed: object) -> TrainConfig:
    names = ("learning_rate", "max_samples", "epochs", "batch_size", "max_prompt_tokens", "sample_mode",
             "candidates", "eval_every", "eval_users", "lora_r", "seed")
    return training_config(args.training_preset, **{name: getattr(args, name) for name in names}, **fixed)


def test_users(dataset, count: int) -> list[str]:
    """A fixed held-out set: each user's last item (the test target) is never in any training sample."""
    return validation_users(dataset, count, seed=12345)


def train_once(args: argparse.Namespace) -> dict:
    """One fine-tune in this (fresh) process; the model load is not timed. Prints progress to stderr."""
    dataset = load_dataset()
    loaded = load_model()
    config = config_from(args, **({"preset": args.prompt_preset} if args.prompt_preset else {}))
    events: list[dict] = []
    printer = step_printer()

    def on_event(event: dict) -> None:
        events.append(event)
        stdout, sys.stdout = sys.stdout, sys.stderr  # stdout carries only the JSON result
        try:
            printer(event)
        finally:
            sys.stdout = stdout

    started, cpu = time.monotonic(), cpu_seconds()
    report = train_adapter(loaded, dataset, config, args.name, root=args.root, on_event=on_event,
                           training_preset=args.training_preset)
    letter_losses = [event["letter_loss"] for event in events if event["event"] == "step"][-LAST_STEPS:]
    return {"seconds": time.monotonic() - started, "cpu": cpu_seconds() - cpu, "peak_rss_mb": peak_rss_mb(),
            "config": config.to_json(), "report": report.to_json(),
            "letter_loss_last": sum(letter_losses) / len(letter_losses)}


def training_rounds(args: argparse.Namespace, ways: dict[str, list[str]], root: str,
                    watch: LoadWatch) -> dict[str, list[Measurement]]:
    """Each way (extra command-line options) trained once per round in a fresh process; adapter `<way>-<round>`."""
    overrides = [f"--{name.replace('_', '-')}={value}" for name, value in vars(args).items()
                 if name in OVERRIDES and value is not None]
    counters = {name: 0 for name in ways}

    def way(name: str):
        def run() -> Measurement:
            counters[name] += 1
            result = run_fresh(__file__, ["--train-once", "--root", root, "--name", f"{name}-{counters[name]}",
                                          *overrides, *ways[name]])
            return Measurement(result["seconds"], result)
        return run

    def describe(measurement: Measurement) -> str:
        result = measurement.details
        report = result["report"]
        return (f"{result['cpu']:.0f} CPU s; training loop {report['train_time_s']:.1f} s "
                f"({report['samples_per_s']:.2f} samples/s); letter loss (last {LAST_STEPS} steps) "
                f"{result['letter_loss_last']:.3f} vs ln N {report['uniform_loss']:.3f}; "
                f"peak RSS {result['peak_rss_mb']:.0f} MB")

    return interleaved({name: way(name) for name in ways}, args.rounds, watch, describe=describe)


OVERRIDES = ("training_preset", "learning_rate", "max_samples", "epochs", "batch_size", "max_prompt_tokens",
             "sample_mode", "candidates", "eval_every", "eval_users", "lora_r", "seed")


def add_train_once(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--train-once", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--name", help=argparse.SUPPRESS)
    parser.add_argument("--prompt-preset", help=argparse.SUPPRESS)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200, help="held-out test users (at least 200)")
    add_overrides(parser)
    add_method_args(parser, rounds=1)
    add_train_once(parser)
    args = parser.parse_args(argv)
    if args.train_once:
        print(json.dumps(train_once(args)))
        return 0

    dataset = load_dataset()
    loaded = load_model()
    config = config_from(args)
    print(f"dataset {dataset.name}: {len(dataset.users)} users, {len(dataset.items)} items; model {loaded.name} "
          f"({str(loaded.dtype).replace('torch.', '')} on {loaded.device})")
    print(f"config: {config.to_json()}")
    root = tempfile.mkdtemp(prefix="bench-adapters-")
    with LoadWatch() as watch:
        results = training_rounds(args, {"quick": []}, root, watch)
    first = results["quick"][0].details
    report = first["report"]

    users = test_users(dataset, args.users)
    settings = InspectSettings(preset=config.prompt_preset, strategy=config.strategy, split="test",
                               candidates=config.candidate_config(), max_prompt_tokens=config.max_prompt_tokens)
    eval_started = time.monotonic()
    inspector = Inspector(dataset, loaded, adapters_root=root, batch_size=8)
    _, summary = compare_systems(inspector, users, settings, ["base", "quick-1"])
    eval_seconds = time.monotonic() - eval_started

    ndcg = summary[(summary.system == "quick-1") & (summary.metric == "NDCG@10")].iloc[0]
    print()
    print(f"quick fine-tune ({report['samples']} samples, {report['steps']} steps, preset {config.preset}, "
          f"{config.candidates} candidates); round 1:")
    print(f"  final loss {report['final_loss']:.3f}, letter loss {report['final_letter_loss']:.3f} "
          f"vs ln(N) = {report['uniform_loss']:.3f}")
    print(f"  validation ({config.eval_users} users) before {report['validation'].get('before')}")
    print(f"  validation after {report['validation'].get('after')}")
    print(f"  evaluation of {len(users)} test users x 2 systems {eval_seconds:.1f} s")
    print()
    print(f"test split, {len(users)} users (difference vs base, 95% paired bootstrap CI):")
    print(comparison_table(summary))
    print()
    print_summary(results)
    wall = statistics.median(m.value for m in results["quick"])
    print(f"target wall time <= {TARGET_SECONDS:.0f} s: {'met' if wall <= TARGET_SECONDS else 'MISSED'} "
          f"(median {wall:.0f} s over {args.rounds} round(s))")
    print(f"target NDCG@10 gain CI lower bound > {TARGET_CI_LOW:+.2f}: "
          f"{'met' if ndcg['ci_low'] > TARGET_CI_LOW else 'MISSED'} "
          f"({ndcg['difference']:+.4f} [{ndcg['ci_low']:+.4f}, {ndcg['ci_high']:+.4f}])")
    watch.report()
    print_ratio("wall_over_target", results["quick"], [Measurement(TARGET_SECONDS)])
    return 0


if __name__ == "__main__":
    sys.exit(main())
