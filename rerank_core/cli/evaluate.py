"""`python -m rerank_core eval`: metrics over many users, base against adapters and baselines with paired CIs."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rerank_core.baselines import BASELINES, with_baselines
from rerank_core.cli.common import add_common_options, build_inspector, build_settings, int_range, model_from_options
from rerank_core.cli.output import describe_model, write_or_print
from rerank_core.compare import adapter_notes, compare_systems, comparison_table
from rerank_core.fsutil import write_folder
from rerank_core.inspector import BASE
from rerank_core.metrics import candidate_recall
from rerank_core.report import comparison_report

__all__ = ["add_eval_command", "command_eval"]

# What eval writes: one folder, replaced as a whole, so the CSV and its summary always belong together.
_EVAL_FILES = ("per_user.csv", "summary.json")


def _check_output_dir(out_dir: Path) -> None:
    """Refuse, before any scoring, a folder eval could not create or that holds files it would replace."""
    if out_dir.exists() and (not out_dir.is_dir() or set(path.name for path in out_dir.iterdir()) - set(_EVAL_FILES)):
        raise ValueError(f"--output-dir {out_dir} holds other files; eval replaces the folder as a whole: "
                         "choose a new or empty folder")
    try:
        out_dir.parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise OSError(f"--output-dir {out_dir} cannot be created ({error.strerror}): choose a writable folder") \
            from None


def command_eval(args: argparse.Namespace) -> int:
    """Score the users with every system, write per_user.csv and summary.json, print the summary table."""
    baselines = _baseline_names(args.baselines)
    inspector = build_inspector(args)
    shard = inspector.shard
    is_main = shard is None or shard.is_main
    settings = build_settings(args, args.split)
    users = inspector.dataset.users
    if args.users:
        users = users[:args.users]
    processes = 1 if shard is None else shard.world_size
    if processes > len(users):
        raise ValueError(f"{processes} processes but only {len(users)} user(s) to evaluate: launch at most "
                         f"{len(users)} processes or evaluate more users (--users)")
    # Resolved once (each adapter checked here) and handed down: bad adapters and an unwritable output folder
    # fail now, not after minutes of scoring.
    systems = [inspector.resolve(name, settings) for name in [BASE, *(args.adapter or [])]]
    if is_main:
        for note in adapter_notes(systems):
            print(f"note: {note}", file=sys.stderr)
    out_dir = Path(args.output_dir)
    _check_output_dir(out_dir)
    # Every process runs the same comparison; scoring inside it is split across them (Inspector.shard).
    with tqdm(total=len(users) * len(systems), desc="scoring", unit="user", file=sys.stderr,
              disable=not is_main) as bar:
        per_user, summary = compare_systems(inspector, users, settings, systems,
                                            progress=lambda done, _total: bar.update(done - bar.n))
    per_user, summary = with_baselines(inspector, per_user, summary, users, settings, baselines,
                                       reference=args.reference)
    if not is_main:
        return 0
    records = json.loads(summary.to_json(orient="records"))
    # Beside every mean: how many users' targets the candidates hold at all (each row's population says which).
    recall = candidate_recall(per_user, settings.candidates.source, settings.candidates.count)
    # Which model and chat template made these numbers travels with them: in summary.json and in what is printed.
    model = model_from_options(args, inspector)
    document = json.dumps({"users": len(users), "split": args.split, "processes": processes, "model": model,
                           "candidate_recall": recall.to_json(), "rows": records}, indent=2)
    write_folder(out_dir, {_EVAL_FILES[0]: per_user.to_csv(index=False), _EVAL_FILES[1]: document})
    csv_path, summary_path = (out_dir / name for name in _EVAL_FILES)
    print(document if args.format == "json" else f"{describe_model(model)}\n{recall.describe()}\n\n"
          f"{comparison_table(summary)}")
    print(f"\nwrote {csv_path} and {summary_path}", file=sys.stderr)
    if args.report:
        write_or_print(comparison_report(per_user, summary, settings, dataset=inspector.dataset.name,
                                          model=inspector.loaded.label), args.report)
    return 0


def _baseline_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip() and part.strip() != "none"]
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: {', '.join(unknown)} is not one of {', '.join(BASELINES)} (or none)")
    return names


def add_eval_command(commands: Any) -> argparse.ArgumentParser:
    """Register `eval` on the subparsers object; sets handler=command_eval."""
    evaluate = commands.add_parser("eval", help="metrics over many users; base vs adapters with paired CIs",
                                   description="Score many users, write a per-user CSV and a JSON summary.")
    add_common_options(evaluate)
    evaluate.add_argument("--users", type=int_range(0), default=200,
                          help="first N users (0 = all; default %(default)s)")
    evaluate.add_argument("--split", choices=("test", "validation"), default="test", help="which target")
    evaluate.add_argument("--adapter", action="append", metavar="NAME",
                          help="also score this adapter (repeatable); differences are paired with the base")
    evaluate.add_argument("--ignore-adapter-preset", action="store_true",
                          help="score adapters with --preset instead of the preset each was trained with")
    evaluate.add_argument("--baselines", default="random,popularity,retriever", metavar="NAMES",
                          help="comma-separated baselines scored on the same candidates: random (expected "
                               "value), popularity (training-part counts), retriever (co-occurrence order); "
                               "none for no baselines (default: %(default)s)")
    evaluate.add_argument("--reference", metavar="RUN",
                          help="pair every run against this one (base, an adapter or a baseline, e.g. "
                               "popularity); default: the base")
    evaluate.add_argument("--output-dir", default="eval_out", help="where per_user.csv and summary.json go")
    evaluate.add_argument("--format", choices=("text", "json"), default="text",
                          help="summary format; json prints summary.json (model, chat template, recall, rows)")
    evaluate.add_argument("--report", metavar="FILE.html",
                          help="also write a self-contained HTML report (settings, metrics with CIs, charts, "
                               "movers) that opens offline")
    evaluate.set_defaults(handler=command_eval)
    return evaluate
