"""Fine-tuning mechanics on tiny models: samples, loss, saved adapters, events, cancel and killed runs."""

from __future__ import annotations

import copy
import json
import math
import os
import signal
import subprocess
import time

import pytest
import torch
from conftest import (
    build_tiny_llama,
    cli_command,
    cli_env,
    inference_only_system,
    make_toy_dataset,
    tiny_config,
    tiny_loaded,
)

from rerank_core.adapters import MANIFEST_FILE, AdapterError, check_adapter, list_adapters, remove_stale
from rerank_core.alignment import TemplateMismatch
from rerank_core.compare import compare_systems, comparison_table
from rerank_core.inspector import Inspector, InspectSettings
from rerank_core.labels import IGNORE_INDEX
from rerank_core.progress import CancelFlag, read_events
from rerank_core.prompts import get_preset
from rerank_core.training.config import TRAINING_PRESETS, TrainConfig, training_config
from rerank_core.training.run import train_adapter
from rerank_core.training.samples import build_training_samples, label_samples

MISMATCH_TEMPLATE = inference_only_system(
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + "
    "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


@pytest.fixture(autouse=True)
def one_torch_thread():
    """Tiny models gain nothing from a second thread; on a shared 2-core machine its spin-waits cost seconds."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# -- samples ----------------------------------------------------------------------------------


def test_samples_come_from_the_training_sequence_with_untouched_negatives(smol_tokenizer):
    dataset = make_toy_dataset()
    config = tiny_config(max_samples=None)
    samples, dropped = build_training_samples(dataset, smol_tokenizer, config)
    # Every prefix: a training sequence of n items gives n - 1 (history, target) pairs.
    assert len(samples) == sum(len(dataset.training_sequence(user)) - 1 for user in dataset.users)
    assert dropped == {"prompt_too_long": 0}
    for sample in samples:
        sequence = dataset.training_sequence(sample.user_id)
        assert sample.history == tuple(sequence[:sample.position]) and sample.target == sequence[sample.position]
        negatives = set(sample.candidates.item_ids) - {sample.target}
        assert not negatives & dataset.touched(sample.user_id)  # never an item the user ever touched
        assert sample.candidates.item_ids[sample.candidates.target_index] == sample.target
        assert f"{dataset.text(sample.target)} ({sample.answer_letter})" in sample.prompt.text

    split_config = tiny_config(max_samples=None, sample_mode="random_split")
    per_user, _ = build_training_samples(dataset, smol_tokenizer, split_config)
    assert sorted(sample.user_id for sample in per_user) == dataset.users  # one split point per user
    again, _ = build_training_samples(dataset, smol_tokenizer, split_config)
    assert [(s.user_id, s.position, s.candidates) for s in again] == \
        [(s.user_id, s.position, s.candidates) for s in per_user]
    other_seed, _ = build_training_samples(dataset, smol_tokenizer, tiny_config(
        max_samples=None, sample_mode="random_split", seed=1))
    assert [s.candidates for s in other_seed] != [s.candidates for s in per_user]

    limited, _ = build_training_samples(dataset, smol_tokenizer, tiny_config(max_samples=7))
    assert len(limited) == 7


def test_examples_without_a_loss_token_are_dropped_and_counted(smol_tokenizer):
    samples, _ = build_training_samples(make_toy_dataset(), smol_tokenizer, tiny_config(max_samples=6))
    shortest = min(sample.prompt.token_count for sample in samples)
    examples, dropped = label_samples(smol_tokenizer, samples, tiny_config(), max_length=shortest)
    assert dropped["no_loss_token"] >= 1
    assert len(examples) + dropped["no_loss_token"] == len(samples)
    assert all(example.loss_tokens > 0 for example in examples)


def test_config_rejects_unknown_settings():
    with pytest.raises(ValueError, match="sample mode"):
        training_config("quick", sample_mode="every_item")
    with pytest.raises(ValueError, match="unknown training setting"):
        training_config("quick", learning_rte=1e-3)
    with pytest.raises(ValueError, match="training preset"):
        training_config("slow")
    # None keeps the preset's value.
    assert training_config("quick", max_samples=None).max_samples == TRAINING_PRESETS["quick"].max_samples
    assert training_config("quick").uniform_loss == pytest.approx(math.log(20))


# -- the loss ---------------------------------------------------------------------------------


def test_answer_loss_on_a_left_padded_batch_equals_the_model_loss_per_example(smol_tokenizer):
    """The collator only pads; the logits_to_keep shortcut gives the same loss as full logits."""
    from rerank_core.training.trainer import _answer_loss, _LeftPadCollator

    samples, _ = build_training_samples(make_toy_dataset(), smol_tokenizer, tiny_config(max_samples=3))
    examples, _ = label_samples(smol_tokenizer, samples, tiny_config())
    assert len({len(example.input_ids) for example in examples}) > 1  # padding really happens
    batch = _LeftPadCollator(0)([{"input_ids": e.input_ids, "labels": e.labels} for e in examples])
    for row, example in enumerate(examples):
        real = batch["attention_mask"][row].bool()
        assert batch["input_ids"][row][real].tolist() == list(example.input_ids)
        assert batch["labels"][row][real].tolist() == list(example.labels)
        assert (batch["labels"][row][~real] == IGNORE_INDEX).all()
    model = build_tiny_llama(smol_tokenizer)
    labels = batch.pop("labels")
    with torch.no_grad():
        loss, letter_loss, _ = _answer_loss(model, batch, labels)
        per_token, letters = [], []
        for example in examples:
            ids = torch.tensor([example.input_ids])
            logits = model(input_ids=ids).logits[0, :-1].float()
            targets = torch.tensor(example.labels[1:])
            losses = torch.nn.functional.cross_entropy(logits, targets, ignore_index=IGNORE_INDEX, reduction="none")
            per_token += losses[targets != IGNORE_INDEX].tolist()
            letters.append(losses[example.prompt_length - 1].item())
    assert loss.item() == pytest.approx(sum(per_token) / len(per_token), rel=1e-4)
    assert letter_loss.tolist() == pytest.approx(letters, rel=1e-4)


# -- runs -------------------------------------------------------------------------------------


def test_training_changes_only_lora_weights_and_saves_a_plain_peft_adapter(smol_tokenizer, tmp_path):
    from peft import PeftModel
    from safetensors.torch import load_file

    loaded = tiny_loaded(smol_tokenizer)
    before = {name: tensor.clone() for name, tensor in loaded.model.state_dict().items()}
    report = train_adapter(loaded, make_toy_dataset(), tiny_config(), "only-lora", root=tmp_path)
    assert report.status == "done" and report.samples == 12 and report.steps == 3
    after = loaded.model.state_dict()
    assert after.keys() == before.keys()  # LoRA layers removed again: the caller's base model is intact
    assert all(torch.equal(before[name], after[name]) for name in before)

    folder = tmp_path / "only-lora"
    weights = load_file(str(folder / "adapter_model.safetensors"))
    assert weights and all(".lora_A." in key or ".lora_B." in key for key in weights)
    assert any(key.endswith("q_proj.lora_B.weight") for key in weights)
    assert all(weights[key].abs().sum() > 0 for key in weights if ".lora_B." in key)  # B starts at zero

    # A plain PEFT load (no rerank_core involved) gives a model whose output differs from the base.
    base = build_tiny_llama(smol_tokenizer)
    ids = torch.tensor([smol_tokenizer("Title 1 (A)")["input_ids"]])
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        tuned = PeftModel.from_pretrained(base, str(folder)).eval()
        assert not torch.allclose(tuned(input_ids=ids).logits, base_logits)


def test_loss_decreases_on_a_tiny_memorisable_set(smol_tokenizer, tmp_path):
    loaded = tiny_loaded(smol_tokenizer)
    # Frozen tied embeddings at the default 0.02 scale cap every logit near 0.6: the loss could not move
    # far from ln(vocabulary). Scaled up, the LoRA layers can steer the answer toward the letter.
    with torch.no_grad():
        loaded.model.get_input_embeddings().weight.mul_(25)
    events: list[dict] = []
    config = tiny_config(max_samples=4, batch_size=4, epochs=30, learning_rate=1e-2, lora_dropout=0.0)
    report = train_adapter(loaded, make_toy_dataset(), config, "memorise", root=tmp_path, on_event=events.append)
    losses = [event["letter_loss"] for event in events if event["event"] == "step"]
    assert len(losses) == 30
    assert max(losses[-3:]) < 0.5 * min(losses[:3])
    assert report.final_letter_loss == losses[-1]


def test_events_manifest_and_check_adapter(smol_tokenizer, tmp_path):
    loaded = tiny_loaded(smol_tokenizer)
    dataset = make_toy_dataset()
    events: list[dict] = []
    config = tiny_config(eval_users=6, eval_every=2, max_samples=16)
    report = train_adapter(loaded, dataset, config, "with-events", root=tmp_path, on_event=events.append,
                           training_preset="quick")
    kinds = [event["event"] for event in events]
    assert kinds[0] == "start" and kinds[-1] == "done"
    steps = [event for event in events if event["event"] == "step"]
    assert [event["step"] for event in steps] == [1, 2, 3, 4]
    for event in steps:
        assert event["total_steps"] == 4 and event["uniform_loss"] == pytest.approx(math.log(5))
        assert {"total_loss", "letter_loss", "learning_rate", "epoch", "elapsed", "eta"} <= event.keys()
        # The letter loss is the one ln N bounds; the total also averages the end-of-turn tokens.
        assert event["loss_tokens"] == "letter + end-of-turn tokens" and event["total_loss"] == event["loss"]
        assert event["letter_loss"] != event["total_loss"]
    assert steps[-1]["eta"] == 0
    card = report.to_json()
    assert card["loss_line"] == (f"letter loss {steps[-1]['letter_loss']:.4f} (ln N = {math.log(5):.4f}); "
                                 f"total loss {steps[-1]['total_loss']:.4f} (letter + end-of-turn tokens)")
    assert set(card["loss_labels"]) == {"letter_loss", "total_loss"}
    validations = [event for event in events if event["event"] == "validation"]
    assert [event["step"] for event in validations] == [0, 2, 4]  # before, every 2 steps, after
    assert all(0 <= event["NDCG@10"] <= 1 and 0 <= event["Recall@10"] <= 1 for event in validations)

    manifest = json.loads((tmp_path / "with-events" / MANIFEST_FILE).read_text())
    assert manifest["base_model"] == {"name": loaded.name, "path": loaded.path, "reference": "",
                                      "fingerprint": loaded.fingerprint, "weights_fingerprint": "",
                                      "chat_template": None, "dtype": "float32"}
    assert manifest["preset"] == "seed_after" and manifest["strategy"] == "as_trained"
    assert manifest["dataset"]["fingerprint"] == dataset.fingerprint()
    assert manifest["training"] == config.to_json() and manifest["training_preset"] == "quick"
    assert {"torch", "transformers", "peft"} <= manifest["versions"].keys()
    assert manifest["validation"]["before"] == report.validation["before"]
    assert manifest["validation"]["after"] == report.validation["after"]
    assert manifest["report"]["samples"] == 16 and manifest["report"]["dropped"] == report.dropped
    assert manifest["created"]

    assert check_adapter(loaded, "with-events", tmp_path).preset == get_preset("seed_after")
    other_base = tiny_loaded(smol_tokenizer, name="other-base")
    other_base.fingerprint = "0123456789abcdef"
    with pytest.raises(AdapterError, match=r"with-events.*tiny-llama.*other-base"):
        check_adapter(other_base, "with-events", tmp_path)


def test_existing_name_needs_overwrite_and_bad_names_are_refused(smol_tokenizer, tmp_path):
    loaded, dataset = tiny_loaded(smol_tokenizer), make_toy_dataset()
    train_adapter(loaded, dataset, tiny_config(max_samples=4), "taken", root=tmp_path)
    first = (tmp_path / "taken" / MANIFEST_FILE).read_text()
    with pytest.raises(AdapterError, match="already exists"):
        train_adapter(loaded, dataset, tiny_config(max_samples=4), "taken", root=tmp_path)
    with pytest.raises(AdapterError, match="not allowed"):
        train_adapter(loaded, dataset, tiny_config(max_samples=4), "../escape", root=tmp_path)
    train_adapter(loaded, dataset, tiny_config(max_samples=4, seed=3), "taken", root=tmp_path, overwrite=True)
    assert (tmp_path / "taken" / MANIFEST_FILE).read_text() != first
    assert [info.name for info in list_adapters(tmp_path)] == ["taken"]
    assert sorted(os.listdir(tmp_path)) == ["taken"]


def test_template_mismatch_fails_the_run_and_leaves_nothing(smol_tokenizer, tmp_path):
    broken = copy.deepcopy(smol_tokenizer)
    broken.chat_template = MISMATCH_TEMPLATE
    events: list[dict] = []
    with pytest.raises(TemplateMismatch, match="differ at token"):
        train_adapter(tiny_loaded(broken), make_toy_dataset(), tiny_config(), "mismatch", root=tmp_path,
                      on_event=events.append)
    assert events[-1]["event"] == "failed" and "TemplateMismatch" in events[-1]["error"]
    assert os.listdir(tmp_path) == []


def test_cancel_file_stops_at_the_next_step_and_leaves_nothing(smol_tokenizer, tmp_path):
    root, cancel_file = tmp_path / "adapters", tmp_path / "cancel"
    events: list[dict] = []

    def on_event(event: dict) -> None:
        events.append(event)
        if event["event"] == "step" and event["step"] == 2:
            cancel_file.touch()

    loaded = tiny_loaded(smol_tokenizer)
    report = train_adapter(loaded, make_toy_dataset(), tiny_config(max_samples=40), "cancelled", root=root,
                           on_event=on_event, cancel=CancelFlag(cancel_file))
    assert report.status == "cancelled" and report.path is None
    assert [event["step"] for event in events if event["event"] == "step"] == [1, 2, 3]
    assert events[-1]["event"] == "cancelled" and "cancel file" in events[-1]["reason"]
    assert list_adapters(root) == [] and os.listdir(root) == []
    assert not any(".lora_" in name for name in loaded.model.state_dict())


def test_sigterm_stops_the_run_and_leaves_nothing(smol_tokenizer, tmp_path):
    events: list[dict] = []

    def on_event(event: dict) -> None:
        events.append(event)
        if event["event"] == "step" and event["step"] == 1:
            os.kill(os.getpid(), signal.SIGTERM)

    cancel = CancelFlag()
    with cancel.handling_signals():
        report = train_adapter(tiny_loaded(smol_tokenizer), make_toy_dataset(), tiny_config(max_samples=40),
                               "terminated", root=tmp_path, on_event=on_event, cancel=cancel)
    assert report.status == "cancelled" and report.steps == 2
    assert cancel.reason == "SIGTERM received"
    assert os.listdir(tmp_path) == []
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL  # the handler is gone again


def test_cli_run_writes_events_and_a_killed_run_leaves_nothing_listed(tiny_model_folder, toy_data_folder,
                                                                       tmp_path):
    """A SIGKILLed CLI run leaves only a hidden staging folder, which remove_stale deletes."""
    root, events_file = tmp_path / "adapters", tmp_path / "events.jsonl"
    command = cli_command(tiny_model_folder, toy_data_folder, root, "--name", "killed", "--events",
                          str(events_file), "--max-samples", "64", "--epochs", "50", "--batch-size", "2")
    process = subprocess.Popen(command, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 60
        while not any(event["event"] == "step" for event in read_events(events_file)):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no step event within 60 s"
            time.sleep(0.2)
        events = read_events(events_file)
        assert events[0]["event"] == "start" and events[0]["adapter"] == "killed"
        staging = [name for name in os.listdir(root) if name.startswith(".staging-")]
        assert len(staging) == 1
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
    assert list_adapters(root) == []
    assert os.listdir(root) == staging
    assert remove_stale(root) == staging
    assert os.listdir(root) == []


def test_cli_help_names_every_training_setting(capsys):
    from rerank_core.cli.main import main

    with pytest.raises(SystemExit) as exited:
        main(["train", "--help"])
    assert exited.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    options = {"lora_r": "--lora-r", "lora_alpha": "--lora-alpha", "lora_dropout": "--lora-dropout",
               "target_modules": "--target-modules", "learning_rate": "--lr", "epochs": "--epochs",
               "batch_size": "--batch-size", "grad_accumulation": "--grad-accumulation", "warmup": "--warmup",
               "max_samples": "--max-samples", "seed": "--seed", "max_prompt_tokens": "--max-prompt-tokens",
               "history_items": "--history-items", "preset": "--preset", "strategy": "--strategy",
               "candidates": "--candidates", "candidate_source": "--candidate-source", "text_field": "--text-field",
               "sample_mode": "--sample-mode", "eval_every": "--eval-every", "eval_users": "--eval-users",
               "train_on_eos": "--train-on-eos", "template_kwargs": "--template-kwargs"}
    assert options.keys() == TrainConfig.__dataclass_fields__.keys()
    for option in options.values():
        assert f"{option} " in text
    assert "(quick: 0, full: 1536)" in text and "ln(N)" in text


def test_cli_in_process_run_publishes_the_adapter(tiny_model_folder, toy_data_folder, tmp_path, capsys):
    from rerank_core.cli.main import main

    root, events_file = tmp_path / "adapters", tmp_path / "events.jsonl"
    status = main(["train", "--model", str(tiny_model_folder), "--data", str(toy_data_folder), "--dtype", "fp32",
                   "--device", "cpu", "--adapters-dir", str(root), "--name", "cli-run", "--events",
                   str(events_file), "--max-samples", "8", "--candidates", "5", "--max-prompt-tokens", "160",
                   "--eval-users", "0", "--lora-r", "4", "--target-modules", "q_proj,v_proj",
                   "--no-train-on-eos", "--preset", "llamarec_after"])
    assert status == 0
    printed = capsys.readouterr()
    assert '"status": "done"' in printed.out
    # What the item text costs, printed before the run starts.
    assert "item text 'title': median " in printed.err and "prompt tokens" in printed.err
    assert printed.err.index("item text 'title'") < printed.err.index("[samples]")
    events = read_events(events_file)
    assert events[-1]["event"] == "done" and events[-1]["report"]["samples"] == 8
    manifest = json.loads((root / "cli-run" / MANIFEST_FILE).read_text())
    assert manifest["preset"] == "llamarec_after"
    assert manifest["training"]["lora_r"] == 4 and manifest["training"]["target_modules"] == ["q_proj", "v_proj"]
    assert manifest["training"]["train_on_eos"] is False and manifest["training"]["candidates"] == 5

    status = main(["train", "--model", str(tiny_model_folder), "--data", str(toy_data_folder), "--adapters-dir",
                   str(root), "--name", "cli-run", "--events", str(events_file), "--no-progress"])
    assert status == 2  # the name is taken and --overwrite was not given: refused before loading
    assert read_events(events_file)[-1]["event"] == "failed"
    assert "already exists" in read_events(events_file)[-1]["error"]


def test_compare_systems_pairs_each_adapter_with_the_base(smol_tokenizer, tmp_path):
    loaded, dataset = tiny_loaded(smol_tokenizer), make_toy_dataset()
    train_adapter(loaded, dataset, tiny_config(max_samples=8), "compared", root=tmp_path)
    inspector = Inspector(dataset, loaded, adapters_root=str(tmp_path))
    settings = InspectSettings(preset=get_preset("seed"), candidates=tiny_config().candidate_config(),
                               max_prompt_tokens=160)
    users = dataset.users[:10]
    per_user, summary = compare_systems(inspector, users, settings, ["base", "compared"])
    # The adapter is scored with the preset it was trained with, the base with the one asked for and, for a
    # like-for-like pair, with the adapter's too.
    assert len(per_user) == 30 and set(per_user["system"]) == {"base", "base @ seed_after", "compared"}
    assert set(per_user[per_user.system == "compared"]["preset"]) == {"seed_after"}
    assert set(summary[summary.system == "compared"]["reference"]) == {"base @ seed_after"}
    adapter_rows = summary[summary.system == "compared"]
    assert (adapter_rows.ci_low <= adapter_rows.difference + 1e-12).all()
    assert (adapter_rows.difference <= adapter_rows.ci_high + 1e-12).all()
    assert summary[summary.system == "base"]["difference"].isna().all()
    table = comparison_table(summary)
    assert table.count("\n") == 4 and "| compared | seed_after | base @ seed_after" in table


@pytest.mark.slow
def test_real_model_trains_a_few_steps_and_the_adapter_loads_back(tmp_path):
    from peft import PeftModel

    from rerank_core.data.loaders import load_dataset
    from rerank_core.models import EMBEDDED_MODEL_NAME, load_model
    from rerank_core.scoring import score_token_ids

    loaded, dataset = load_model(), load_dataset()
    config = training_config("quick", max_samples=4, batch_size=2, eval_users=2, eval_every=0, warmup=0.0)
    report = train_adapter(loaded, dataset, config, "real-few-steps", root=tmp_path)
    assert report.status == "done" and report.steps == 2 and report.samples == 4
    assert math.isfinite(report.final_letter_loss)
    info = check_adapter(loaded, "real-few-steps", tmp_path)
    assert info.base_name == EMBEDDED_MODEL_NAME and info.preset == get_preset("seed_after")

    inspector = Inspector(dataset, loaded, adapters_root=str(tmp_path))
    prepared = inspector.prepare(dataset.users[0], InspectSettings(
        preset=get_preset("seed_after"), candidates=config.candidate_config(),
        max_prompt_tokens=config.max_prompt_tokens))
    letter_ids = [token.token_id for token in prepared.letter_tokens]
    (base,) = score_token_ids(loaded.model, loaded.tokenizer, [prepared.token_ids], letter_ids)
    tuned_model = PeftModel.from_pretrained(loaded.model, info.path).eval()
    (tuned,) = score_token_ids(tuned_model, loaded.tokenizer, [prepared.token_ids], letter_ids)
    assert base.letter_logits != tuned.letter_logits


def test_cli_progress_names_the_letter_loss_beside_ln_n_and_the_total(capsys):
    from rerank_core.cli.train import _ProgressBar

    bar = _ProgressBar(True)
    bar({"event": "stage", "stage": "training", "total_steps": 2})
    bar({"event": "step", "step": 1, "total_steps": 2, "loss": 0.8, "total_loss": 0.8, "letter_loss": 2.44,
         "uniform_loss": math.log(20)})
    bar({"event": "done"})
    err = capsys.readouterr().err
    assert "letter_loss=2.440, lnN=2.996, total_loss=0.800" in err
