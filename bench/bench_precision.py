"""Which bf16 rounding decides the letter-probability gap to fp32, and what the fp32 reference itself varies by.

Issue 24 asks for letter probabilities within 0.01 of fp32 and for the numeric choice that decides the gap. The
fast path (rerank_core.mixed_precision) rounds to bf16 at ten places; this script runs the fp32 model with each
rounding simulated alone (`x.bfloat16().float()` in a hook) on bench_scoring's prompts, then all of them together,
which should reproduce the real bf16 path's error, printed beside them. Each line gives the largest gap of a
letter's probability to the fp32 reference, the mean gap, and the RMS error of the letter logits with each
prompt's common shift removed (softmax ignores it). The RMS adds up roughly in squares across roundings; the
largest gap is one draw from 600 and moves with any change of summation order. A last section shows where the
error comes from (the layers' weights apart from the embeddings', each half of the layers alone) and what removing
the largest roundings would buy.
This is a measurement of numbers, not of speed: load on the machine does not change it.
Usage: PYTHONPATH=. python bench/bench_precision.py [--prompts 30]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from collections.abc import Collection, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from bench_scoring import CANDIDATES, build_prompts  # noqa: E402

# Where the fast path rounds to bf16, in the order a layer computes.
ROUNDINGS = {
    "weights": "all weights in bf16 (embeddings, head)",
    "norm": "RMSNorm output (projections' input)",
    "qk": "q and k as their matmul writes them",
    "v": "v as its matmul writes it (attention's input)",
    "rotary": "q and k after the fp32 rotary",
    "probabilities": "attention probabilities (flash kernel)",
    "attention_out": "attention output (o_proj's input)",
    "sublayer_out": "o_proj, down_proj output (to the residual)",
    "gate": "SiLU(gate) as the fused matmul writes it",
    "mlp_product": "SiLU(gate) * up (down_proj's input)",
}

# The roundings a path whose matmuls take bf16 inputs and whose attention runs in bf16 cannot avoid; the others
# (qk, sublayer_out, gate) are matmul outputs that only a matmul writing fp32 would keep.
UNAVOIDABLE = {"weights", "norm", "v", "rotary", "probabilities", "attention_out", "mlp_product"}

# Roundings a faster path might remove (the largest first: q and k, then the matmul outputs, then the weights), to
# see how far the logits' RMS error must fall before the largest gap stays under 0.01.
WHAT_IF = ({"qk", "rotary"}, {"qk", "rotary", "sublayer_out"}, {"qk", "rotary", "sublayer_out", "gate"},
           {"qk", "rotary", "sublayer_out", "gate", "weights"})

Scores = tuple[list[tuple[float, ...]], list[tuple[float, ...]]]


def _bf16(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to(torch.bfloat16).to(tensor.dtype)


def _attention(rounded: set[str], layers: Collection[int] | None = None):
    """Causal attention in fp32 that rounds its inputs and probabilities where the flash kernel does in bf16 (in
    `layers` only, when given)."""
    def attend(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        here = rounded if layers is None or module.layer_idx in layers else set()
        if "rotary" in here:
            query, key = _bf16(query), _bf16(key)
        groups = query.shape[1] // key.shape[1]
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = (query @ key.transpose(-1, -2)) * scaling
        queries, keys = scores.shape[-2:]
        visible = torch.ones(queries, keys, dtype=torch.bool).tril(keys - queries)
        scores = scores.masked_fill(~visible, float("-inf"))
        if attention_mask is not None:
            scores = (scores.masked_fill(~attention_mask, float("-inf")) if attention_mask.dtype == torch.bool
                      else scores + attention_mask)
        weights = torch.exp(scores - scores.amax(-1, keepdim=True))
        total = weights.sum(-1, keepdim=True)  # the kernel sums before it rounds
        if "probabilities" in here:
            weights = _bf16(weights)
        return ((weights @ value) / total).transpose(1, 2).contiguous(), None
    return attend


@contextmanager
def simulated(model, rounded: set[str], layers: Collection[int] | None = None) -> Iterator[None]:
    """The fp32 `model` rounding to bf16 where `rounded` names, its weights and attention restored afterwards; with
    `layers` (decoder layer indices), only in those layers (their weights, not the embeddings)."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    unknown = rounded - set(ROUNDINGS)
    if unknown:
        raise ValueError(f"unknown rounding(s) {sorted(unknown)}: choose from {', '.join(ROUNDINGS)}")
    mapping = ALL_ATTENTION_FUNCTIONS._global_mapping
    original_attention = mapping["sdpa"]
    with torch.no_grad(), ExitStack() as stack:
        chosen = [layer for index, layer in enumerate(model.model.layers) if layers is None or index in layers]
        if "weights" in rounded:  # a copy kept to restore: only then (the 135M model's is 540 MB)
            parameters = list(model.parameters() if layers is None else
                              (parameter for layer in chosen for parameter in layer.parameters()))
            saved = [parameter.detach().clone() for parameter in parameters]
            for parameter in parameters:
                parameter.copy_(_bf16(parameter))
            stack.callback(lambda: [parameter.copy_(copy) for parameter, copy in zip(parameters, saved)])
        mapping["sdpa"] = _attention(rounded, layers)
        stack.callback(mapping.__setitem__, "sdpa", original_attention)
        outputs = {"norm": lambda layer: [layer.input_layernorm, layer.post_attention_layernorm],
                   "qk": lambda layer: [layer.self_attn.q_proj, layer.self_attn.k_proj],
                   "v": lambda layer: [layer.self_attn.v_proj],
                   "sublayer_out": lambda layer: [layer.self_attn.o_proj, layer.mlp.down_proj],
                   "gate": lambda layer: [layer.mlp.act_fn]}
        inputs = {"attention_out": lambda layer: [layer.self_attn.o_proj],
                  "mlp_product": lambda layer: [layer.mlp.down_proj]}
        for layer in chosen:
            for name, modules in outputs.items():
                for module in modules(layer) if name in rounded else []:
                    stack.callback(module.register_forward_hook(lambda _m, _i, output: _bf16(output)).remove)
            for name, modules in inputs.items():
                for module in modules(layer) if name in rounded else []:
                    stack.callback(module.register_forward_pre_hook(lambda _m, args: (_bf16(args[0]),)).remove)
        yield


def score(model, tokenizer, prompts, letter_ids, batch_size: int = 8) -> Scores:
    from rerank_core.scoring import score_token_ids

    scores = score_token_ids(model, tokenizer, prompts, letter_ids, batch_size=batch_size, share_prefix=False)
    return [item.letter_probs for item in scores], [item.letter_logits for item in scores]


def gaps(reference: Scores, other: Scores) -> tuple[float, float, float]:
    """Largest and mean letter-probability gap, and the letter logits' RMS error without each prompt's shift."""
    differences = [abs(a - b) for ref_row, row in zip(reference[0], other[0]) for a, b in zip(ref_row, row)]
    errors = []
    for ref_row, row in zip(reference[1], other[1]):
        shifts = [b - a for a, b in zip(ref_row, row)]
        errors += [shift - statistics.fmean(shifts) for shift in shifts]
    return max(differences), statistics.fmean(differences), statistics.fmean(e * e for e in errors) ** 0.5


def _figure(value: float) -> str:
    return f"{value:.4f}" if value >= 1e-4 else f"{value:.0e}".ljust(6)


def _cpu() -> str:
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "CPU")
    return f"{name}, {'with' if 'avx512_bf16' in info else 'without'} AVX512-BF16"


def main() -> None:
    from rerank_core.models import load_model
    from rerank_core.prompts import get_preset, letters_for
    from rerank_core.verbalizer import resolve_letters

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=30, help="bench_scoring's prompts (default %(default)s)")
    args = parser.parse_args()
    fp32 = load_model(None, dtype="fp32")
    tokenizer = fp32.tokenizer
    prompts = build_prompts(tokenizer, args.prompts)
    letter_ids = [token.token_id for token in resolve_letters(tokenizer, get_preset("seed"), letters_for(CANDIDATES),
                                                                     "seed")]
    print(f"{_cpu()}; {len(prompts)} prompts, {statistics.fmean(map(len, prompts)):.0f} tokens on average, "
          f"{CANDIDATES} letters each; reference: fp32, PyTorch's attention, batches of 8")
    reference = score(fp32.model, tokenizer, prompts, letter_ids)

    def line(label: str, scores: Scores) -> None:
        largest, mean, rms = gaps(reference, scores)
        print(f"  {label:60s} max {_figure(largest)}  mean {_figure(mean)}  logit RMS {_figure(rms)}", flush=True)

    print("what the fp32 reference itself varies by:")
    line("fp32, batches of 1", score(fp32.model, tokenizer, prompts, letter_ids, batch_size=1))
    with simulated(fp32.model, set()):
        line("fp32, this script's attention (no rounding)", score(fp32.model, tokenizer, prompts, letter_ids))
    print("one rounding alone (fp32 model, rounded where the fast path rounds):")
    for name, where in ROUNDINGS.items():
        with simulated(fp32.model, {name}):
            line(f"{name}: {where}", score(fp32.model, tokenizer, prompts, letter_ids))
    with simulated(fp32.model, set(ROUNDINGS)):
        line(f"all {len(ROUNDINGS)} together", score(fp32.model, tokenizer, prompts, letter_ids))
    with simulated(fp32.model, set(ROUNDINGS) - {"weights"}):
        line("all but the weights", score(fp32.model, tokenizer, prompts, letter_ids))
    with simulated(fp32.model, UNAVOIDABLE):
        line("those bf16 matmul inputs and attention cannot avoid", score(fp32.model, tokenizer, prompts, letter_ids))
    print("where the error comes from, and what removing roundings would buy:")
    layer_count = len(fp32.model.model.layers)
    with simulated(fp32.model, {"weights"}, range(layer_count)):
        line("weights of the decoder layers only (not embeddings, head)",
             score(fp32.model, tokenizer, prompts, letter_ids))
    for name, half in (("first", range(layer_count // 2)), ("second", range(layer_count // 2, layer_count))):
        with simulated(fp32.model, set(ROUNDINGS), half):
            line(f"all {len(ROUNDINGS)} in the {name} half of the layers only",
                 score(fp32.model, tokenizer, prompts, letter_ids))
    for kept in WHAT_IF:
        with simulated(fp32.model, set(ROUNDINGS) - kept):
            line(f"all but {', '.join(sorted(kept))}", score(fp32.model, tokenizer, prompts, letter_ids))
    del fp32
    bf16 = load_model(None, dtype="bf16")
    line("the real bf16 path (rerank_core.mixed_precision)",
         score(bf16.model, bf16.tokenizer, prompts, letter_ids))


if __name__ == "__main__":
    main()
