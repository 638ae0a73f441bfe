"""Rerank Inspector's web app from the command line: parse the arguments, build the context, serve (rerank_app)."""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Sequence

from rerank_core.data.loaders import FORMATS

__all__ = ["AUTH_ENV", "main", "parse_args"]

AUTH_ENV = "RERANK_AUTH"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Rerank Inspector web app")
    parser.add_argument("--model", metavar="PATH", action="append",
                        help="local model folder (safetensors); repeatable; the embedded SmolLM2-135M-Instruct "
                             "is always offered too")
    parser.add_argument("--data", metavar="PATH", help="dataset folder; the bundled sample is always offered too")
    parser.add_argument("--data-format", metavar="NAME", help=f"force the format of --data: {', '.join(FORMATS)}")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s: this machine "
                                                            "only; 0.0.0.0 serves the network)")
    parser.add_argument("--port", type=int, default=7860, help="port (default %(default)s)")
    parser.add_argument("--share", action="store_true", help="create a public gradio.live link (off by default)")
    parser.add_argument("--auth", metavar="USER:PASSWORD",
                        help=f"require a login; or set ${AUTH_ENV}=user:password")
    parser.add_argument("--adapters-dir", metavar="PATH", help="adapters folder (default adapters/)")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda[:N]")
    parser.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32")
    parser.add_argument("--max-upload-mb", type=float, default=100.0, help="largest accepted upload file")
    parser.add_argument("--queue-size", type=int, default=64, help="requests waiting at most (default %(default)s)")
    return parser.parse_args(argv)


def _auth(value: str | None) -> tuple[str, str] | None:
    value = value or os.environ.get(AUTH_ENV)
    if not value:
        return None
    user, separator, password = value.partition(":")
    if not separator or not user or not password:
        raise SystemExit(f"--auth / ${AUTH_ENV} must look like user:password")
    return user, password


def main(argv: Sequence[str] | None = None) -> None:
    # Imported here so `--help` and a bad --auth answer without loading Gradio and torch.
    from rerank_app.server import build_app, build_context, launch

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    auth = _auth(args.auth)
    context = build_context(args)
    launch(build_app(context), host=args.host, port=args.port, share=args.share, auth=auth,
           max_upload_bytes=context.config.max_upload_bytes, queue_size=args.queue_size)


if __name__ == "__main__":
    main()
