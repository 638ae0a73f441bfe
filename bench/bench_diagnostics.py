"""The cost of a full position-bias run with the default model on the bundled sample data.

Prints wall time and forward passes per second for 20 rotations of one user (all rotations in one
batch, in batches of 5, and one prompt at a time) and for 20 rotations of each of N users (one batch
per user), with the bias figures the run finds. Each timing starts from an empty score cache.
Usage: python bench/bench_diagnostics.py [--users 50 (0: one user only)] [--dtype auto] [--device auto]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from rerank_core.candidates import CandidateConfig  # noqa: E402
from rerank_core.diagnostics import position_bias, position_bias_over_users  # noqa: E402
from rerank_core.inspector import Inspector, InspectSettings  # noqa: E402
from rerank_core.loaders import load_dataset  # noqa: E402
from rerank_core.models import load_model  # noqa: E402
from rerank_core.scoring import ScoreCache  # noqa: E402

CANDIDATES = 20


def timed_user(inspector: Inspector, user: str, settings: InspectSettings, batch_size: int | None):
    inspector.cache = ScoreCache()
    start = time.perf_counter()
    result = position_bias(inspector, user, settings, batch_size=batch_size)
    return result, time.perf_counter() - start


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=50,
                        help="users for the many-user run (default 50; 0 skips it)")
    parser.add_argument("--preset", default="seed")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()

    dataset = load_dataset(None)
    loaded = load_model(None, dtype=args.dtype, device=args.device)
    inspector = Inspector(dataset, loaded)
    settings = InspectSettings(preset=args.preset, candidates=CandidateConfig(count=CANDIDATES, seed=0))
    user = dataset.users[0]
    inspector.inspect(user, settings)  # warm-up: first-call overheads out of the timings
    prompt_tokens = len(inspector.prepare(user, settings).token_ids)
    print(f"model {loaded.name} ({loaded.dtype}, {loaded.device}), data {dataset.name}, preset {args.preset}, "
          f"{CANDIDATES} candidates, user {user}: {prompt_tokens} prompt tokens")

    print(f"\n1 user x {CANDIDATES} rotations")
    runs = {}
    for label, batch_size in (("one batch of 20", None), ("batches of 8", 8), ("batches of 5", 5),
                              ("one at a time", 1)):
        result, seconds = timed_user(inspector, user, settings, batch_size)
        runs[label] = (result, seconds)
        passes = len(result.orders)
        print(f"  {label:16s} {seconds:7.2f} s  {passes / seconds:6.2f} passes/s")
    batched, batched_seconds = runs["one batch of 20"]
    single, single_seconds = runs["one at a time"]
    difference = float(abs(batched.position_probs - single.position_probs).max())
    print(f"  batched vs one at a time: {single_seconds / batched_seconds:.2f}x faster; "
          f"largest probability difference {difference:.2e}")
    print(f"  letter A mean probability {batched.letter_means[0]:.3f} (uniform {batched.uniform:.3f}); "
          f"stability (mean Kendall tau) {batched.stability:.3f}; truth ranks by rotation "
          f"{batched.truth_ranks}")

    if args.users <= 0:
        return 0
    users = dataset.users[:args.users]
    print(f"\n{len(users)} users x {CANDIDATES} rotations (one batch per user)")
    inspector.cache = ScoreCache()
    start = time.perf_counter()
    summary = position_bias_over_users(inspector, users, settings)
    seconds = time.perf_counter() - start
    passes = len(users) * CANDIDATES
    print(f"  {seconds:7.1f} s  {passes} passes  {passes / seconds:6.2f} passes/s  "
          f"{seconds / len(users):.2f} s/user")
    metrics = summary.metrics()
    difference = summary.debiased_difference()
    print("  mass by letter: " + " ".join(
        f"{letter}:{mass:.3f}" for letter, mass in zip(summary.letters, summary.mass_by_letter, strict=True)))
    print(f"  top-1 is letter A in {summary.top1_a_rate:.1%} of prompts (uniform {summary.uniform:.1%}); "
          f"mean stability {summary.mean_stability:.3f}")
    print(f"  NDCG@10 as shown {metrics['original']['NDCG@10']:.3f}, debiased {metrics['debiased']['NDCG@10']:.3f} "
          f"({difference.difference:+.3f}, 95% CI {difference.low:+.3f} .. {difference.high:+.3f}), "
          f"mean over orders {metrics['over_orders']['NDCG@10']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
