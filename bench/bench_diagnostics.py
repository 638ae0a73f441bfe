"""The cost of a full position-bias run with the default model (on the bundled sample data unless --data).

20 rotations of one user scored from scratch and with the shared prefix (system prompt, instruction,
history) run once, the ways in interleaved rounds (bench/method.py), each timing from an empty score
cache. The bf16 fast path attends to the prefix itself (mixed_precision._attention_after_prefix); a third
way passes the prefix in a cache, as every other path does, to show what that gives. Then, with --users N,
20 rotations of each of N users once (one batch per user; about 20 s per user on the 2-core CPU, so it is
off by default), with the bias figures the run finds.
Usage: python bench/bench_diagnostics.py [--rounds 3] [--batch-size N] [--users 0] [--dtype auto]
       [--data ml-100k-real --user-index 0]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

sys.path.insert(0, str(ROOT / "bench"))

from method import (  # noqa: E402
    LoadWatch,
    Measurement,
    add_method_args,
    interleaved,
    print_ratio,
    print_summary,
)

import rerank_core.mixed_precision as mixed_precision  # noqa: E402
from rerank_core.candidates import CandidateConfig  # noqa: E402
from rerank_core.data.loaders import load_dataset  # noqa: E402
from rerank_core.diagnostics import position_bias, position_bias_over_users  # noqa: E402
from rerank_core.diagnostics.position import OrderSpec, candidate_orders  # noqa: E402
from rerank_core.inspector import Inspector, InspectSettings  # noqa: E402
from rerank_core.models import load_model  # noqa: E402
from rerank_core.prompts import get_preset  # noqa: E402
from rerank_core.scoring import ScoreCache, common_prefix_length  # noqa: E402

CANDIDATES = 20


def timed_user(inspector: Inspector, user: str, settings: InspectSettings, batch_size: int | None,
               share_prefix: bool) -> Measurement:
    inspector.cache = ScoreCache()
    inspector.share_prefix = share_prefix
    start = time.perf_counter()
    result = position_bias(inspector, user, settings, batch_size=batch_size)
    return Measurement(time.perf_counter() - start, {"result": result})


@contextmanager
def prefix_in_a_cache() -> Iterator[None]:
    """The fast path leaves the prefix to a cache, as every other path does."""
    attends = mixed_precision._fast_attention_everywhere
    mixed_precision._fast_attention_everywhere = lambda *args: False
    try:
        yield
    finally:
        mixed_precision._fast_attention_everywhere = attends


def through_a_cache(inspector: Inspector, user: str, settings: InspectSettings, batch_size: int | None) -> Measurement:
    with prefix_in_a_cache():
        return timed_user(inspector, user, settings, batch_size, True)


def prefix_bound(inspector: Inspector, user: str, settings: InspectSettings) -> str:
    """The speedup prefix reuse could reach if time were proportional to tokens run: what these prompts allow."""
    prepared = inspector.prepare(user, settings)
    prompts = [inspector.variant(prepared, settings, order=order).token_ids
               for order in candidate_orders(CANDIDATES, OrderSpec())]
    shared = common_prefix_length(prompts)
    total = sum(len(ids) for ids in prompts)
    bound = total / (shared + total - shared * len(prompts))
    return (f"rotations share a {shared}-token prefix of {len(prompts[0])}: token-count bound on the speedup "
            f"{bound:.2f} ({len(prompts)} x {len(prompts[0])} tokens from scratch, {shared} + {len(prompts)} x "
            f"{len(prompts[0]) - shared} with reuse)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--users", type=int, default=0,
                        help="users for the many-user run, measured once (default 0: skipped)")
    parser.add_argument("--preset", default="seed", type=get_preset, help="prompt preset name (default: seed)")
    parser.add_argument("--batch-size", type=int, help="prompts per forward pass (default: all 20 rotations in one)")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--data", help="dataset (default: the bundled sample), e.g. ml-100k-real")
    parser.add_argument("--user-index", type=int, default=0, help="which of its users (default %(default)s)")
    add_method_args(parser)
    args = parser.parse_args()

    dataset = load_dataset(args.data)
    loaded = load_model(None, dtype=args.dtype, device=args.device)
    inspector = Inspector(dataset, loaded)
    settings = InspectSettings(preset=args.preset, candidates=CandidateConfig(count=CANDIDATES, seed=0))
    user = dataset.users[args.user_index]
    inspector.inspect(user, settings)  # warm-up: first-call overheads out of the timings
    prompt_tokens = len(inspector.prepare(user, settings).token_ids)
    print(f"model {loaded.name} ({loaded.dtype}, {loaded.device}), data {dataset.name}, preset {args.preset.name}, "
          f"{CANDIDATES} candidates, user {user}: {prompt_tokens} prompt tokens")

    print(prefix_bound(inspector, user, settings))

    print(f"\n1 user x {CANDIDATES} rotations, {args.rounds} interleaved rounds")
    ways = {"from scratch": lambda: timed_user(inspector, user, settings, args.batch_size, False),
            "prefix reuse": lambda: timed_user(inspector, user, settings, args.batch_size, True),
            "prefix via a cache": lambda: through_a_cache(inspector, user, settings, args.batch_size)}
    # Each way once before the rounds: oneDNN builds its kernels for each new batch shape and the allocator grows
    # on first use (a quiet run without this gave 4.26, 3.61, 2.52 s from scratch over rounds 1-3).
    warm = {name: way().value for name, way in ways.items()}
    print("warm-up (not counted): " + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in warm.items()))
    with LoadWatch() as watch:
        runs = interleaved(ways, args.rounds, watch,
                           describe=lambda m: f"{CANDIDATES / m.value:6.2f} passes/s")
        scratch = runs["from scratch"][0].details["result"]
        batched = runs["prefix reuse"][0].details["result"]
        difference = float(abs(batched.position_probs - scratch.position_probs).max())
        print(f"largest letter-probability difference between the ways ({loaded.dtype}): {difference:.2e}")
        print(f"letter A mean probability {batched.letter_means[0]:.3f} (uniform {batched.uniform:.3f}); "
              f"stability (mean Kendall tau) {batched.stability:.3f}; truth ranks by rotation "
              f"{batched.truth_ranks}")
        if args.users > 0:
            many_users(inspector, dataset.users[:args.users], settings)
    print_summary(runs)
    watch.report()
    print_ratio("prefix attended apart vs via a cache (the same way where the fast path leaves the prefix to a cache: "
                "other paths, shorter prefixes)", runs["prefix via a cache"], runs["prefix reuse"])
    print_ratio("prefix_reuse_speedup", runs["from scratch"], runs["prefix reuse"])
    return 0


def many_users(inspector: Inspector, users: list[str], settings: InspectSettings) -> None:
    """One pass over many users: what a full position-bias study costs, and what it finds."""
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


if __name__ == "__main__":
    sys.exit(main())
