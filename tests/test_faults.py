"""Faults during fine-tuning: cancel in every phase, interrupted and failing saves, killed runs and app restarts.

Whatever happens, adapters/ shows complete adapters only, an adapter being overwritten survives, leftovers are
cleaned at the next start, and the job runner tells what happened.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import peft.peft_model
import pytest
import torch
from app_helpers import TINY_TRAINING, make_adapter, wait_for_job
from conftest import make_toy_dataset, save_tiny_model, tiny_loaded, write_csv_dataset

from rerank_app.jobs import JobBusy, JobRunner, TrainRequest
from rerank_core.adapters import check_adapter, list_adapters
from rerank_core.progress import CancelFlag, read_events
from rerank_core.scoring import score_token_ids
from rerank_core.training import manifest as training_manifest
from rerank_core.training.config import training_config
from rerank_core.training.run import train_adapter

NO_SPACE = OSError(errno.ENOSPC, "No space left on device")


def tiny_config(**overrides):
    """One step on a tiny model unless asked for more: a couple of seconds."""
    settings = {"max_samples": 4, "candidates": 5, "batch_size": 4, "eval_users": 0, "eval_every": 0,
                "max_prompt_tokens": 160, "warmup": 0.0}
    return training_config("quick", **{**settings, **overrides})


def snapshot(root: Path) -> dict[str, str]:
    return {str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
            for path in sorted(root.rglob("*")) if path.is_file()}


def hidden(root: Path) -> list[str]:
    """Staging and set-aside folders: a clean adapters/ has none once the run is over."""
    return sorted(path.name for path in root.iterdir() if path.name.startswith("."))


@pytest.fixture
def world(smol_tokenizer, tmp_path: Path):
    """A tiny base model and an adapters folder that already holds a published adapter, 'previous'."""
    loaded = tiny_loaded(smol_tokenizer)
    root = tmp_path / "adapters"
    make_adapter(loaded, root, "previous")
    return loaded, root, snapshot(root)


def assert_untouched(loaded, root: Path, before: dict[str, str]) -> None:
    assert hidden(root) == []
    assert [info.name for info in list_adapters(root)] == ["previous"]
    assert snapshot(root) == before
    check_adapter(loaded, "previous", root)
    assert not any(".lora_" in name for name in loaded.model.state_dict())  # the base is handed back clean


# -- cancel in every phase ----------------------------------------------------------------------

def _cancel_when(phase: str, cancel: CancelFlag, events: list[dict]):
    """An event sink that asks to stop at the given moment of the run."""

    def on_event(event: dict) -> None:
        events.append(event)
        stage, kind = event.get("stage"), event["event"]
        if (phase == "building samples" and stage == "samples") \
                or (phase == "first step" and stage == "training") \
                or (phase == "validation before training" and stage == "validation" and event["step"] == 0) \
                or (phase == "validation during training" and kind == "step" and event["step"] == 1) \
                or (phase == "validation after training" and stage == "validation" and event["step"] > 0) \
                or (phase == "saving" and stage == "saving"):
            cancel.request(f"cancelled during {phase}")

    return on_event


@pytest.mark.parametrize("phase", ["building samples", "first step", "validation before training",
                                   "validation during training", "validation after training"])
def test_cancel_in_any_phase_publishes_nothing(phase: str, world) -> None:
    loaded, root, before = world
    cancel, events = CancelFlag(), []
    steps = {"first step": 3, "validation during training": 2}.get(phase, 1)
    config = tiny_config(max_samples=4 * steps, eval_users=3,
                         eval_every=1 if phase == "validation during training" else 0)
    report = train_adapter(loaded, make_toy_dataset(), config, "cancelled", root=root,
                           on_event=_cancel_when(phase, cancel, events), cancel=cancel)
    assert report.status == "cancelled" and report.path is None
    assert events[-1]["event"] == "cancelled" and events[-1]["reason"] == f"cancelled during {phase}"
    done = [event["step"] for event in events if event["event"] == "step"]
    if phase == "first step":
        assert done == [1]  # stopped at the first of three step boundaries
    if phase in ("building samples", "validation before training"):
        assert done == []
    if phase == "validation during training":
        assert done == [1]
    assert_untouched(loaded, root, before)


def test_cancel_while_saving_publishes_the_whole_adapter_or_nothing(world) -> None:
    loaded, root, before = world
    cancel, events = CancelFlag(), []
    report = train_adapter(loaded, make_toy_dataset(), tiny_config(), "saved", root=root,
                           on_event=_cancel_when("saving", cancel, events), cancel=cancel)
    assert cancel.requested
    # Saving takes well under a second and is not interrupted by a soft cancel: the adapter is complete.
    assert report.status == "done" and events[-1]["event"] == "done"
    assert [info.name for info in list_adapters(root)] == ["previous", "saved"]
    assert check_adapter(loaded, "saved", root).manifest["name"] == "saved"
    assert hidden(root) == [] and {key: value for key, value in snapshot(root).items()
                                   if key.startswith("previous")} == before


def test_a_hard_stop_in_the_middle_of_overwriting_publishes_nothing(world, monkeypatch: pytest.MonkeyPatch) -> None:
    """A second Ctrl-C / SIGTERM raises KeyboardInterrupt wherever the run is: here, half-way through a file."""
    loaded, root, before = world
    real_save = peft.peft_model.safe_save_file

    def interrupted_save(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:100])
        raise KeyboardInterrupt("second SIGTERM: stopping now")

    monkeypatch.setattr(peft.peft_model, "safe_save_file", interrupted_save)
    events: list[dict] = []
    report = train_adapter(loaded, make_toy_dataset(), tiny_config(), "previous", root=root, overwrite=True,
                           on_event=events.append)
    assert report.status == "cancelled" and events[-1]["event"] == "cancelled"
    assert_untouched(loaded, root, before)


# -- saving fails -------------------------------------------------------------------------------

def _fail_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    real_save = peft.peft_model.safe_save_file

    def full_disk(tensors, filename, *args, **kwargs):
        real_save(tensors, filename, *args, **kwargs)
        Path(filename).write_bytes(Path(filename).read_bytes()[:64])  # what a full disk leaves
        raise NO_SPACE

    monkeypatch.setattr(peft.peft_model, "safe_save_file", full_disk)


def _fail_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    def full_disk(path, text):
        raise NO_SPACE

    monkeypatch.setattr(training_manifest, "atomic_write_text", full_disk)


def _fail_publish(monkeypatch: pytest.MonkeyPatch) -> None:
    real_rename = os.rename

    def full_disk(source, target):
        if Path(source).name.startswith(".staging-"):
            raise NO_SPACE
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", full_disk)


SAVE_FAULTS = {"writing weights": _fail_weights, "writing the manifest": _fail_manifest,
               "renaming into place": _fail_publish}


@pytest.mark.parametrize(("where", "overwrite"), [("writing weights", False), ("writing the manifest", True),
                                                  ("renaming into place", False), ("renaming into place", True)])
def test_saving_that_fails_shows_the_error_and_keeps_the_previous_adapter(world, where: str, overwrite: bool,
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    loaded, root, before = world
    SAVE_FAULTS[where](monkeypatch)
    events: list[dict] = []
    with pytest.raises(OSError, match="No space left on device"):
        train_adapter(loaded, make_toy_dataset(), tiny_config(), "previous" if overwrite else "new", root=root,
                      overwrite=overwrite, on_event=events.append)
    assert events[-1]["event"] == "failed" and "No space left on device" in events[-1]["error"]
    monkeypatch.undo()
    assert_untouched(loaded, root, before)


def _finished_pid() -> int:
    """The pid of a process that has exited: what a job record holds after its run is gone."""
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


def test_a_failed_save_is_reported_by_the_cli_and_by_the_job_runner(smol_tokenizer, tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    from rerank_core.cli.main import main
    from rerank_core.cli.train import EXIT_FAILED

    model = save_tiny_model(smol_tokenizer, tmp_path / "model")
    data = write_csv_dataset(make_toy_dataset(), tmp_path / "data")
    runs, root = tmp_path / "runs", tmp_path / "adapters"
    run = runs / "20250101-000000-abcdef"
    run.mkdir(parents=True)
    _fail_weights(monkeypatch)
    status = main(["train", "--name", "full-disk", "--model", str(model), "--data", str(data), "--dtype", "fp32",
                   "--adapters-dir", str(root), "--events", str(run / "events.jsonl"), "--no-progress",
                   "--max-samples", "8", "--candidates", "5", "--max-prompt-tokens", "160", "--eval-users", "0"])
    assert status == EXIT_FAILED
    assert "error: [Errno 28] No space left on device" in capsys.readouterr().err
    assert list_adapters(root) == [] and hidden(root) == []
    # What the app shows: the job runner reads the run's own last event, not a generic "it died".
    (run / "job.json").write_text(json.dumps({"id": run.name, "name": "full-disk", "pid": _finished_pid(),
                                              "started_at": time.time(), "state": "running", "message": ""}))
    shown = JobRunner(runs, adapters=root).status()
    assert shown.state == "failed" and "No space left on device" in shown.message


def test_a_torn_event_line_does_not_stop_the_app_from_starting(tmp_path: Path) -> None:
    """A full disk or a crash can cut an event line short; the app must still start and tell the run's story."""
    run = tmp_path / "runs" / "20250101-000000-abcdef"
    run.mkdir(parents=True)
    (run / "job.json").write_text(json.dumps({"id": run.name, "name": "torn", "pid": _finished_pid(),
                                              "started_at": time.time(), "state": "running", "message": ""}))
    (run / "events.jsonl").write_bytes(b'{"event": "start", "uniform_loss": 1.6}\n{"event": "step", "st\n\xff\xfe\n'
                                       b'[1, 2]\n{"event": "step", "step": 2, "total_steps": 5, "loss": 1.2}\n')
    status = JobRunner(tmp_path / "runs", adapters=tmp_path / "adapters").status()
    assert status.state == "failed" and "nothing was published" in status.message
    assert status.total_losses == [(2, 1.2)] and status.total_steps == 5 and status.uniform_loss == 1.6
    assert [event["event"] for event in read_events(run / "events.jsonl")] == ["start", "step"]


# -- killed runs and app restarts (real training subprocesses) ----------------------------------

def test_app_restarts_and_sigkill_mid_run_then_a_new_run_succeeds(smol_tokenizer, tmp_path: Path) -> None:
    """The app goes away while a run trains; the restarted app re-attaches, sees it killed, and trains again."""
    model = save_tiny_model(smol_tokenizer, tmp_path / "model")
    data = write_csv_dataset(make_toy_dataset(), tmp_path / "data")
    runs, root = tmp_path / "runs", tmp_path / "adapters"
    make_adapter(tiny_loaded(smol_tokenizer), root, "previous")
    before = snapshot(root)

    def request(name: str, **options) -> TrainRequest:
        return TrainRequest(name, str(model), str(data), options={**TINY_TRAINING, **options})

    first_app = JobRunner(runs, adapters=root)
    started = first_app.start(request("long-run", max_samples=0, epochs=4))
    running = wait_for_job(first_app, lambda status: status.step >= 1 or not status.active, timeout=150)
    assert running.state == "running", running.message + running.log_tail
    assert len(hidden(root)) == 1  # the run's staging folder, invisible to the adapter list

    restarted = JobRunner(runs, adapters=root)  # the app restarted; the run, in its own session, goes on
    attached = restarted.status()
    assert attached.state == "running" and attached.job_id == started.job_id and attached.pid == started.pid
    assert attached.step >= 1 and attached.total_steps > attached.step and attached.letter_losses
    with pytest.raises(JobBusy, match="'long-run' is still running"):
        restarted.start(request("second"))

    os.kill(started.pid, signal.SIGKILL)
    failed = wait_for_job(restarted, lambda status: not status.active, timeout=30)
    assert failed.state == "failed" and "nothing was published" in failed.message
    assert hidden(root) == [] and [info.name for info in list_adapters(root)] == ["previous"]
    assert snapshot(root) == before

    again = JobRunner(runs, adapters=root)  # a restart after the end: the record on disk is the truth
    assert again.status().state == "failed" and again.status().job_id == started.job_id
    again.start(request("after-kill", max_samples=4))  # one step: enough to publish
    done = wait_for_job(again, lambda status: not status.active, timeout=150)
    assert done.state == "done", done.message + done.log_tail
    assert [info.name for info in list_adapters(root)] == ["after-kill", "previous"] and hidden(root) == []
    final = JobRunner(runs, adapters=root).status()
    assert final.state == "done" and final.result["path"] == str(root / "after-kill")
    assert read_events(runs / final.job_id / "events.jsonl")[-1]["event"] == "done"


# -- load -----------------------------------------------------------------------------------------

def test_prompt_lengths_share_a_few_padded_shapes(smol_tokenizer) -> None:
    """bench_load.py found RSS growing ~3 MiB per new prompt length (oneDNN compiles kernels per shape in bf16);
    the scorer pads to a multiple of 32 tokens, so 8 lengths make 3 shapes, and results do not change. These prompts
    share their first 300 tokens, so the from-scratch path is asked for: prefix reuse has its own shapes and test."""
    model = tiny_loaded(smol_tokenizer).model
    shapes: set[tuple[int, ...]] = set()
    handle = model.model.embed_tokens.register_forward_hook(
        lambda module, args, output: shapes.add(tuple(args[0].shape)))
    prompts = [list(range(1000, 1000 + length)) for length in (300, 317, 320, 321, 340, 352, 353, 380)]
    letters = [smol_tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"]
    try:
        scores = score_token_ids(model, smol_tokenizer, prompts, letters, batch_size=1, share_prefix=False)
    finally:
        handle.remove()
    assert shapes == {(1, 320), (1, 352), (1, 384)}
    with torch.no_grad():  # the padded prompt's last position sees exactly what the prompt alone gives
        alone = model(input_ids=torch.tensor([prompts[1]])).logits[0, -1, letters].float()
    assert scores[1].letter_logits == pytest.approx(alone.tolist(), abs=1e-4)


def test_eval_outputs_appear_together_or_not_at_all(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """eval's CSV and summary go into one staging folder renamed into place: never one without the other."""
    from rerank_core.cli.evaluate import _check_output_dir
    from rerank_core.fsutil import write_folder

    def snapshot(folder: Path) -> dict[str, str]:
        return {path.name: path.read_text() for path in folder.iterdir()}

    out = tmp_path / "eval_out"
    write_folder(out, {"per_user.csv": "old csv", "summary.json": "old summary"})
    assert snapshot(out) == {"per_user.csv": "old csv", "summary.json": "old summary"}
    real_rename = os.rename

    def rename_fails_into_place(source, target):
        if Path(target) == out and ".staging-" in Path(source).name:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_rename(source, target)

    monkeypatch.setattr(os, "rename", rename_fails_into_place)
    with pytest.raises(OSError, match="No space left"):
        write_folder(out, {"per_user.csv": "new csv", "summary.json": "new summary"})
    monkeypatch.undo()
    assert snapshot(out) == {"per_user.csv": "old csv", "summary.json": "old summary"}  # the old pair, whole
    assert sorted(path.name for path in tmp_path.iterdir()) == ["eval_out"]  # no staging or set-aside left
    write_folder(out, {"per_user.csv": "new csv", "summary.json": "new summary"})
    assert snapshot(out) == {"per_user.csv": "new csv", "summary.json": "new summary"}
    _check_output_dir(out)  # a previous eval's folder may be replaced ...
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds other files"):
        _check_output_dir(out)  # ... a folder with anything else may not


def test_an_interrupted_uploads_staging_folder_is_removed_at_the_next_start(tmp_path: Path, smol_tokenizer) -> None:
    from app_helpers import make_context

    context = make_context(tmp_path, smol_tokenizer)
    uploads = context.config.upload_root
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = uploads / f".staging-{dead.pid}-x1"  # the name add_upload gives, from a process that died mid-copy
    stale.mkdir(parents=True)
    (stale / "items.csv").write_text("half a fi")
    alive = uploads / f".staging-{os.getpid()}-x2"  # a copy still in progress in a running app
    alive.mkdir()
    type(context)(context.config, [context.datasets.get("toy")], [context.models.entry("tiny-llama")],
                  jobs=context.finetune.jobs)
    assert not stale.exists() and alive.exists()
