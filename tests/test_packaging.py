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

from rerank_core.adapters import adapters_root
from rerank_core.fsutil import data_home, in_source_checkout

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


def test_a_checkout_keeps_its_folders_beside_the_code(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from rerank_app.context import AppConfig

    monkeypatch.delenv("RERANK_INSPECTOR_HOME", raising=False)
    monkeypatch.delenv("RERANK_ADAPTERS_DIR", raising=False)
    assert in_source_checkout() and data_home() == REPO
    config = AppConfig()
    assert (config.adapters_root, config.upload_root, config.runs_root) == (
        REPO / "adapters", REPO / "uploads", REPO / "runs")
    monkeypatch.setenv("RERANK_ADAPTERS_DIR", str(tmp_path / "mine"))  # the override still wins
    assert adapters_root() == AppConfig().adapters_root == tmp_path / "mine"


def test_an_installed_package_writes_to_the_user_data_folder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    site_packages = tmp_path / "site-packages"  # rerank_core/ and rerank_app/ with no pyproject.toml or .git beside
    (site_packages / "rerank_core").mkdir(parents=True)
    monkeypatch.delenv("RERANK_INSPECTOR_HOME", raising=False)
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "data"))
    assert not in_source_checkout(site_packages)
    assert data_home(site_packages) == tmp_path / "data" / "rerank-inspector"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_home(site_packages) == tmp_path / "home" / ".local" / "share" / "rerank-inspector"
    monkeypatch.setenv("RERANK_INSPECTOR_HOME", str(tmp_path / "chosen"))
    assert data_home(site_packages) == data_home() == tmp_path / "chosen"


@pytest.mark.slow
def test_installed_commands_write_nothing_inside_site_packages(installed: Path, tmp_path: Path) -> None:
    probe = ("import rerank_core; from rerank_core.adapters import adapters_root; "
             "from rerank_app.context import AppConfig; config = AppConfig(); "
             "print(rerank_core.__file__, adapters_root(), config.upload_root, config.runs_root)")
    result = subprocess.run([str(installed / "bin" / "python"), "-c", probe], capture_output=True, text=True,
                            timeout=300, cwd=installed.parent,
                            env={"HOME": str(tmp_path), "PATH": "/usr/bin:/bin"})
    assert result.returncode == 0, result.stderr[-2000:]
    module, *folders = result.stdout.split()
    site_packages = Path(module).parent.parent
    for folder in map(Path, folders):
        assert folder.parent == tmp_path / ".local" / "share" / "rerank-inspector"
        assert site_packages not in folder.parents
