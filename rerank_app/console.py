"""The `rerank-inspector` command a pip install puts on PATH: `app` serves the web app, every other command is
`python -m rerank_core`'s. It lives in the front end because only it may import both the app and the core."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from rerank_core.data.loaders import FORMATS

__all__ = ["AUTH_ENV", "app_main", "auth_pair", "main", "parse_args"]

AUTH_ENV = "RERANK_AUTH"
_CORE_COMMANDS = ("audit", "show", "eval", "train", "diagnose")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The web app's options (`python app.py ...` and `rerank-inspector app ...` alike)."""
    parser = argparse.ArgumentParser(prog="rerank-inspector app", description="Rerank Inspector web app")
    parser.add_argument("--model", metavar="REF", action="append",
                        help="a model folder, a hub id org/name[@revision] from the local Hugging Face cache, or a "
                             ".gguf file; repeatable; the embedded SmolLM2-135M-Instruct and every model the picker "
                             "finds (HF cache, --models-dir) are offered too")
    parser.add_argument("--models-dir", metavar="PATH", action="append",
                        help="a folder whose .gguf files the model picker lists; repeatable (also "
                             "$RERANK_INSPECTOR_MODELS, os.pathsep-separated)")
    parser.add_argument("--chat-template", metavar="FILE.jinja",
                        help="a chat template every model uses instead of its own (inference and fine-tunes)")
    parser.add_argument("--data", metavar="PATH", help="dataset folder; the bundled sample is always offered too")
    parser.add_argument("--data-format", metavar="NAME", help=f"force the format of --data: {', '.join(FORMATS)}")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine "
                                                            "only; 0.0.0.0 serves the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help=f"require a login; or set ${AUTH_ENV}=user:password")
    parser.add_argument("--adapters-dir", metavar="PATH", help="adapters folder (default adapters/)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N] (auto spreads a model over several "
                                                         "GPUs with accelerate when one does not hold it)")
    parser.add_argument("--max-memory", metavar="BUDGETS", help="with --device auto, the most each device may hold, "
                                                                "e.g. 0=20GiB,1=20GiB,cpu=64GiB")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    parser.add_argument("--max-upload-mb", type=float, default=100.0, help="largest accepted upload file")
    parser.add_argument("--queue-size", type=int, default=64, help="requests waiting at most (default %(default)s)")
    return parser.parse_args(argv)


def auth_pair(value: str | None) -> tuple[str, str] | None:
    """--auth (or $RERANK_AUTH) as Gradio's (user, password); a value without both halves stops the start."""
    value = value or os.environ.get(AUTH_ENV)
    if not value:
        return None
    user, separator, password = value.partition(":")
    if not separator or not user or not password:
        raise SystemExit(f"--auth / ${AUTH_ENV} must look like user:password")
    return user, password


def app_main(argv: Sequence[str] | None = None) -> None:
    """Parse the app's options, build the context, serve."""
    # Imported here so `--help` and a bad --auth answer without loading Gradio and torch.
    from rerank_app.server import build_app, build_context, launch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    auth = auth_pair(args.auth)
    context = build_context(args)
    launch(build_app(context), host=args.host, port=args.port, share=args.share, auth=auth,
           max_upload_bytes=context.config.max_upload_bytes, queue_size=args.queue_size)


def main(argv: Sequence[str] | None = None) -> int:
    """`rerank-inspector app ...` serves the app; `rerank-inspector audit|show|eval|train|diagnose` runs the core."""
    arguments = list(sys.argv[1:] if argv is None else argv)
    if arguments[:1] == ["app"]:
        app_main(arguments[1:])
        return 0
    if not arguments or arguments[0] in ("-h", "--help"):
        print("usage: rerank-inspector {app," + ",".join(_CORE_COMMANDS) + "} ...\n\n"
              "  app        serve the web app (rerank-inspector app --help)\n"
              "  " + ", ".join(_CORE_COMMANDS) + "  the command line, as python -m rerank_core "
              "(rerank-inspector audit --help, ...)")
        return 0 if arguments else 2
    from rerank_core.cli.main import main as core_main  # the core's parser names its own commands and errors

    return core_main(arguments)
