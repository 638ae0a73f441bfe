"""Where one scoring forward pass spends its time, against a plain matmul in the same process and dtype.

The pass is the Inspector's (rerank_core.scoring on one prompt: auto dtype, mixed precision, last position only)
on a bundled-sample prompt (~306 tokens, bench_scoring's) and, with --long, a MovieLens-length one (~1,500
tokens, the sample prompt repeated). Each is timed plainly (median of --rounds), then once under torch.profiler;
the profiler's per-operator self time is sorted into linear layers (matmuls), attention (SDPA), and the rest
(norms, rotary, SiLU, additions, copies), each printed with its share of the pass and, for linear layers and
attention, its GFLOP/s and share of the probe.
Usage: PYTHONPATH=. python bench/bench_forward.py [--rounds 5] [--long]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import torch  # noqa: E402
from bench_scoring import CANDIDATES, build_prompts  # noqa: E402
from method import LoadWatch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from rerank_core.models import load_model  # noqa: E402
from rerank_core.prompts import get_preset, letters_for  # noqa: E402
from rerank_core.scoring import score_token_ids  # noqa: E402
from rerank_core.throughput import ForwardShape, forward_shape, matmul_probe  # noqa: E402
from rerank_core.verbalizer import resolve_letters  # noqa: E402

LINEAR_OPS = ("mkldnn::_linear_pointwise", "aten::mm", "aten::addmm", "aten::bmm", "aten::_mkldnn_linear")
ATTENTION_OPS = ("scaled_dot_product",)


def category(op_name: str) -> str:
    """linear, attention or other, by the operator's name."""
    if any(op_name.startswith(name) for name in LINEAR_OPS):
        return "linear layers"
    if any(name in op_name for name in ATTENTION_OPS):
        return "attention"
    return "norms, rotary, SiLU, copies, other"


def breakdown(score, tokens: int, shape: ForwardShape, probe_gflops: float, rounds: int) -> None:
    """Time the pass, profile it once, and print the split."""
    score()
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        score()
        seconds.append(time.perf_counter() - start)
    wall = statistics.median(seconds)
    with profile(activities=[ProfilerActivity.CPU]) as profiled:
        score()
    by_category: dict[str, float] = defaultdict(float)
    for event in profiled.key_averages():
        by_category[category(event.key)] += event.self_cpu_time_total / 1e6
    profiled_total = sum(by_category.values())
    flops = {"linear layers": shape.linear_flops(tokens), "attention": shape.attention_flops(tokens)}
    total_gflops = sum(flops.values()) / wall / 1e9
    print(f"\n{tokens}-token prompt: forward pass median {wall * 1000:.1f} ms over {rounds} (spread "
          f"{min(seconds) * 1000:.1f}..{max(seconds) * 1000:.1f}); {total_gflops:.0f} GFLOP/s = "
          f"{total_gflops / probe_gflops:.0%} of the probe; at the probe's speed it would take "
          f"{sum(flops.values()) / probe_gflops / 1e9 * 1000:.1f} ms")
    print(f"  under the profiler {profiled_total * 1000:.1f} ms in operators:")
    for name in ("linear layers", "attention", "norms, rotary, SiLU, copies, other"):
        spent = by_category[name]
        line = f"    {name:36s} {spent * 1000:7.1f} ms  {spent / profiled_total:5.1%} of the pass"
        if name in flops and spent > 0:
            rate = flops[name] / spent / 1e9
            line += f"  {flops[name] / 1e9:6.1f} GFLOP at {rate:4.0f} GFLOP/s = {rate / probe_gflops:4.0%} of the probe"
        print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed passes per prompt (default %(default)s)")
    parser.add_argument("--long", action="store_true", help="also a ~1,500-token prompt (real MovieLens length)")
    args = parser.parse_args()
    loaded = load_model(None, dtype="auto")
    tokenizer = loaded.tokenizer
    prompt = build_prompts(tokenizer, 1)[0]
    letter_ids = [token.token_id for token in
                  resolve_letters(tokenizer, get_preset("seed"), letters_for(CANDIDATES), "seed")]
    shape = forward_shape(loaded.model)
    prompts = [prompt]
    if args.long:
        prompts.append((prompt * 5)[:1500])
    with LoadWatch() as watch:
        probe = matmul_probe(loaded.dtype)
        print(f"{loaded.name} in {str(loaded.dtype).replace('torch.', '')}, {torch.get_num_threads()} threads; "
              f"{probe.describe()}; linear weights {shape.linear_params / 1e6:.1f}M, "
              f"{shape.layers} layers of attention width {shape.attention_width}")
        for ids in prompts:
            breakdown(lambda ids=ids: score_token_ids(loaded.model, tokenizer, [ids], letter_ids),
                      len(ids), shape, probe.gflops, args.rounds)
    watch.report()


if __name__ == "__main__":
    main()
