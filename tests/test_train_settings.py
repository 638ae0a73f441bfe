"""Each training setting declared once: the CLI flags, the app's form and API, and the job hand-over follow it."""

from __future__ import annotations

import argparse
import inspect
import json
from dataclasses import fields
from pathlib import Path

import pytest

from rerank_app.pickers import endpoint
from rerank_app.tabs import finetune
from rerank_core.cli.train import add_train_command, config_from_args
from rerank_core.training.config import TRAINING_PRESETS, TrainConfig, training_config
from rerank_core.training.settings import SETTINGS, parse_settings, setting


def _train_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    add_train_command(parser.add_subparsers(dest="command"))
    return parser


def test_every_setting_is_a_config_field_a_flag_a_form_field_and_an_api_parameter() -> None:
    config_fields = {item.name for item in fields(TrainConfig)}
    assert {item.name for item in SETTINGS} == config_fields  # nothing declared twice, nothing missing
    help_text = _train_parser()._subparsers._group_actions[0].choices["train"].format_help()
    api = list(inspect.signature(endpoint(finetune.start_finetune, None)).parameters)
    preview_api = list(inspect.signature(endpoint(finetune.training_preview, None)).parameters)
    for item in SETTINGS:
        assert item.flag in help_text, item.name
        if item.form:
            assert item.name in finetune.FORM_FIELDS and item.name in api and item.name in preview_api
    assert finetune.fill_preset("full") == [getattr(TRAINING_PRESETS["full"], name) for name in finetune.FORM_FIELDS]


def test_values_from_any_front_end_are_parsed_in_one_place() -> None:
    parsed = parse_settings({"max_samples": "0", "lora_r": 8.0, "epochs": "1.5", "train_on_eos": "false",
                             "target_modules": "q_proj, v_proj", "seed": None, "strategy": ""})
    assert parsed == {"max_samples": None, "lora_r": 8, "epochs": 1.5, "train_on_eos": False,
                      "target_modules": ("q_proj", "v_proj")}
    assert training_config("quick", max_samples=0).max_samples is None  # 0: every sample
    assert training_config("quick", max_samples=300.0).max_samples == 300
    for values, says in [({"candidates": 53}, "candidates must be a whole number from 1 to 52"),
                         ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
                         ({"learning_rate": float("nan")}, "learning_rate must be"),
                         ({"batch_size": 10**6}, "batch_size must be a whole number from 1 to 65536"),
                         ({"sample_mode": "all"}, "sample mode 'all' is not one of"),
                         ({"target_modules": ","}, "target_modules is empty")]:
        with pytest.raises(ValueError, match=says):
            training_config("quick", **values)
    with pytest.raises(ValueError, match="unknown training setting"):
        setting("learning_rte")


def test_the_job_hand_over_file_round_trips_and_flags_beside_it_win(tmp_path: Path) -> None:
    config = training_config("full", max_samples=0, lora_r=4, target_modules="q_proj,v_proj", train_on_eos=False)
    assert TrainConfig.from_json(json.loads(json.dumps(config.to_json()))) == config
    handed = tmp_path / "config.json"
    handed.write_text(json.dumps(config.to_json()))
    args = _train_parser().parse_args(["train", "--name", "x", "--config", str(handed), "--lora-r", "8"])
    assert config_from_args(args) == training_config("full", max_samples=0, lora_r=8,
                                                     target_modules="q_proj,v_proj", train_on_eos=False)
    args = _train_parser().parse_args(["train", "--name", "x", "--max-samples", "0", "--no-train-on-eos"])
    from_flags = config_from_args(args)
    assert from_flags.max_samples is None and from_flags.train_on_eos is False
    handed.write_text(json.dumps({**config.to_json(), "lora_r": -1}))
    args = _train_parser().parse_args(["train", "--name", "x", "--config", str(handed)])
    with pytest.raises(ValueError, match="lora_r must be a whole number from 1 to 4096"):
        config_from_args(args)


def test_a_bad_flag_stops_at_parsing_with_exit_status_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as stopped:
        _train_parser().parse_args(["train", "--name", "x", "--lora-dropout", "2"])
    assert stopped.value.code == 2
    assert "lora_dropout must be in [0, 1), got 2.0" in capsys.readouterr().err


def test_settings_saved_under_the_old_preset_name_are_read_and_the_new_name_is_written(tmp_path: Path) -> None:
    """Manifests and config files written before the rename say "prompt_preset"; they still load, as "preset"."""
    new = training_config("quick", preset="llamarec_after").to_json()
    assert new["preset"] == "llamarec_after" and "prompt_preset" not in new
    old = {("prompt_preset" if name == "preset" else name): value for name, value in new.items()}
    assert TrainConfig.from_json(old).preset == "llamarec_after"
    manifest = tmp_path / "manifest.json"  # an older adapter's manifest: its "training" block is a --config file
    manifest.write_text(json.dumps({"preset": "llamarec_after", "training": old}))
    handed = tmp_path / "config.json"
    handed.write_text(json.dumps(json.loads(manifest.read_text())["training"]))
    args = _train_parser().parse_args(["train", "--name", "x", "--config", str(handed)])
    assert config_from_args(args) == training_config("quick", preset="llamarec_after")
    assert TrainConfig.from_json({**old, "preset": "seed"}).preset == "seed"  # both given: the new name wins


def test_the_movielens_preset_is_selectable_like_quick_and_full() -> None:
    movielens = training_config("movielens")
    assert (movielens.text_field, movielens.history_items, movielens.learning_rate, movielens.max_samples,
            movielens.eval_every, movielens.preset, movielens.candidates, movielens.candidate_source) == (
        "title_count", 2, 2e-3, 384, 0, "seed_after", 20, "random")
    args = _train_parser().parse_args(["train", "--name", "ml", "--training-preset", "movielens", "--lr", "1e-3"])
    assert config_from_args(args) == training_config("movielens", learning_rate=1e-3)
    assert finetune.fill_preset("movielens") == [getattr(movielens, name) for name in finetune.FORM_FIELDS]
