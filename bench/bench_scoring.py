"""Our scorer against the seed's way on the same prompts: speed, peak memory, and agreement.

Each way runs in its own process so peak RSS is its own. The seed's way: fp32, one prompt at a
time, full-vocabulary logits at every position. Ours: auto dtype (bf16 on AVX512-BF16 CPUs),
batches of 8 as the Inspector scores, logits at the last position only. The ways run in interleaved
rounds (bench/method.py). Each process also times a plain matmul in its own dtype (rerank_core.throughput),
so each way's speed is printed as a share of what this machine's matmuls reach: the prompts' from-scratch
FLOPs (linear layers and causal attention) per second over the probe's.
With `--dtype fp32` ours runs in fp32 too: what the path itself gains, where its letter probabilities are fp32's.
Usage: python bench/bench_scoring.py [--prompts N] [--rounds 3] [--dtype auto|fp32]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from method import (  # noqa: E402
    LoadWatch,
    Measurement,
    add_method_args,
    interleaved,
    median,
    print_ratio,
    print_summary,
    run_fresh,
)

HISTORY_ITEMS = 10
CANDIDATES = 20


def build_prompts(tokenizer, count: int) -> list[list[int]]:
    """The same prompts for both ways: bundled sample users with 10 history items and 20 candidates."""
    from rerank_core.candidates import CandidateConfig, CandidateSampler
    from rerank_core.data.dataset import UserSplit
    from rerank_core.data.loaders import load_dataset
    from rerank_core.prompts import build_prompt, encode_rendered, get_preset

    preset = get_preset("seed")
    dataset = load_dataset(None)
    sampler = CandidateSampler(dataset, CandidateConfig(count=CANDIDATES, seed=0))
    prompts = []
    for user in dataset.users:
        split = dataset.split_user(user, "test")
        if len(split.history) < HISTORY_ITEMS:
            continue
        split = UserSplit(user, "test", split.history[-HISTORY_ITEMS:], split.target)
        candidates = sampler.for_split(split)
        prompt = build_prompt(tokenizer, preset, [dataset.text(i) for i in split.history],
                              [dataset.text(i) for i in candidates.item_ids])
        prompts.append(encode_rendered(tokenizer, preset, prompt.rendered))
        if len(prompts) == count:
            break
    return prompts


def run_one(mode: str, count: int, batch_size: int, dtype: str) -> dict:
    import torch

    from rerank_core.models import load_model
    from rerank_core.prompts import get_preset, letters_for
    from rerank_core.scoring import score_token_ids
    from rerank_core.throughput import forward_shape, matmul_probe
    from rerank_core.verbalizer import resolve_letters

    loaded = load_model(None, dtype="fp32" if mode == "seed" else dtype)
    tokenizer = loaded.tokenizer
    prompts = build_prompts(tokenizer, count)
    letter_ids = [token.token_id for token in resolve_letters(tokenizer, get_preset("seed"), letters_for(CANDIDATES),
                                                                     "seed")]
    # One warm-up prompt so both ways are timed without first-call overheads.
    start = time.perf_counter()
    if mode == "seed":
        probabilities, letter_logits = [], []
        with torch.inference_mode():
            loaded.model(input_ids=torch.tensor([prompts[0]]))
            start = time.perf_counter()
            for ids in prompts:
                logits = loaded.model(input_ids=torch.tensor([ids])).logits  # every position, full vocab
                probabilities.append(torch.softmax(logits[0, -1, letter_ids], dim=-1).tolist())
                letter_logits.append(logits[0, -1, letter_ids].tolist())
    else:
        score_token_ids(loaded.model, tokenizer, prompts[:1], letter_ids)
        start = time.perf_counter()
        scores = score_token_ids(loaded.model, tokenizer, prompts, letter_ids, batch_size=batch_size)
        probabilities = [list(score.letter_probs) for score in scores]
        letter_logits = [list(score.letter_logits) for score in scores]
    seconds = time.perf_counter() - start
    probe = matmul_probe(loaded.dtype)
    return {
        "mode": mode, "dtype": str(loaded.dtype), "prompts": len(prompts), "seconds": seconds,
        "tokens": sum(len(ids) for ids in prompts), "probe_gflops": probe.gflops, "probe": probe.describe(),
        "flops": forward_shape(loaded.model).flops(len(ids) for ids in prompts),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "probabilities": probabilities, "letter_logits": letter_logits,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--prompts", type=int, default=30, help="prompts per way (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8,
                        help="our batch size (default %(default)s, the Inspector's: each forward pass streams all "
                             "the weights once, and a 32-token pass takes about 90 ms on the 2-core CPU; batches of "
                             "8 took 5.3 s where single prompts took 7.7 s in one process on 1 Dec 2026)")
    parser.add_argument("--dtype", choices=("auto", "fp32"), default="auto",
                        help="our dtype (default %(default)s: bf16 where the CPU has AVX512-BF16); the seed's is fp32")
    add_method_args(parser)
    parser.add_argument("--mode", choices=("seed", "ours"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.mode:
        print(json.dumps(run_one(args.mode, args.prompts, args.batch_size, args.dtype)))
        return

    def way(mode: str):
        def run() -> Measurement:
            result = run_fresh(__file__, ["--mode", mode, "--prompts", str(args.prompts),
                                          "--batch-size", str(args.batch_size), "--dtype", args.dtype])
            return Measurement(result["seconds"], result)
        return run

    def describe(measurement: Measurement) -> str:
        result = measurement.details
        gflops = result["flops"] / result["seconds"] / 1e9
        return (f"{result['dtype']:15s} prompt tokens/s {result['tokens'] / result['seconds']:6.0f}  "
                f"{gflops:4.0f} GFLOP/s = {gflops / result['probe_gflops']:4.0%} of the probe "
                f"({result['probe_gflops']:.0f})  peak RSS {result['peak_rss_mb']:.0f} MB")

    print(f"{args.prompts} prompts per way, {args.rounds} interleaved rounds, a fresh process per way and round")
    with LoadWatch() as watch:
        results = interleaved({"seed": way("seed"), "ours": way("ours")}, args.rounds, watch, describe=describe)
    print_summary(results)
    for mode, measurements in results.items():
        first = measurements[0].details
        print(f"{mode:5s} {first['dtype']:15s} median prompt tokens/s {first['tokens'] / median(measurements):.0f}  "
              f"mean prompt tokens {first['tokens'] / first['prompts']:.0f}  "
              f"peak RSS {statistics.median(m.details['peak_rss_mb'] for m in measurements):.0f} MB")
        probe = statistics.median(m.details["probe_gflops"] for m in measurements)
        gflops = first["flops"] / median(measurements) / 1e9
        print(f"{mode:5s} {first['probe']} (median of rounds {probe:.0f}); the prompts' forward passes "
              f"{gflops:.0f} GFLOP/s: {gflops / probe:.0%} of it (house target 85%)")
    pairs = [(seed.details, ours.details) for seed, ours in zip(results["seed"], results["ours"])]
    differences = [abs(a - b) for seed, ours in pairs
                   for seed_row, our_row in zip(seed["probabilities"], ours["probabilities"])
                   for a, b in zip(seed_row, our_row)]
    print(f"max letter probability difference: {max(differences):.4f} (mean {statistics.mean(differences):.5f})")
    # The max over every letter of every prompt moves by ~0.005 with any change of summation order; the logits'
    # RMS error is the steadier measure of how close the two ways compute (softmax ignores a prompt's common shift).
    errors = []
    for seed, ours in pairs:
        for seed_row, our_row in zip(seed["letter_logits"], ours["letter_logits"]):
            gaps = [b - a for a, b in zip(seed_row, our_row)]
            errors += [gap - statistics.mean(gaps) for gap in gaps]
    print(f"letter-logit error vs the seed's, each prompt's common shift removed: RMS "
          f"{statistics.fmean(error * error for error in errors) ** 0.5:.4f}")
    rss = {mode: statistics.median(m.details["peak_rss_mb"] for m in measurements)
           for mode, measurements in results.items()}
    print(f"peak_rss_ratio_vs_seed: {rss['ours'] / rss['seed']:.2f}")
    watch.report()
    print_ratio("speedup_vs_seed", results["seed"], results["ours"])


if __name__ == "__main__":
    main()
