"""`python -m rerank_core show`: one user as the Inspect tab shows it, as text, JSON or a self-contained HTML report."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rerank_core.cli.common import add_common_options, build_inspector, build_settings, model_from_options
from rerank_core.cli.output import describe_model, print_notes, table, write_or_print
from rerank_core.display import visible_text
from rerank_core.inspector import BASE
from rerank_core.report import inspection_report

__all__ = ["add_show_command", "command_show"]


def command_show(args: argparse.Namespace) -> int:
    """Print one user's prompt, audit and (with a model) probabilities; a tokenizer alone gives the prompt only."""
    inspector = build_inspector(args, need_model=False)
    settings = build_settings(args, args.split)
    specials = inspector.tokenizer.all_special_tokens
    model = model_from_options(args, inspector)
    if inspector.loaded is None:
        if args.format == "html":
            raise ValueError("--format html needs scores: give --model (or no --tokenizer) instead of a "
                             "tokenizer alone")
        prepared = inspector.prepare(args.user, settings)
        payload = {
            "user_id": args.user, "split": args.split, "model": model, "history": list(prepared.split.history),
            "candidates": list(prepared.candidates.item_ids), "target_index": prepared.candidates.target_index,
            "rendered_prompt": prepared.prompt.rendered, "prompt_tokens": len(prepared.token_ids),
            "answer_slot": prepared.answer_slot.to_json(),
            "audit": [token.to_json() for token in prepared.letter_tokens]}
        if args.format == "json":
            print(json.dumps(payload, indent=2, ensure_ascii=False))
        else:
            print(describe_model(model))
            print(visible_text(prepared.prompt.rendered, specials))
            print(table(payload["audit"], ["letter", "token", "token_id", "step", "as_trained_id", "flags"]))
            print_notes(prepared.answer_slot.notes())
        return 0
    result = inspector.inspect(args.user, settings, args.adapter or BASE)
    if args.format == "html":
        return write_or_print(inspection_report(result, inspector.dataset, model=inspector.loaded.label,
                                                 special_tokens=specials), args.output)
    payload = {**result.to_json(inspector.dataset), "model": model}
    if args.format == "json":
        print(json.dumps(payload, indent=2, ensure_ascii=False, default=str))
        return 0
    if result.preset_note:
        print(f"note: {result.preset_note}")
    print(f"user {result.user_id} ({args.split}), system {result.system}, preset {result.settings.preset.name}")
    print(describe_model(model))
    print(f"\nhistory ({len(payload['history'])} items, {payload['dropped_history']} dropped to fit):")
    print(table(payload["history"], ["position", "item_id", "text", "in_prompt"]))
    print("\nrendered prompt (special tokens ⟦…⟧, newlines ↵):")
    print(visible_text(payload["rendered_prompt"], specials))
    print("\nletter audit:")
    print(table(payload["audit"], ["letter", "token", "token_id", "step", "as_trained_id", "flags"]))
    print_notes(result.prepared.answer_slot.notes())
    print("\ncandidates:")
    print(table(payload["candidates"], ["letter", "item_id", "text", "truth", "probability", "rank"]))
    others = ", ".join(f"{row['token']!r} {row['probability']:.3f}" for row in payload["top_other"])
    print(f"\nletter mass {payload['letter_mass']:.3f}; top other tokens: {others}")
    print(f"ground truth rank: {payload['rank']}; " + ", ".join(
        f"{name} {value:.3f}" for name, value in payload["metrics"].items()))
    return 0


def add_show_command(commands: Any) -> argparse.ArgumentParser:
    """Register `show` on the subparsers object; sets handler=command_show."""
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
    return show
