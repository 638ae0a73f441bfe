"""`python -m rerank_core`: the same calls as the app, from a shell or a GPU box; the parser and the dispatch to
one module per command."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from rerank_core.cli.audit import add_audit_command
from rerank_core.cli.diagnose import add_diagnose_command
from rerank_core.cli.evaluate import add_eval_command
from rerank_core.cli.show import add_show_command
from rerank_core.cli.train import add_train_command
from rerank_core.distributed import close_process_group, launched_rank

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    """Every command's parser, each registered by its own module."""
    parser = argparse.ArgumentParser(prog="python -m rerank_core", description=(
        "Inspect, evaluate and fine-tune LLM letter rerankers (LlamaRec style). "
        "Every command takes the model, data and prompt options shown in its --help."))
    parser.add_argument("-v", "--verbose", action="store_true", help="log more")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    add_audit_command(commands)
    add_show_command(commands)
    add_eval_command(commands)
    add_train_command(commands)
    add_diagnose_command(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Parse, run the command's handler, and turn an expected error into one line and exit status 2."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if launched_rank() > 0:
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
