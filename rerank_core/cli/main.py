"""`python -m rerank_core`: the same calls as the app, from a shell or a GPU box."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tqdm import tqdm

from rerank_core.adapters import check_adapter
from rerank_core.baselines import BASELINES, with_baselines
from rerank_core.cli.common import add_common_options, build_inspector, build_settings, int_range
from rerank_core.cli.diagnose import add_diagnose_command
from rerank_core.cli.train import add_train_command
from rerank_core.compare import adapter_notes, compare_systems, comparison_table
from rerank_core.display import visible_text
from rerank_core.distributed import close_process_group
from rerank_core.fsutil import atomic_write_text, write_folder
from rerank_core.inspector import BASE
from rerank_core.models import load_tokenizer
from rerank_core.prompts import answer_slot, get_preset, letters_for, with_template_kwargs
from rerank_core.report import comparison_report, inspection_report
from rerank_core.verbalizer import resolve_letters

__all__ = ["build_parser", "main"]

log = logging.getLogger("rerank_core")


def _table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    widths = {column: max(len(column), *(len(_cell(row.get(column))) for row in rows)) for column in columns}
    lines = ["  ".join(column.ljust(widths[column]) for column in columns)]
    lines += ["  ".join(_cell(row.get(column)).ljust(widths[column]) for column in columns) for row in rows]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return ",".join(str(part) for part in value) or "-"
    return "-" if value is None else str(value)


def command_audit(args: argparse.Namespace) -> int:
    preset = with_template_kwargs(get_preset(args.preset), args.template_kwargs)
    tokenizer = load_tokenizer(args.tokenizer or args.model)
    letters = resolve_letters(tokenizer, preset, letters_for(args.candidates), args.strategy)
    rows = [token.to_json() for token in letters]
    slot = answer_slot(tokenizer, preset)
    if args.format == "json":
        print(json.dumps({"preset": preset.name, "template_kwargs": preset.template_kwargs,
                          "answer_slot": slot.to_json(), "letters": rows}, indent=2, ensure_ascii=False))
    else:
        print(_table(rows, ["letter", "token", "token_id", "strategy", "step", "as_trained_id", "flags"]))
        flagged = sum(1 for row in rows if row["flags"])
        print(f"\n{flagged} of {len(rows)} letters flagged" if flagged else f"\nall {len(rows)} letters clean")
        _print_notes(slot.notes())
    return 0


def _print_notes(notes: Sequence[str]) -> None:
    for note in notes:
        print(f"note: {note}")


def command_show(args: argparse.Namespace) -> int:
    inspector = build_inspector(args, need_model=False)
    settings = build_settings(args, args.split)
    specials = inspector.tokenizer.all_special_tokens
    if inspector.loaded is None:
        if args.format == "html":
            raise ValueError("--format html needs scores: give --model (or no --tokenizer) instead of a "
                             "tokenizer alone")
        prepared = inspector.prepare(args.user, settings)
        payload = {
            "user_id": args.user, "split": args.split, "history": list(prepared.split.history),
            "candidates": list(prepared.candidates.item_ids), "target_index": prepared.candidates.target_index,
            "rendered_prompt": prepared.prompt.rendered, "prompt_tokens": len(prepared.token_ids),
            "answer_slot": prepared.answer_slot.to_json(),
            "audit": [token.to_json() for token in prepared.letter_tokens]}
        if args.format == "json":
            print(json.dumps(payload, indent=2, ensure_ascii=False))
        else:
            print(visible_text(prepared.prompt.rendered, specials))
            print(_table(payload["audit"], ["letter", "token", "token_id", "step", "as_trained_id", "flags"]))
            _print_notes(prepared.answer_slot.notes())
        return 0
    result = inspector.inspect(args.user, settings, args.adapter or BASE)
    if args.format == "html":
        return _write_or_print(inspection_report(result, inspector.dataset, model=inspector.loaded.name,
                                                 special_tokens=specials), args.output)
    payload = result.to_json(inspector.dataset)
    if args.format == "json":
        print(json.dumps(payload, indent=2, ensure_ascii=False, default=str))
        return 0
    if result.preset_note:
        print(f"note: {result.preset_note}")
    print(f"user {result.user_id} ({args.split}), system {result.system}, preset {result.settings.preset.name}")
    print(f"\nhistory ({len(payload['history'])} items, {payload['dropped_history']} dropped to fit):")
    print(_table(payload["history"], ["position", "item_id", "text", "in_prompt"]))
    print("\nrendered prompt (special tokens ⟦…⟧, newlines ↵):")
    print(visible_text(payload["rendered_prompt"], specials))
    print("\nletter audit:")
    print(_table(payload["audit"], ["letter", "token", "token_id", "step", "as_trained_id", "flags"]))
    _print_notes(result.prepared.answer_slot.notes())
    print("\ncandidates:")
    print(_table(payload["candidates"], ["letter", "item_id", "text", "truth", "probability", "rank"]))
    others = ", ".join(f"{row['token']!r} {row['probability']:.3f}" for row in payload["top_other"])
    print(f"\nletter mass {payload['letter_mass']:.3f}; top other tokens: {others}")
    print(f"ground truth rank: {payload['rank']}; " + ", ".join(
        f"{name} {value:.3f}" for name, value in payload["metrics"].items()))
    return 0


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


def _write_or_print(text: str, output: str | None) -> int:
    """A document to a file (written whole, never half) or to stdout."""
    if output is None:
        sys.stdout.write(text)
        return 0
    atomic_write_text(Path(output), text)
    print(f"wrote {output}", file=sys.stderr)
    return 0


def command_eval(args: argparse.Namespace) -> int:
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
    systems = [BASE, *(args.adapter or [])]
    # Bad adapters and an unwritable output folder fail now, not after minutes of scoring.
    for name in systems[1:]:
        check_adapter(inspector.loaded, name, args.adapters_dir)
    if is_main:
        for note in adapter_notes(inspector, settings, systems):
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
    write_folder(out_dir, {_EVAL_FILES[0]: per_user.to_csv(index=False), _EVAL_FILES[1]: json.dumps(
        {"users": len(users), "split": args.split, "processes": processes, "rows": records}, indent=2)})
    csv_path, summary_path = (out_dir / name for name in _EVAL_FILES)
    print(json.dumps(records, indent=2) if args.format == "json" else comparison_table(summary))
    print(f"\nwrote {csv_path} and {summary_path}", file=sys.stderr)
    if args.report:
        _write_or_print(comparison_report(per_user, summary, settings, dataset=inspector.dataset.name,
                                          model=inspector.loaded.name), args.report)
    return 0


def _baseline_names(text: str) -> list[str]:
    names = [part.strip() for part in text.split(",") if part.strip() and part.strip() != "none"]
    unknown = [name for name in names if name not in BASELINES]
    if unknown:
        raise ValueError(f"--baselines: {', '.join(unknown)} is not one of {', '.join(BASELINES)} (or none)")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m rerank_core", description=(
        "Inspect, evaluate and fine-tune LLM letter rerankers (LlamaRec style). "
        "Every command takes the model, data and prompt options shown in its --help."))
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    audit = commands.add_parser("audit", help="letter → token ID audit for a tokenizer and preset",
                                description="Resolve every letter in use and flag suspicious ones. "
                                            "Needs a tokenizer only.")
    add_common_options(audit)
    audit.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    audit.set_defaults(handler=command_audit)

    show = commands.add_parser("show", help="one user: history, candidates, prompt, audit, probabilities",
                               description="Everything the app's Inspect tab shows for one user.")
    add_common_options(show)
    show.add_argument("--user", required=True, help="user id")
    show.add_argument("--split", choices=("test", "validation"), default="test", help="which target")
    show.add_argument("--adapter", help="score with this adapter from the adapters folder instead of the base")
    show.add_argument("--ignore-adapter-preset", action="store_true",
                      help="score an adapter with --preset instead of the preset it was trained with")
    show.add_argument("--format", choices=("text", "json", "html"), default="text",
                      help="output format; html: one self-contained report file (charts inlined, opens offline)")
    show.add_argument("--output", metavar="FILE", help="write the output to FILE instead of stdout")
    show.set_defaults(handler=command_show)

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
    evaluate.add_argument("--format", choices=("text", "json"), default="text", help="summary format")
    evaluate.add_argument("--report", metavar="FILE.html",
                          help="also write a self-contained HTML report (settings, metrics with CIs, charts, "
                               "movers) that opens offline")
    evaluate.set_defaults(handler=command_eval)

    add_train_command(commands)
    add_diagnose_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if int(os.environ.get("RANK", "0")) > 0:
        # Under a launcher every process runs the command; one copy of each table (rank 0's) is enough.
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - lives as long as the process
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if not args.verbose:
        # transformers takes seconds to import: only when a command runs, not for --help
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()
    try:
        return args.handler(args)
    except (ValueError, KeyError, OSError, RuntimeError) as error:
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"error: {message}", file=sys.stderr)
        return 2
    finally:
        close_process_group()
