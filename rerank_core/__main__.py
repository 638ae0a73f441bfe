"""Entry point for `python -m rerank_core`."""

import sys

from rerank_core.cli.main import main

sys.exit(main())
