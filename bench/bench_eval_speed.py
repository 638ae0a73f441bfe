"""`eval` on real MovieLens 100K in this tree against another tree (an earlier commit): users/s and equal results.

Issue 24 asks for eval at least 2x the users/s of the code before its changes at equal results (per-user ranks
identical, or the truth's probability within 0.01 where batching changes padding). Both trees run the same
command, `python -m rerank_core eval --baselines none`, on the same users, each round in a fresh process
(interleaved rounds, bench/method.py); the model load is timed apart from the scoring by a run on 1 user.
Two bf16 trees round differently (a changed summation order alone moves letter probabilities by ~0.01), so the
results are also compared with both trees in fp32 (`--dtype fp32`), where only what the trees compute differs.
Make the other tree with `git worktree add /tmp/before <commit>` or `git archive <commit> | tar -x -C /tmp/before`
(it runs with this venv).
Usage: PYTHONPATH=. python bench/bench_eval_speed.py --before /tmp/before [--users 60] [--rounds 3]
"""

from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))

from method import LoadWatch, Measurement, add_method_args, interleaved, print_ratio, print_summary  # noqa: E402

# Largest difference of the truth's probability that still counts as the same result (issue 24, item 3).
SAME_PROBABILITY = 0.01


def run_eval(tree: Path, users: int, data: str, dtype: str = "auto") -> tuple[float, dict[str, tuple[str, float]]]:
    """Wall seconds of one eval in `tree` and its per-user (rank, truth probability)."""
    with tempfile.TemporaryDirectory() as out:
        command = [sys.executable, "-m", "rerank_core", "eval", "--data", data, "--users", str(users),
                   "--baselines", "none", "--output-dir", out, "--format", "json", "--dtype", dtype]
        start = time.perf_counter()
        completed = subprocess.run(command, cwd=tree, capture_output=True, text=True,
                                   env={**os.environ, "PYTHONPATH": str(tree)})
        seconds = time.perf_counter() - start
        if completed.returncode != 0:
            raise SystemExit(f"eval in {tree} failed ({completed.returncode}):\n{completed.stderr[-3000:]}")
        with open(Path(out) / "per_user.csv", newline="") as handle:
            rows = {row["user_id"]: (row["rank"], float(row["truth_probability"] or "nan"))
                    for row in csv.DictReader(handle) if row["system"] == "base"}
    return seconds, rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--before", type=Path, required=True, help="the other tree (git worktree of a commit)")
    parser.add_argument("--users", type=int, default=60, help="first N users of the dataset (default %(default)s)")
    parser.add_argument("--data", default="ml-100k-real")
    add_method_args(parser)
    args = parser.parse_args()
    trees = {"before": args.before.resolve(), "now": ROOT}
    rows: dict[str, dict[str, tuple[str, float]]] = {}

    def way(name: str):
        def measure() -> Measurement:
            load_only, _ = run_eval(trees[name], 1, args.data)
            seconds, rows[name] = run_eval(trees[name], args.users, args.data)
            scoring = max(seconds - load_only, 1e-9)  # the 1-user run holds the start-up and model load
            return Measurement(args.users / scoring, {"wall": seconds, "start": load_only})
        return measure

    with LoadWatch() as watch:
        results = interleaved({name: way(name) for name in trees}, args.rounds, watch, unit="users/s",
                              describe=lambda m: f"wall {m.details['wall']:.1f} s, start-up {m.details['start']:.1f} s")
    print_summary(results, unit="users/s")
    watch.report()
    print_ratio("users/s now vs before", results["now"], results["before"])
    print_agreement("timed runs (auto dtype)", rows["before"], rows["now"])
    fp32 = {name: run_eval(tree, args.users, args.data, "fp32")[1] for name, tree in trees.items()}
    print_agreement("both trees in fp32 (untimed)", fp32["before"], fp32["now"])


def print_agreement(label: str, before: dict[str, tuple[str, float]], now: dict[str, tuple[str, float]]) -> None:
    """How many users keep the truth's rank, and the largest change of its probability."""
    same_rank = sum(before[user][0] == now[user][0] for user in before)
    difference = max(abs(before[user][1] - now[user][1]) for user in before)
    print(f"{label}: per-user rank of the truth identical for {same_rank}/{len(before)} users; largest difference "
          f"of the truth's probability {difference:.4f} (equal results: ranks identical or <= {SAME_PROBABILITY})")


if __name__ == "__main__":
    main()
