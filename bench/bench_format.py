"""Letter before (`A. title`) vs letter after (`- title (A)`): same seeds and budget, quick fine-tunes (issue 7).

Run: `PYTHONPATH=. python bench/bench_format.py [--rounds 1] [--users 200]`. For the `seed` and `seed_after`
presets it trains the quick preset with identical samples, candidates and seeds (the two ways, interleaved
rounds, a fresh process per run: bench/method.py), then evaluates round 1's adapters against the base on the same
held-out test users. Prints a markdown table: run time, the final letter loss (mean of the last 10 steps) next
to ln(N), and base vs tuned NDCG@10 / Recall@10 / MRR@10 with paired 95% CIs. The default is ONE round (two
3-minute runs and the evaluation); the quality figures are deterministic, a published run time needs --rounds 3.
"""

from __future__ import annotations

import argparse
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_finetune import (
    LAST_STEPS,
    add_overrides,
    config_from,
    test_users,
    training_rounds,
)
from method import LoadWatch, add_method_args, print_ratio, print_summary

from rerank_core.compare import compare_systems
from rerank_core.data.loaders import load_dataset
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.models import load_model
from rerank_core.prompts import get_preset

PRESETS = ("seed", "seed_after")
METRICS = ("NDCG@10", "Recall@10", "MRR@10")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=200, help="held-out test users (at least 200)")
    add_overrides(parser)
    add_method_args(parser, rounds=1)
    args = parser.parse_args(argv)

    dataset = load_dataset()
    loaded = load_model()
    root = tempfile.mkdtemp(prefix="bench-format-")
    print(f"dataset {dataset.name}: {len(dataset.users)} users; model {loaded.name} "
          f"({str(loaded.dtype).replace('torch.', '')} on {loaded.device})")
    with LoadWatch() as watch:
        results = training_rounds(args, {preset: [f"--prompt-preset={preset}"] for preset in PRESETS}, root, watch)

    users = test_users(dataset, args.users)
    inspector = Inspector(dataset, loaded, adapters_root=root, batch_size=8)
    summaries = {}
    for preset in PRESETS:
        config = config_from(args, preset=preset)
        settings = InspectSettings(preset=config.prompt_preset, strategy=config.strategy, split="test",
                                   candidates=config.candidate_config(), max_prompt_tokens=config.max_prompt_tokens)
        _, summaries[preset] = compare_systems(inspector, users, settings, ["base", f"{preset}-1"])

    first = results[PRESETS[0]][0].details
    print()
    print(f"{len(users)} held-out test users, {first['config']['candidates']} candidates, "
          f"{first['report']['samples']} training samples per run")
    print()
    header = ["preset", "candidate line", "run time (median of rounds)",
              f"letter loss (last {LAST_STEPS} steps)", "ln N"]
    header += [f"{metric} base → tuned (Δ [95% CI])" for metric in METRICS]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for preset in PRESETS:
        run, summary = results[preset][0].details, summaries[preset]
        tuned = summary[summary.system == f"{preset}-1"].set_index("metric")
        cells = [preset, f"`{get_preset(preset).candidate_line.format(letter='A', text='title')}`",
                 f"{statistics.median(m.value for m in results[preset]):.0f} s", f"{run['letter_loss_last']:.3f}",
                 f"{math.log(run['config']['candidates']):.3f}"]
        for metric in METRICS:
            row = tuned.loc[metric]
            cells.append(f"{row['reference_mean']:.3f} → {row['mean']:.3f} "
                         f"({row['difference']:+.3f} [{row['ci_low']:+.3f}, {row['ci_high']:+.3f}])")
        print("| " + " | ".join(cells) + " |")
    print()
    print_summary(results)
    watch.report()
    print_ratio("run_time_seed_after_over_seed", results["seed_after"], results["seed"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
