"""Measured gain of the quick fine-tune: base vs adapter on the same held-out test users (issue 3).

Run: `PYTHONPATH=. python bench/bench_finetune.py [--users 200] [--lr 1e-3 ...]`. Prints wall time, peak RSS,
samples/s, and NDCG@10 / Recall@10 / MRR@10 of base and adapter with paired differences and 95% CIs.
Target on the 2-core CPU: the quick run takes at most 5 minutes and lifts test NDCG@10 by 0.10 or more
with the confidence interval above zero. Timings are noisy when other processes share the cores.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from rerank_core.compare import compare_systems, comparison_table
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.loaders import load_dataset
from rerank_core.models import load_model
from rerank_core.training import TrainConfig, train_adapter, training_config, validation_users

TARGET_SECONDS = 300.0
TARGET_GAIN = 0.10


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def cpu_seconds() -> float:
    """CPU time of this process: with other jobs on the cores, wall time overstates an idle machine's."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def load_average() -> str:
    return " ".join(f"{value:.1f}" for value in os.getloadavg())


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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200, help="held-out test users (at least 200)")
    add_overrides(parser)
    args = parser.parse_args(argv)

    started = time.monotonic()
    dataset = load_dataset()
    loaded = load_model()
    config = config_from(args)
    print(f"dataset {dataset.name}: {len(dataset.users)} users, {len(dataset.items)} items; model {loaded.name} "
          f"({str(loaded.dtype).replace('torch.', '')} on {loaded.device}); load {time.monotonic() - started:.1f}s")
    print(f"config: {config.to_json()}")
    root = tempfile.mkdtemp(prefix="bench-adapters-")
    name = f"bench-{args.training_preset}"

    print(f"load average before the run: {load_average()} (on {os.cpu_count()} cores)")
    run_started, run_cpu = time.monotonic(), cpu_seconds()
    report = train_adapter(loaded, dataset, config, name, root=root, on_event=step_printer(),
                           training_preset=args.training_preset)
    run_seconds, run_cpu = time.monotonic() - run_started, cpu_seconds() - run_cpu
    run_load = load_average()

    users = test_users(dataset, args.users)
    settings = InspectSettings(preset=config.prompt_preset, strategy=config.strategy, split="test",
                               candidates=config.candidate_config(), max_prompt_tokens=config.max_prompt_tokens)
    eval_started = time.monotonic()
    inspector = Inspector(dataset, loaded, adapters_root=root, batch_size=8)
    _, summary = compare_systems(inspector, users, settings, ["base", name])
    eval_seconds = time.monotonic() - eval_started

    ndcg = summary[(summary.system == name) & (summary.metric == "NDCG@10")].iloc[0]
    print()
    print(f"quick fine-tune ({report.samples} samples, {report.steps} steps, preset {config.prompt_preset}, "
          f"{config.candidates} candidates)")
    print(f"  wall time (whole run: samples, validation, training, save): {run_seconds:.1f} s "
          f"(target <= {TARGET_SECONDS:.0f} s); {run_cpu:.0f} CPU s; load average after: {run_load}")
    print(f"  training loop: {report.train_time_s:.1f} s, {report.samples_per_s:.2f} samples/s")
    print(f"  final loss {report.final_loss:.3f}, letter loss {report.final_letter_loss:.3f} "
          f"vs ln(N) = {report.uniform_loss:.3f}")
    print(f"  validation ({config.eval_users} users) before {report.validation.get('before')}")
    print(f"  validation after {report.validation.get('after')}")
    print(f"  peak RSS {peak_rss_mb():.0f} MB; evaluation of {len(users)} test users x 2 systems "
          f"{eval_seconds:.1f} s")
    print()
    print(f"test split, {len(users)} users (difference vs base, 95% paired bootstrap CI):")
    print(comparison_table(summary))
    print()
    met_time = run_seconds <= TARGET_SECONDS
    met_gain = ndcg["difference"] >= TARGET_GAIN and ndcg["ci_low"] > 0
    print(f"target time <= {TARGET_SECONDS:.0f} s: {'met' if met_time else 'MISSED'} ({run_seconds:.0f} s)")
    print(f"target NDCG@10 gain >= {TARGET_GAIN} with CI above zero: {'met' if met_gain else 'MISSED'} "
          f"({ndcg['difference']:+.4f} [{ndcg['ci_low']:+.4f}, {ndcg['ci_high']:+.4f}])")
    return 0


if __name__ == "__main__":
    sys.exit(main())
