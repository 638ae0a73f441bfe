"""The adapters/ folder: safe names, atomic publishing that never loses the old adapter, stale staging clean-up."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import rerank_core.adapters as adapters_module
from rerank_core.adapters import (
    MANIFEST_FILE,
    AdapterError,
    list_adapters,
    new_staging_folder,
    publish_adapter,
    remove_stale,
    validate_adapter_name,
)
from rerank_core.prompts import get_preset


def fake_adapter(folder: Path, marker: str, *, manifest: dict | None = None) -> Path:
    """The files list_adapters looks for; contents are a marker to tell versions apart."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "adapter_config.json").write_text(json.dumps({"marker": marker}))
    (folder / "adapter_model.safetensors").write_text(marker)
    if manifest is not None:
        (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    return folder


def marker(folder: Path) -> str:
    return json.loads((folder / "adapter_config.json").read_text())["marker"]


@pytest.mark.parametrize("name", ["a", "lora-r8", "my_adapter.v2", "A1", "x" * 64])
def test_good_adapter_names(name: str) -> None:
    assert validate_adapter_name(name) == name


@pytest.mark.parametrize("name", [
    "", "..", "a..b", "../evil", "a/b", "/abs", "a\\b", "tab\tname", "new\nline", "nul\x00", "x" * 65,
    ".hidden", "-dash", "space name", None])
def test_bad_adapter_names(name: object) -> None:
    with pytest.raises(AdapterError, match="is not allowed"):
        validate_adapter_name(name)  # type: ignore[arg-type]


def test_publish_makes_a_complete_folder_visible(tmp_path: Path) -> None:
    staging = new_staging_folder(tmp_path)
    assert staging.parent == tmp_path and staging.name.startswith(f".staging-{os.getpid()}-")
    fake_adapter(staging, "v1")
    assert list_adapters(tmp_path) == []  # staging is hidden
    target = publish_adapter(staging, "mine", tmp_path)
    assert target == tmp_path / "mine" and marker(target) == "v1"
    assert not staging.exists()
    assert [info.name for info in list_adapters(tmp_path)] == ["mine"]


def test_publish_refuses_to_overwrite_unless_asked(tmp_path: Path) -> None:
    publish_adapter(fake_adapter(new_staging_folder(tmp_path), "v1"), "mine", tmp_path)
    second = fake_adapter(new_staging_folder(tmp_path), "v2")
    with pytest.raises(AdapterError, match="already exists"):
        publish_adapter(second, "mine", tmp_path)
    assert marker(tmp_path / "mine") == "v1"
    publish_adapter(second, "mine", tmp_path, overwrite=True)
    assert marker(tmp_path / "mine") == "v2"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["mine"]  # nothing set aside remains


def test_failed_overwrite_leaves_the_old_adapter_intact(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    publish_adapter(fake_adapter(new_staging_folder(tmp_path), "v1"), "mine", tmp_path)
    staging = fake_adapter(new_staging_folder(tmp_path), "v2")
    real_rename = os.rename
    calls = []

    def rename_failing_second(source, destination):
        calls.append((Path(source).name, Path(destination).name))
        if len(calls) == 2:  # 1: old folder aside; 2: new folder in (fails); 3: old folder back
            raise OSError("disk full")
        return real_rename(source, destination)

    monkeypatch.setattr(adapters_module.os, "rename", rename_failing_second)
    with pytest.raises(OSError, match="disk full"):
        publish_adapter(staging, "mine", tmp_path, overwrite=True)
    monkeypatch.undo()
    assert len(calls) == 3 and calls[2][1] == "mine"
    assert marker(tmp_path / "mine") == "v1"
    assert [info.name for info in list_adapters(tmp_path)] == ["mine"]
    assert marker(staging) == "v2"  # the new work is not lost either


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_remove_stale_deletes_dead_staging_and_keeps_live(tmp_path: Path) -> None:
    dead = fake_adapter(tmp_path / f".staging-{dead_pid()}-abc", "dead")
    live = new_staging_folder(tmp_path)
    published = fake_adapter(tmp_path / "kept", "kept")
    removed = remove_stale(tmp_path)
    assert removed == [dead.name]
    assert not dead.exists() and live.is_dir() and published.is_dir()
    assert remove_stale(tmp_path / "absent") == []


def test_remove_stale_restores_an_adapter_set_aside_by_a_killed_overwrite(tmp_path: Path) -> None:
    dead = dead_pid()
    aside = fake_adapter(tmp_path / f".replaced-{dead}-my-adapter-k2j4x9_a", "old")
    leftover = fake_adapter(tmp_path / f".replaced-{dead}-other-q8w7e6rt", "older")
    in_progress = fake_adapter(tmp_path / f".replaced-{os.getpid()}-busy-abc123", "busy")
    fake_adapter(tmp_path / "other", "new")
    assert sorted(remove_stale(tmp_path)) == sorted([aside.name, leftover.name])
    assert marker(tmp_path / "my-adapter") == "old"
    assert marker(tmp_path / "other") == "new"
    assert not aside.exists() and not leftover.exists()
    assert in_progress.exists(), "a live writer's set-aside folder is its publish in progress"


def test_list_adapters_ignores_hidden_incomplete_and_unreadable(tmp_path: Path) -> None:
    fake_adapter(tmp_path / "good", "g", manifest={"preset": "seed_after", "strategy": "as_trained",
                                                   "base_model": {"name": "base", "fingerprint": "f"}})
    fake_adapter(tmp_path / "plain", "p")
    fake_adapter(tmp_path / ".staging-1-x", "s")
    fake_adapter(tmp_path / ".hidden", "h")
    (tmp_path / "incomplete").mkdir()
    (tmp_path / "incomplete" / "adapter_config.json").write_text("{}")
    (tmp_path / "a_file").write_text("x")
    broken = fake_adapter(tmp_path / "broken_manifest", "b")
    (broken / MANIFEST_FILE).write_text("{not json")
    infos = {info.name: info for info in list_adapters(tmp_path)}
    assert sorted(infos) == ["good", "plain"]
    assert infos["good"].preset == get_preset("seed_after") and infos["good"].strategy == "as_trained"
    assert infos["good"].base_name == "base"
    assert infos["plain"].manifest is None and infos["plain"].preset is None
    assert list_adapters(tmp_path / "absent") == []


def test_adapters_root_override(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("RERANK_ADAPTERS_DIR", str(tmp_path))
    assert adapters_module.adapters_root() == tmp_path
    assert adapters_module.adapters_root(tmp_path / "x") == tmp_path / "x"


def test_the_adapters_folder_is_in_the_repository_with_a_readme() -> None:
    """The layout names adapters/ as where adapters go: it exists in a fresh checkout, saying what belongs there."""
    repo = Path(__file__).resolve().parent.parent
    tracked = subprocess.run(["git", "ls-files", "adapters"], cwd=repo, capture_output=True, text=True).stdout
    assert tracked.split() == ["adapters/README.md"]
    assert "rerank_manifest.json" in (repo / "adapters" / "README.md").read_text()
