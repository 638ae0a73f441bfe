"""What a published adapter says about itself (manifest.json): the settings, data, base model and package versions
it was trained with, and the check that its folder name is free before any work starts."""

from __future__ import annotations

import importlib.metadata
import json
import os
import platform
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rerank_core.adapters import MANIFEST_FILE, AdapterError, adapters_root, base_model_record, validate_adapter_name
from rerank_core.data.dataset import Dataset
from rerank_core.fsutil import atomic_write_text
from rerank_core.inspector import BASE
from rerank_core.models import LoadedModel
from rerank_core.training.config import TrainConfig
from rerank_core.training.trainer import TrainReport

__all__ = ["MANIFEST_FORMAT", "build_manifest", "check_adapter_target", "package_versions", "write_manifest"]

MANIFEST_FORMAT = 1
_PACKAGES = ("torch", "transformers", "peft", "accelerate", "tokenizers", "safetensors", "numpy", "pandas")


def package_versions() -> dict[str, str]:
    """The versions a result depends on, so a manifest read later can explain a difference."""
    versions = {"python": platform.python_version()}
    for package in _PACKAGES:
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            continue
    try:
        versions["rerank-inspector"] = importlib.metadata.version("rerank-inspector")
    except importlib.metadata.PackageNotFoundError:
        versions["rerank-inspector"] = "source checkout"
    return versions


def build_manifest(loaded: LoadedModel, dataset: Dataset, config: TrainConfig, name: str, report: TrainReport,
                   training_preset: str | None) -> dict[str, Any]:
    """The manifest of a finished run: what scoring needs to reproduce its prompts, and where it came from."""
    return {
        "format": MANIFEST_FORMAT,
        "name": name,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "base_model": base_model_record(loaded),
        "preset": config.preset,
        "template_kwargs": config.template_kwargs,
        "strategy": config.strategy,
        "candidates": {"source": config.candidate_source, "count": config.candidates, "seed": config.seed},
        "dataset": {"name": dataset.name, "source": dataset.source, "fingerprint": dataset.fingerprint(),
                    "users": len(dataset.sequences), "items": len(dataset.items)},
        "training_preset": training_preset,
        "training": config.to_json(),
        "versions": package_versions(),
        "validation": {"split": "validation", "users": config.eval_users,
                       "before": report.validation.get("before"), "after": report.validation.get("after")},
        "report": report.to_json(),
    }


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    """manifest.json in the staging folder, written whole: a crash leaves no half manifest to be published."""
    atomic_write_text(folder / MANIFEST_FILE, json.dumps(manifest, indent=2, default=str))


def check_adapter_target(name: str, root: str | os.PathLike[str] | None = None, *, overwrite: bool = False) -> Path:
    """adapters/<name>, if the name is valid and free (or may be overwritten): checked before any work."""
    validate_adapter_name(name)
    if name == BASE:
        raise AdapterError(f"{BASE!r} names the model without an adapter in every picker: choose another name")
    target = adapters_root(root) / name
    if target.exists() and not overwrite:
        raise AdapterError(f"adapter {name!r} already exists in {target.parent}; choose another name or pass "
                           "overwrite=True (--overwrite) to replace it")
    return target
