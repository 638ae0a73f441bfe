"""Tiny models, datasets and adapters on disk for the app, job and browser tests (subprocesses need paths)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

from conftest import build_tiny_llama, make_toy_dataset, save_tiny_model, write_csv_dataset

from rerank_app.context import AppConfig, AppContext, DatasetEntry, ModelEntry
from rerank_app.jobs import JobRunner
from rerank_core.adapters import MANIFEST_FILE
from rerank_core.data.loaders import load_dataset
from rerank_core.models import LoadedModel

# A fine-tune that takes seconds on a tiny model: few samples, no validation.
TINY_TRAINING = {"max_samples": 16, "eval_users": 0, "batch_size": 4, "candidates": 10}


def make_adapter(loaded: LoadedModel, root: Path, name: str, *, preset: str | None = None,
                 text_field: str | None = None) -> Path:
    """A published LoRA adapter with non-zero weights (so it changes scores) and a manifest for this base."""
    from peft import LoraConfig, get_peft_model

    model = build_tiny_llama(loaded.tokenizer, seed=1)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"],
                                                  init_lora_weights=False))
    folder = root / name
    peft_model.save_pretrained(folder)
    manifest = {"name": name, "base_model": {"name": loaded.name, "fingerprint": loaded.fingerprint},
                "preset": preset}
    if text_field:
        manifest["training"] = {"text_field": text_field}
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest), encoding="utf-8")
    return folder


def make_context(tmp: Path, tokenizer: Any) -> AppContext:
    """An app context over the toy dataset and a tiny model, both on disk, with its own folders."""
    data_folder = write_csv_dataset(make_toy_dataset(), tmp / "toy")
    model_folder = save_tiny_model(tokenizer, tmp / "tiny-llama")
    config = AppConfig(adapters_root=tmp / "adapters", upload_root=tmp / "uploads", runs_root=tmp / "runs",
                       max_upload_bytes=64 * 1024)
    jobs = JobRunner(config.runs_root, adapters=config.adapters_root)
    return AppContext(config, [DatasetEntry("toy", load_dataset(data_folder), data_folder)],
                      [ModelEntry("tiny-llama", str(model_folder))], jobs=jobs)


def wait_for_job(runner: JobRunner, predicate, timeout: float):
    """Poll a job runner until predicate(status) holds; fail with the job's last words after timeout."""
    deadline = time.monotonic() + timeout
    status = runner.status()
    while not predicate(status) and time.monotonic() < deadline:
        time.sleep(0.1)
        status = runner.status()
    assert predicate(status), f"timed out: {status.state} step {status.step}: {status.message}{status.log_tail}"
    return status


def custom_code_model(source: Path, target: Path) -> Path:
    """A copy of a model folder whose config asks to run its own Python, which would leave a RAN marker."""
    shutil.copytree(source, target)
    config = json.loads((target / "config.json").read_text())
    config.update(model_type="custom_llama", auto_map={"AutoConfig": "custom.CustomConfig",
                                                       "AutoModelForCausalLM": "custom.CustomModel"})
    (target / "config.json").write_text(json.dumps(config))
    (target / "custom.py").write_text(f"open({str(target / 'RAN')!r}, 'w').close()\n")
    return target
