"""`pip install --no-deps .` into a fresh virtual environment: the packages, the sample data and the one console
script `rerank-inspector` (app and core commands) come out of it, importable away from the source tree."""

from __future__ import annotations

import shutil
import site
import subprocess
import sys
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
# What a checkout holds beside the sources: never part of the package, and large or private.
_NOT_SOURCES = shutil.ignore_patterns(".venv", ".git", "__pycache__", "*.egg-info", "build", "dist", "runs",
                                      "uploads", "artifacts", ".pytest_cache", ".ruff_cache")


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with the project pip-installed (--no-deps); its dependencies are seen through a .pth file
    pointing at this interpreter's site-packages, so the installed commands can run without a download."""
    root = tmp_path_factory.mktemp("packaging")
    source = root / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCES)  # the build writes build/ and *.egg-info: not in the tree
    environment = root / "venv"
    # Without pip and setuptools of its own: this interpreter's pip installs into it (--python), and the build
    # runs there with the setuptools the .pth file below lends it (ensurepip's older one cannot build wheels).
    venv.create(environment, with_pip=False)
    python = environment / "bin" / "python"
    purelib = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                             capture_output=True, text=True, check=True).stdout.strip()
    # Appended after the venv's own site-packages: the installed project wins over anything of the same name.
    Path(purelib, "zz-dependencies.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    # --no-build-isolation: setuptools comes from the dependencies above instead of a download.
    result = subprocess.run([sys.executable, "-m", "pip", "--python", str(python), "install", "-q", "--no-deps",
                             "--no-build-isolation", "--no-index", str(source)],
                            capture_output=True, text=True, timeout=600, cwd=root)
    assert result.returncode == 0, result.stderr[-3000:]
    return environment


def _run(environment: Path, *argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(environment / "bin" / argv[0]), *argv[1:]], capture_output=True, text=True,
                          timeout=300, cwd=environment.parent)


@pytest.mark.slow
def test_packages_and_sample_data_are_installed(installed: Path) -> None:
    probe = ("import rerank_core, rerank_app.console; from rerank_core.data.builtin import bundled_sample_path; "
             "print(rerank_core.__file__); print(bundled_sample_path() / 'items.csv')")
    result = _run(installed, "python", "-c", probe)
    assert result.returncode == 0, result.stderr[-2000:]
    module, items = result.stdout.split()
    assert str(installed) in module  # the installed copy, not the checkout
    assert Path(items).is_file()


@pytest.mark.slow
def test_console_script_runs_app_and_core_commands(installed: Path) -> None:
    usage = _run(installed, "rerank-inspector", "--help")
    assert usage.returncode == 0 and "app" in usage.stdout and "audit" in usage.stdout
    app_help = _run(installed, "rerank-inspector", "app", "--help")
    assert app_help.returncode == 0 and "--models-dir" in app_help.stdout and "--chat-template" in app_help.stdout
    audit_help = _run(installed, "rerank-inspector", "audit", "--help")
    assert audit_help.returncode == 0 and "--chat-template" in audit_help.stdout
    refused = _run(installed, "rerank-inspector", "show", "--user", "u0002", "--model", "acme/not-in-any-cache")
    assert refused.returncode == 2 and "acme/not-in-any-cache" in refused.stderr
