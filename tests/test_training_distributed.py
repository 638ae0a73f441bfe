"""The train command under torchrun: 2 CPU processes (gloo) share the data and end with identical weights."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import cli_command, cli_env

from rerank_core.adapters import MANIFEST_FILE, list_adapters
from rerank_core.progress import read_events

# torchrun starts two Python processes that each import torch and transformers: tens of seconds.
pytestmark = pytest.mark.slow


def test_two_gloo_processes_agree_and_rank0_publishes(tiny_model_folder, toy_data_folder, tmp_path):
    root, events_file = tmp_path / "adapters", tmp_path / "events.jsonl"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "rerank_core", *cli_command(
                   tiny_model_folder, toy_data_folder, root, "--name", "two-ranks", "--events", str(events_file),
                   "--max-samples", "16", "--batch-size", "2", "--eval-users", "4", "--eval-every", "2")[3:]]
    finished = subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=240)
    assert finished.returncode == 0, finished.stderr[-3000:]

    manifest = json.loads((root / "two-ranks" / MANIFEST_FILE).read_text())
    report = manifest["report"]
    assert report["world_size"] == 2
    # 16 samples, 2 per process and step, 2 processes: 4 steps. One process alone would take 8.
    assert report["steps"] == report["total_steps"] == 4
    # Each rank hashed its own final LoRA weights; rank 0 gathered them. Without gradient
    # synchronisation the ranks would have trained on different halves of the data and differ.
    digests = report["replica_digests"]
    assert len(digests) == 2 and digests[0] == digests[1]

    events = read_events(events_file)
    assert [event["step"] for event in events if event["event"] == "step"] == [1, 2, 3, 4]  # rank 0 only
    assert [event["step"] for event in events if event["event"] == "validation"] == [0, 2, 4]
    assert events[-1]["event"] == "done"
    assert [info.name for info in list_adapters(root)] == ["two-ranks"]
