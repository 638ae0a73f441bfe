"""Paths and writes that never leave half a file behind."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path

__all__ = ["DATA_HOME_ENV", "atomic_write_text", "data_home", "in_source_checkout", "process_running", "replace_folder",
           "user_cache_dir", "write_folder"]

DATA_HOME_ENV = "RERANK_INSPECTOR_HOME"
# The folder that holds rerank_core/ (and rerank_app/): a checkout's root, or site-packages when pip-installed.
_PACKAGE_PARENT = Path(__file__).resolve().parent.parent


def in_source_checkout(package_parent: Path = _PACKAGE_PARENT) -> bool:
    """Whether the packages run from a checkout (the repository's pyproject.toml or .git beside them), not from
    site-packages, where nothing of the user's may be written."""
    return (package_parent / "pyproject.toml").is_file() or (package_parent / ".git").exists()


def data_home(package_parent: Path = _PACKAGE_PARENT) -> Path:
    """Where adapters/, uploads/ and runs/ live: $RERANK_INSPECTOR_HOME when set, else beside the code in a checkout
    (as always), else the user's data folder ($XDG_DATA_HOME or ~/.local/share, /rerank-inspector)."""
    override = os.environ.get(DATA_HOME_ENV)
    if override:
        return Path(override).expanduser()
    if in_source_checkout(package_parent):
        return package_parent
    base = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(base) / "rerank-inspector"


def user_cache_dir() -> Path:
    """Where converted models and caches live; RERANK_INSPECTOR_CACHE overrides."""
    override = os.environ.get("RERANK_INSPECTOR_CACHE")
    if override:
        return Path(override)
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "rerank-inspector"


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    """Write to a temporary file beside the target, then rename, so readers see old or new."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as stream:
            stream.write(text)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def replace_folder(staging: Path, target: Path, *, aside_prefix: str) -> None:
    """Rename a complete folder to target; an existing target is set aside first and restored if the new one cannot
    move in, so a reader sees the old folder or the new one, never a mix of both."""
    if not target.exists():
        os.rename(staging, target)
        return
    aside = Path(tempfile.mkdtemp(prefix=aside_prefix, dir=target.parent))
    aside.rmdir()
    os.rename(target, aside)
    try:
        os.rename(staging, target)
    except OSError:
        os.rename(aside, target)
        raise
    shutil.rmtree(aside, ignore_errors=True)


def write_folder(target: str | os.PathLike[str], files: Mapping[str, str]) -> None:
    """Files that belong together (a CSV and its summary) written into a staging folder renamed into place: a
    reader never sees one without the others. The target holds these files only and is replaced as a whole."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        for name, text in files.items():
            (staging / name).write_text(text, encoding="utf-8")
        staging.chmod(0o755)
        replace_folder(staging, target, aside_prefix=f".{target.name}.replaced-")
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def process_running(pid: int) -> bool:
    """A process that exists and is not a zombie (a killed writer its parent has not reaped writes nothing)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except (OSError, IndexError):
        return True  # no /proc (not Linux): trust the signal check
