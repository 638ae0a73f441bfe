"""Letter before (`A. title`) vs letter after (`- title (A)`): same seeds and budget, quick fine-tunes (issue 7).

Run: `PYTHONPATH=. python bench/bench_format.py [--users 200]`. For the `seed` and `seed_after` presets it
trains the quick preset with identical samples, candidates and seeds, then evaluates base and tuned on the
same held-out test users. Prints a markdown table: training time, the final letter loss (mean of the
last 10 steps) next to ln(N), and base vs tuned NDCG@10 / Recall@10 / MRR@10 with paired 95% CIs.
Timings are noisy when other processes share the 2 cores.
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_finetune import (
    add_overrides,
    config_from,
    cpu_seconds,
    load_average,
    peak_rss_mb,
    step_printer,
    test_users,
)

from rerank_core.compare import compare_systems
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.loaders import load_dataset
from rerank_core.models import load_model
from rerank_core.prompts import get_preset
from rerank_core.training import train_adapter

PRESETS = ("seed", "seed_after")
METRICS = ("NDCG@10", "Recall@10", "MRR@10")
LAST_STEPS = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200, help="held-out test users (at least 200)")
    add_overrides(parser)
    args = parser.parse_args(argv)

    dataset = load_dataset()
    loaded = load_model()
    root = tempfile.mkdtemp(prefix="bench-format-")
    print(f"dataset {dataset.name}: {len(dataset.users)} users; model {loaded.name} "
          f"({str(loaded.dtype).replace('torch.', '')} on {loaded.device})")
    runs = {}
    for preset in PRESETS:
        config = config_from(args, prompt_preset=preset)
        print(f"training {preset}: {config.to_json()}", flush=True)
        events: list[dict] = []
        printer = step_printer()

        def on_event(event: dict, events: list[dict] = events, printer=printer) -> None:
            events.append(event)
            printer(event)

        started, cpu = time.monotonic(), cpu_seconds()
        report = train_adapter(loaded, dataset, config, f"format-{preset}", root=root, on_event=on_event,
                               training_preset=args.training_preset)
        letter_losses = [event["letter_loss"] for event in events if event["event"] == "step"]
        runs[preset] = {"config": config, "report": report, "seconds": time.monotonic() - started,
                        "cpu": cpu_seconds() - cpu, "load": load_average(),
                        "letter_loss": sum(letter_losses[-LAST_STEPS:]) / len(letter_losses[-LAST_STEPS:])}

    users = test_users(dataset, args.users)
    inspector = Inspector(dataset, loaded, adapters_root=root, batch_size=8)
    for preset, run in runs.items():
        config = run["config"]
        settings = InspectSettings(preset=preset, strategy=config.strategy, split="test",
                                   candidates=config.candidate_config(), max_prompt_tokens=config.max_prompt_tokens)
        _, run["summary"] = compare_systems(inspector, users, settings, ["base", f"format-{preset}"])

    print()
    print(f"{len(users)} held-out test users, {runs['seed']['config'].candidates} candidates, "
          f"{runs['seed']['report'].samples} training samples per run; peak RSS {peak_rss_mb():.0f} MB")
    print()
    header = ["preset", "candidate line", "run time (CPU s; load after)",
              f"letter loss (last {LAST_STEPS} steps)", "ln N"]
    header += [f"{metric} base → tuned (Δ [95% CI])" for metric in METRICS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for preset, run in runs.items():
        report, summary = run["report"], run["summary"]
        tuned = summary[summary.system == f"format-{preset}"].set_index("metric")
        cells = [preset, f"`{get_preset(preset).candidate_line.format(letter='A', text='title')}`",
                 f"{run['seconds']:.0f} s ({run['cpu']:.0f}; {run['load']})", f"{run['letter_loss']:.3f}",
                 f"{math.log(run['config'].candidates):.3f}"]
        for metric in METRICS:
            row = tuned.loc[metric]
            cells.append(f"{row['reference_mean']:.3f} → {row['mean']:.3f} "
                         f"({row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}])")
        print("| " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
