"""`python -m rerank_core diagnose ...`: each diagnostic from a shell, as JSON or text tables."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from typing import Any

import pandas as pd

from rerank_core.cli.common import add_common_options, build_inspector, build_settings, tokenizer_from_options
from rerank_core.data.loaders import load_dataset
from rerank_core.diagnostics import (
    OrderSpec,
    history_influence,
    letter_mass,
    letter_prior,
    position_bias,
    position_bias_over_users,
)
from rerank_core.diagnostics import tables as frames
from rerank_core.inspector import BASE, Inspector
from rerank_core.prompts import get_preset, with_template_kwargs
from rerank_core.template_check import template_consistency

__all__ = ["add_diagnose_command"]


def _systems(args: argparse.Namespace) -> list[str]:
    return [BASE, *(args.adapter or [])]


def _users(inspector: Inspector, count: int) -> list[str]:
    users = inspector.dataset.users
    return users if count == 0 else users[:count]


def _print(args: argparse.Namespace, payload: Any, tables: list[tuple[str, pd.DataFrame | str]]) -> int:
    if args.format == "json":
        print(json.dumps(payload, indent=2, ensure_ascii=False, default=str))
        return 0
    for title, table in tables:
        print(f"\n== {title} ==")
        print(table if isinstance(table, str) else table.to_string(index=False))
    return 0


def _progress(label: str) -> Callable[[int, int], None] | None:
    """A one-line counter on a terminal; nothing when stderr is a file or a pipe."""
    if not sys.stderr.isatty():
        return None

    def report(done: int, total: int) -> None:
        print(f"\r{label}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)
    return report


def command_position_bias(args: argparse.Namespace) -> int:

    inspector = build_inspector(args)
    settings = build_settings(args, args.split)
    spec = OrderSpec(mode=args.orders, count=args.permutations, seed=args.order_seed)
    systems = _systems(args)
    if args.user:
        results = [position_bias(inspector, args.user, settings, system, spec) for system in systems]
        tables: list[tuple[str, pd.DataFrame | str]] = []
        for result in results:
            tables.append((f"{result.system}: items over {len(result.orders)} orders",
                           frames.position_items_frame(result)))
            tables.append((f"{result.system}: summary", (
                f"P(A) {result.letter_means[0]:.4f} (uniform {result.uniform:.4f}); stability (mean Kendall "
                f"tau) {result.stability:.4f}; ground-truth rank as shown {result.rank_original}, debiased "
                f"{result.rank_debiased}; rank counts over orders {result.truth_rank_counts.tolist()}")))
        return _print(args, {"systems": {result.system: result.to_json() for result in results}}, tables)
    users = _users(inspector, args.users)
    summaries = [position_bias_over_users(inspector, users, settings, system, spec,
                                          progress=_progress(f"position bias ({system})"))
                 for system in systems]
    letters = pd.DataFrame({"letter": list(summaries[0].letters)})
    for summary in summaries:
        letters[f"{summary.system} P"] = summary.mass_by_letter.round(4)
        letters[f"{summary.system} top-1 share"] = summary.top1_share.round(4)
    letters["uniform"] = round(summaries[0].uniform, 4)
    return _print(args, {"systems": {summary.system: summary.to_json() for summary in summaries}},
                  [("summary", frames.position_summary_frame(summaries)), ("by letter position", letters)])


def command_letter_prior(args: argparse.Namespace) -> int:

    inspector = build_inspector(args)
    settings = build_settings(args, args.split)
    users = _users(inspector, args.users)
    priors = [letter_prior(inspector, users, settings, system, args.mode, placeholder=args.placeholder)
              for system in _systems(args)]
    entropy = "; ".join(f"{prior.system}: normalized entropy {prior.normalized_entropy:.4f}" for prior in priors)
    return _print(args, {"systems": {prior.system: prior.to_json() for prior in priors}},
                  [("letter prior", frames.letter_prior_frame(priors)), ("spread", entropy)])


def command_history(args: argparse.Namespace) -> int:

    inspector = build_inspector(args)
    settings = build_settings(args, args.split)
    results = [history_influence(inspector, args.user, settings, system) for system in _systems(args)]
    tables: list[tuple[str, pd.DataFrame | str]] = []
    for result in results:
        truth = "absent" if result.truth_probability is None else f"{result.truth_probability:.4f}"
        tables.append((f"{result.system}: P(ground truth) {truth}, top-1 {result.letters[result.top1]}",
                       frames.history_influence_frame(result)))
    return _print(args, {"systems": {result.system: result.to_json() for result in results}}, tables)


def command_template(args: argparse.Namespace) -> int:

    tokenizer = tokenizer_from_options(args)
    text = None
    if args.user:

        inspector = Inspector(load_dataset(args.data, args.data_format), tokenizer=tokenizer)
        text = inspector.prepare(args.user, build_settings(args, args.split)).prompt.text

    preset = with_template_kwargs(get_preset(args.preset), args.template_kwargs)
    report = template_consistency(tokenizer, preset, text=text, letter=args.letter, count=args.candidates)
    around = "the end of the prompt" if report.is_prefix else "the first difference"
    _print(args, report.to_json(), [
        ("verdict", report.explanation), (f"tokens around {around}", frames.template_tokens_frame(report)),
        ("letters", frames.template_letters_frame(report))])
    return 0 if report.ok else 1


def command_letter_mass(args: argparse.Namespace) -> int:

    inspector = build_inspector(args)
    settings = build_settings(args, args.split)
    report = letter_mass(inspector, _users(inspector, args.users), settings, _systems(args),
                         progress=_progress("letter mass"))
    return _print(args, report.to_json(), [("letter mass per system", frames.letter_mass_frame(report))])


def add_diagnose_command(subparsers: Any) -> None:
    """Register `diagnose {position-bias,letter-prior,history,template,letter-mass}`."""

    diagnose = subparsers.add_parser(
        "diagnose", help="position bias, letter prior, history influence, template consistency, letter mass",
        description="Diagnostics for the base model and any adapter (--adapter, repeatable): each prints "
                    "a table, or JSON with --format json.")
    kinds = diagnose.add_subparsers(dest="diagnostic", required=True, metavar="DIAGNOSTIC")

    def add(name: str, help_text: str, handler: Callable[[argparse.Namespace], int], *,
            adapters: bool = True) -> argparse.ArgumentParser:
        parser = kinds.add_parser(name, help=help_text, description=help_text)
        add_common_options(parser)
        parser.add_argument("--split", choices=("test", "validation"), default="test", help="which target")
        parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")
        if adapters:
            parser.add_argument("--adapter", action="append", metavar="NAME",
                                help="also diagnose this adapter (repeatable); the base always runs")
            parser.add_argument("--ignore-adapter-preset", action="store_true",
                                help="run adapters with --preset instead of the preset each was trained with")
        parser.set_defaults(handler=handler)
        return parser

    bias = add("position-bias", "score each user's candidates in several orders: what the letter decides",
               command_position_bias)
    bias.add_argument("--user", help="one user in detail (per item and letter); without it, --users users")
    bias.add_argument("--users", type=int, default=50, help="first N users (0 = all; default %(default)s)")
    bias.add_argument("--orders", choices=("rotations", "permutations"), default="rotations",
                      help="every cyclic rotation (balanced), or seeded random permutations")
    bias.add_argument("--permutations", type=int, default=20, metavar="K",
                      help="orders for --orders permutations, the original included (default %(default)s)")
    bias.add_argument("--order-seed", type=int, default=0, help="seed of the permutations")

    prior = add("letter-prior", "letter probabilities with the candidate texts hidden", command_letter_prior)
    prior.add_argument("--users", type=int, default=20, help="first N users (0 = all; default %(default)s)")
    prior.add_argument("--mode", choices=("placeholder", "blank"), default="placeholder",
                       help="replace every candidate text by --placeholder, or by nothing")
    prior.add_argument("--placeholder", default="item", help="the neutral text (default %(default)r)")

    history = add("history", "leave each history item out: change of the truth's probability and the top-1",
                  command_history)
    history.add_argument("--user", required=True, help="user id")

    template = add("template", "is the inference prompt a token prefix of the training conversation? "
                               "Needs a tokenizer only (exit status 1 when not)", command_template,
                   adapters=False)
    template.add_argument("--letter", default="A", help="the answer letter to render (default %(default)s)")
    template.add_argument("--user", help="check this user's real prompt instead of a neutral probe")

    mass = add("letter-mass", "the letters' share of full-vocabulary probability over users",
               command_letter_mass)
    mass.add_argument("--users", type=int, default=50, help="first N users (0 = all; default %(default)s)")
