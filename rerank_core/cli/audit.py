"""`python -m rerank_core audit`: which token each answer letter becomes, with a tokenizer alone, before any scoring."""

from __future__ import annotations

import argparse
import json
from typing import Any

from rerank_core.cli.common import add_common_options, tokenizer_from_options
from rerank_core.cli.output import print_notes, table
from rerank_core.prompts import answer_slot, get_preset, letters_for, with_template_kwargs
from rerank_core.verbalizer import resolve_letters

__all__ = ["add_audit_command", "command_audit"]


def command_audit(args: argparse.Namespace) -> int:
    """Print the letter audit and the answer slot's notes for one tokenizer and preset."""
    preset = with_template_kwargs(get_preset(args.preset), args.template_kwargs)
    tokenizer = tokenizer_from_options(args)
    letters = resolve_letters(tokenizer, preset, letters_for(args.candidates), args.strategy)
    rows = [token.to_json() for token in letters]
    slot = answer_slot(tokenizer, preset)
    if args.format == "json":
        print(json.dumps({"preset": preset.name, "template_kwargs": preset.template_kwargs,
                          "answer_slot": slot.to_json(), "letters": rows}, indent=2, ensure_ascii=False))
    else:
        print(table(rows, ["letter", "token", "token_id", "strategy", "step", "as_trained_id", "flags"]))
        flagged = sum(1 for row in rows if row["flags"])
        print(f"\n{flagged} of {len(rows)} letters flagged" if flagged else f"\nall {len(rows)} letters clean")
        print_notes(slot.notes())
    return 0


def add_audit_command(commands: Any) -> argparse.ArgumentParser:
    """Register `audit` on the subparsers object; sets handler=command_audit."""
    audit = commands.add_parser("audit", help="letter → token ID audit for a tokenizer and preset",
                                description="Resolve every letter in use and flag suspicious ones. "
                                            "Needs a tokenizer only.")
    add_common_options(audit)
    audit.add_argument("--format", choices=("table", "json"), default="table", help="output format")
    audit.set_defaults(handler=command_audit)
    return audit
