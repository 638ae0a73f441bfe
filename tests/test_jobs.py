"""The fine-tune runner: checked command lines, one run at a time, cancel, crashes, and re-attaching after a restart."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from app_helpers import TINY_TRAINING, make_context, wait_for_job

from rerank_app.jobs import JobBusy, JobRunner, TrainRequest
from rerank_core.adapters import AdapterError, list_adapters


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    return make_context(tmp_path_factory.mktemp("jobs"), smol_tokenizer)


def _request(context, name: str, **options) -> TrainRequest:
    return TrainRequest(name=name, model_path=context.models.path("tiny-llama"),
                        data_path=str(context.datasets.get("toy").path), options={**TINY_TRAINING, **options})


def _staging_folders(context) -> list[str]:
    root = context.config.adapters_root
    return [path.name for path in root.iterdir() if path.name.startswith(".")] if root.is_dir() else []


def test_the_run_gets_paths_on_its_command_line_and_checked_settings_in_a_file(tmp_path: Path) -> None:
    request = TrainRequest("my-lora", "/models/m", "/data/d", options={
        "learning_rate": 0.002, "preset": "seed_after", "max_samples": 0, "lora_r": 8.0})
    argv = request.argv(tmp_path / "config.json", tmp_path / "events.jsonl", tmp_path / "cancel",
                        tmp_path / "adapters")
    assert argv[1:4] == ["-m", "rerank_core", "train"]
    joined = " ".join(argv)
    for part in ("--name my-lora", "--model /models/m", "--data /data/d", f"--config {tmp_path / 'config.json'}",
                 f"--events {tmp_path / 'events.jsonl'}", "--no-progress"):
        assert part in joined
    assert "--lr" not in joined and "--max-samples" not in joined  # settings go in the file, not the argv
    assert "--chat-template" not in argv  # the tokenizer's own template unless the app gives one
    templated = TrainRequest("my-lora", "acme/tiny-chat", "/data/d", chat_template="/uploads/.templates/ab.jinja")
    argv = templated.argv(tmp_path / "c.json", tmp_path / "e", tmp_path / "x", tmp_path / "a")
    assert argv[argv.index("--chat-template") + 1] == "/uploads/.templates/ab.jinja"
    assert argv[argv.index("--model") + 1] == "acme/tiny-chat"
    config = request.config()
    assert (config.learning_rate, config.preset, config.max_samples, config.lora_r) == (
        0.002, "seed_after", None, 8)
    assert isinstance(config.lora_r, int)
    refused = [
        ({"name": "../evil"}, AdapterError, "not allowed"),
        ({"options": {"output_dir": "/tmp/x"}}, ValueError, "unknown training setting"),
        ({"options": {"preset": "--overwrite"}}, ValueError, "prompt preset '--overwrite' is not one of"),
        ({"options": {"lora_r": -3}}, ValueError, "lora_r must be a whole number from 1 to 4096"),
        ({"options": {"lora_r": 2.5}}, ValueError, "lora_r must be a whole number"),
        ({"options": {"epochs": True}}, ValueError, "epochs must be a number"),
        ({"options": {"epochs": "1; rm -rf /"}}, ValueError, "epochs must be a number"),
        ({"training_preset": "huge"}, ValueError, "quick, full"),
    ]
    for changes, error, message in refused:
        fields = {"name": "ok", "model_path": "/m", "data_path": "/d", **changes}
        with pytest.raises(error, match=message):
            request = TrainRequest(**fields)
            request.config()
            request.argv(tmp_path / "f", tmp_path / "e", tmp_path / "c", tmp_path / "a")


def _write_job(folder: Path, pid: int, events: list[dict]) -> None:
    folder.mkdir(parents=True)
    (folder / "job.json").write_text(json.dumps({"id": folder.name, "name": "old-run", "pid": pid,
                                                 "started_at": time.time(), "state": "running", "message": ""}))
    (folder / "events.jsonl").write_text("".join(json.dumps(event) + "\n" for event in events))


def test_restart_marks_a_vanished_run_failed_and_cleans_its_staging(tmp_path: Path) -> None:
    finished = subprocess.Popen([sys.executable, "-c", "pass"])
    finished.wait()
    _write_job(tmp_path / "runs" / "20250101-000000-aaaaaa", finished.pid,
               [{"event": "start", "uniform_loss": 2.3}, {"event": "step", "step": 2, "total_steps": 9, "loss": 2.0}])
    stale = tmp_path / "adapters" / f".staging-{finished.pid}-xyz"
    stale.mkdir(parents=True)
    runner = JobRunner(tmp_path / "runs", adapters=tmp_path / "adapters")
    status = runner.status()
    assert status.state == "failed" and status.name == "old-run" and "is gone" in status.message
    assert status.step == 2 and status.total_losses == [(2, 2.0)]
    assert json.loads((tmp_path / "runs" / "20250101-000000-aaaaaa" / "job.json").read_text())["state"] == "failed"
    assert not stale.exists()


def test_restart_reattaches_to_a_live_run_which_blocks_a_second_start(context, tmp_path: Path) -> None:
    folder = tmp_path / "runs" / "20250101-000000-bbbbbb"
    events = folder / "events.jsonl"
    # Stands in for a training process that outlived the app: its command line names its events file.
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", str(events)],
                               start_new_session=True)
    try:
        _write_job(folder, sleeper.pid, [{"event": "start", "uniform_loss": math.log(10)},
                                         {"event": "step", "step": 3, "total_steps": 30, "loss": 2.1, "eta": 9.0}])
        runner = JobRunner(tmp_path / "runs", adapters=tmp_path / "adapters")
        status = runner.status()
        assert status.state == "running" and status.step == 3 and status.total_steps == 30 and status.active
        with pytest.raises(JobBusy, match="'old-run' is still running"):
            runner.start(_request(context, "second"))
        assert runner.cancel().state == "cancelling"
        assert (folder / "cancel").is_file() and sleeper.poll() is None  # the file first, no signal yet
        runner.cancel()  # asked again: SIGTERM, which this stand-in does not handle
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
        status = wait_for_job(runner, lambda s: not s.active, timeout=10)
        assert status.state == "failed" and "is gone" in status.message
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_real_fine_tune_runs_to_done_and_publishes_its_adapter(context) -> None:
    runner = context.finetune.jobs
    status = runner.start(_request(context, "tiny-done"))
    assert status.state == "running" and status.pid
    status = runner.wait(timeout=180)
    assert status.state == "done", status.message + status.log_tail
    assert status.letter_losses and status.total_losses and status.total_steps == 4 and status.step == 4
    assert status.uniform_loss == pytest.approx(math.log(10))
    assert status.result["path"] == str(context.config.adapters_root / "tiny-done")
    assert "tiny-done" in context.models.adapter_names("tiny-llama")
    with pytest.raises(AdapterError, match="already exists"):
        runner.start(_request(context, "tiny-done"))
    with pytest.raises(AdapterError, match="without an adapter"):
        runner.start(_request(context, "base"))


def test_a_killed_run_is_reported_failed_then_a_new_run_cancels_cleanly(context) -> None:
    runner = context.finetune.jobs
    before = [info.name for info in list_adapters(context.config.adapters_root)]
    runner.start(_request(context, "tiny-killed", max_samples=0, epochs=4))
    status = wait_for_job(runner, lambda s: s.step >= 1 or not s.active, timeout=120)
    os.kill(status.pid, signal.SIGKILL)
    status = wait_for_job(runner, lambda s: not s.active, timeout=30)
    assert status.state == "failed" and "code -9" in status.message and "nothing was published" in status.message
    assert [info.name for info in list_adapters(context.config.adapters_root)] == before
    assert _staging_folders(context) == []  # the killed run's half-written folder is cleaned up

    # The next run starts, and a cancel mid-run stops it at a step boundary with nothing published.
    runner.start(_request(context, "tiny-cancelled", max_samples=0, epochs=4))
    wait_for_job(runner, lambda s: s.step >= 1 or not s.active, timeout=120)
    runner.cancel()
    status = runner.wait(timeout=120)
    assert status.state == "cancelled", status.message + status.log_tail
    assert 1 <= status.step < status.total_steps
    assert [info.name for info in list_adapters(context.config.adapters_root)] == before
    assert _staging_folders(context) == []
