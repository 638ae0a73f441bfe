"""The house rule: the core never imports a front end (gradio, plotly, the app package)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
FRONT_ENDS = ("gradio", "plotly", "rerank_app")

# Every module of rerank_core (the CLI and its subcommands included), imported in a clean interpreter.
_PROBE = """
import importlib, json, pkgutil, sys
import rerank_core
names = sorted(module.name for module in pkgutil.walk_packages(rerank_core.__path__, "rerank_core.")
               if not module.name.endswith("__main__"))  # __main__ runs the CLI
for name in names:
    importlib.import_module(name)
loaded = sorted({name.split(".")[0] for name in sys.modules})
print(json.dumps({"modules": names, "loaded": loaded}))
"""


def test_the_core_and_its_cli_import_no_front_end() -> None:
    result = subprocess.run([sys.executable, "-c", _PROBE], cwd=REPO, capture_output=True, text=True, timeout=300,
                            check=True)
    report = json.loads(result.stdout.strip().splitlines()[-1])
    commands = {f"rerank_core.cli.{name}" for name in ("main", "audit", "show", "evaluate", "train", "diagnose")}
    families = {"rerank_core.data.loaders", "rerank_core.data.reading", "rerank_core.data.amazon",
                "rerank_core.data.csv_pairs", "rerank_core.data.movielens", "rerank_core.data.recbole",
                "rerank_core.training.config", "rerank_core.training.samples", "rerank_core.training.trainer",
                "rerank_core.training.manifest", "rerank_core.training.run"}
    assert commands | families <= set(report["modules"])
    assert [name for name in FRONT_ENDS if name in report["loaded"]] == []


def test_the_probe_sees_a_front_end_when_one_is_imported() -> None:
    """The check above can fail: the same probe after importing the app reports it."""
    result = subprocess.run([sys.executable, "-c", "import rerank_app.views\n" + _PROBE], cwd=REPO,
                            capture_output=True, text=True, timeout=300, check=True)
    loaded = json.loads(result.stdout.strip().splitlines()[-1])["loaded"]
    assert {"plotly", "rerank_app"} <= set(loaded)
