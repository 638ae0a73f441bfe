"""Rerank Inspector's web app from the command line (`python app.py`, the same as `rerank-inspector app`): the options
and the start live in rerank_app.console, so the pip-installed command and this file serve the same app."""

from __future__ import annotations

from rerank_app.console import AUTH_ENV, app_main, parse_args
from rerank_app.console import auth_pair as _auth  # noqa: F401 - the name tests have always called

__all__ = ["AUTH_ENV", "main", "parse_args"]

main = app_main

if __name__ == "__main__":
    main()
