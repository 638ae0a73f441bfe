"""The picker's listing: the embedded model, causal LMs in a fake HF cache (weights present or not), GGUF files in
model folders, unreadable entries skipped with a note, and fast enough for a cache of 50 models."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from gguf_helpers import write_tiny_gguf

from rerank_core.model_catalog import MODELS_DIRS_ENV, list_models, models_dirs
from rerank_core.model_refs import EMBEDDED_MODEL_NAME


def _repo(cache: Path, repo_id: str, config: object, *, weights: str | None = "model.safetensors",
          size: int = 1000, missing_shard: bool = False) -> Path:
    """A cached repository as from_pretrained leaves it: blobs, a snapshot of symlinks, refs/main."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    commit = f"{abs(hash(repo_id)):040x}"[:40]
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    files = {"config.json": config if isinstance(config, str) else json.dumps(config)}
    if weights:
        files[weights] = "x" * size
    if missing_shard:
        files["model.safetensors.index.json"] = json.dumps(
            {"weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}})
        files["model-00001-of-00002.safetensors"] = "x" * size
    for name, text in files.items():
        (repo / "blobs" / name).write_text(text)
        (snapshot / name).symlink_to(os.path.relpath(repo / "blobs" / name, snapshot))
    if missing_shard:  # an interrupted download: the symlink is there, its blob is not
        (snapshot / "model-00002-of-00002.safetensors").symlink_to("../../blobs/never-finished")
    return repo


CAUSAL = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


@pytest.fixture
def cache(tmp_path: Path) -> Path:
    cache = tmp_path / "hub"
    _repo(cache, "acme/chat-1b", CAUSAL, size=5000)
    _repo(cache, "acme/partial", CAUSAL, weights=None, missing_shard=True)
    _repo(cache, "acme/config-only", CAUSAL, weights=None)
    _repo(cache, "acme/encoder", {"architectures": ["BertModel"], "model_type": "bert"})
    _repo(cache, "acme/broken", "{not json")
    (cache / "datasets--acme--data").mkdir()
    return cache


def test_cache_entries_with_size_and_weights(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(MODELS_DIRS_ENV, raising=False)
    catalog = list_models(hf_cache=cache)
    by_name = {entry.name: entry for entry in catalog.entries}
    assert catalog.entries[0].name == EMBEDDED_MODEL_NAME and catalog.entries[0].reference == ""
    assert by_name["acme/chat-1b"].weights_present and by_name["acme/chat-1b"].size_bytes == 5000
    assert by_name["acme/chat-1b"].reference == "acme/chat-1b" and by_name["acme/chat-1b"].kind == "hub"
    assert not by_name["acme/partial"].weights_present  # one shard's blob never arrived
    assert not by_name["acme/config-only"].weights_present
    assert "no weights" in by_name["acme/config-only"].label
    assert "acme/encoder" not in by_name  # not a causal LM
    assert "acme/broken" not in by_name
    assert len(catalog.notes) == 1 and "models--acme--broken" in catalog.notes[0]


def test_gguf_files_in_model_folders(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = tmp_path / "lmstudio"
    (first / "publisher" / "repo").mkdir(parents=True)
    write_tiny_gguf(first / "publisher" / "repo" / "tiny.Q8.gguf")
    write_tiny_gguf(first / "vocab.gguf", vocab_only=True)
    (first / "corrupt.gguf").write_bytes(b"not a gguf")
    second = tmp_path / "ollama-copies"
    second.mkdir()
    write_tiny_gguf(second / "tiny.Q8.gguf", seed=1)  # the same file name in another folder
    monkeypatch.setenv(MODELS_DIRS_ENV, str(second) + os.pathsep + str(tmp_path / "absent"))
    assert models_dirs([first]) == [first, second, tmp_path / "absent"]
    catalog = list_models([first], hf_cache=cache)
    ggufs = [entry for entry in catalog.entries if entry.kind == "gguf"]
    names = sorted(entry.name for entry in ggufs)
    # Two files named tiny.Q8.gguf: shown by path, so each can be picked.
    assert names == sorted([str(first / "publisher" / "repo" / "tiny.Q8.gguf"), str(second / "tiny.Q8.gguf"),
                            "vocab.gguf"])
    vocab = next(entry for entry in ggufs if entry.name == "vocab.gguf")
    assert not vocab.weights_present and "vocabulary only" in vocab.detail and vocab.detail.startswith("llama")
    assert any("corrupt.gguf" in note for note in catalog.notes)
    assert any("absent" in note and "not a folder" in note for note in catalog.notes)


def test_fifty_models_list_in_under_a_second(tmp_path: Path) -> None:
    cache = tmp_path / "hub"
    for number in range(50):
        _repo(cache, f"org{number}/model-{number}", CAUSAL, size=10_000)
    started = time.perf_counter()
    catalog = list_models(hf_cache=cache, include_embedded=False)
    elapsed = time.perf_counter() - started
    assert len(catalog.entries) == 50 and elapsed < 1.0


def test_app_offers_every_model_with_weights(tmp_path: Path, cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from rerank_app.server import catalog_entries

    folder = tmp_path / "ggufs"
    folder.mkdir()
    write_tiny_gguf(folder / "tiny.gguf")
    write_tiny_gguf(folder / "vocab.gguf", vocab_only=True)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.delenv(MODELS_DIRS_ENV, raising=False)
    entries = catalog_entries([str(folder)], taken={"acme/chat-1b-taken"})
    # Loaded on first pick, by reference; a model without weights (or a vocabulary) is not offered.
    assert [(entry.name, entry.path) for entry in entries] == [("acme/chat-1b", "acme/chat-1b"),
                                                              ("tiny.gguf", str(folder / "tiny.gguf"))]
    assert all(entry.loaded is None for entry in entries)
    assert catalog_entries([str(folder)], taken={"tiny.gguf"})[-1].name == "acme/chat-1b"
