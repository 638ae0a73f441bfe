"""`eval` under torchrun: 2 CPU processes (gloo) split the scoring and rank 0 writes what one process writes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from conftest import cli_env

LAUNCH = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]

# torchrun starts two Python processes that each import torch and transformers: tens of seconds.
pytestmark = pytest.mark.slow


def eval_args(model: Path, data: Path, out: Path, users: int) -> list[str]:
    return ["-m", "rerank_core", "eval", "--model", str(model), "--data", str(data), "--dtype", "fp32",
            "--device", "cpu", "--candidates", "5", "--users", str(users), "--batch-size", "2",
            "--preset", "seed_after", "--output-dir", str(out)]


def run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, env=cli_env(), capture_output=True, text=True, timeout=300)


def test_two_processes_write_what_one_process_writes(tiny_model_folder, toy_data_folder, tmp_path):
    alone, launched = tmp_path / "one", tmp_path / "two"
    single = run([sys.executable, *eval_args(tiny_model_folder, toy_data_folder, alone, 9)])
    assert single.returncode == 0, single.stderr[-3000:]
    double = run([*LAUNCH, *eval_args(tiny_model_folder, toy_data_folder, launched, 9)])
    assert double.returncode == 0, double.stderr[-3000:]
    assert double.stdout.count("| popularity | baseline |") == 1  # rank 0 alone prints the table

    one, two = pd.read_csv(alone / "per_user.csv"), pd.read_csv(launched / "per_user.csv")
    assert list(one.columns) == list(two.columns) and len(one) == 9 * 4  # base + three baselines
    numeric = one.select_dtypes("number").columns
    pd.testing.assert_frame_equal(one.drop(columns=numeric), two.drop(columns=numeric))
    pd.testing.assert_frame_equal(one[numeric], two[numeric], rtol=1e-5, atol=1e-6)

    first = json.loads((alone / "summary.json").read_text())
    second = json.loads((launched / "summary.json").read_text())
    assert (first["processes"], second["processes"]) == (1, 2)
    assert first["users"] == second["users"] == 9
    pd.testing.assert_frame_equal(pd.DataFrame(first["rows"]), pd.DataFrame(second["rows"]), rtol=1e-5, atol=1e-6)


def test_more_processes_than_users_is_a_clear_error(tiny_model_folder, toy_data_folder, tmp_path):
    out = tmp_path / "out"
    failed = run([*LAUNCH, *eval_args(tiny_model_folder, toy_data_folder, out, 1)])
    assert failed.returncode != 0
    assert "2 processes but only 1 user(s) to evaluate" in failed.stderr
    assert not (out / "per_user.csv").exists() and not (out / "summary.json").exists()
