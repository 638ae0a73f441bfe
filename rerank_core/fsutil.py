"""Paths and writes that never leave half a file behind."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

__all__ = ["atomic_write_text", "user_cache_dir"]


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
