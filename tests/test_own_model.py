"""A model of one's own in the app: a reference typed beside the picker (checked without loading, one clear toast
when wrong), and a chat template given in the page that Inspect, the audit and a fine-tune all use."""

from __future__ import annotations

import contextlib
import json
import threading
from pathlib import Path

import gradio as gr
import pytest
from app_helpers import TINY_TRAINING, make_context, wait_for_job
from conftest import save_tiny_model

from rerank_app import own_model
from rerank_app.pickers import Pickers, endpoint
from rerank_app.tabs import inspect as inspect_tab
from rerank_core.adapters import MANIFEST_FILE
from rerank_core.inspector import BASE

# The letter right after "(": another answer slot and other letter tokens than SmolLM2's ChatML template gives.
LETTER_FIRST = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: ({% endif %}")


@pytest.fixture(scope="module")
def context(tmp_path_factory: pytest.TempPathFactory, smol_tokenizer):
    return make_context(tmp_path_factory.mktemp("own-model"), smol_tokenizer)


def test_a_typed_folder_joins_the_picker_and_scores(context, smol_tokenizer, tmp_path: Path) -> None:
    folder = save_tiny_model(smol_tokenizer, tmp_path / "my-finetune")
    picker, message = own_model.add_model(context, f"  {folder}  ")
    assert picker.value == "my-finetune" and ("my-finetune", "my-finetune") in picker.choices
    assert "my-finetune" in message
    assert own_model.add_model(context, str(folder))[0].value == "my-finetune"  # the same reference: one entry
    shown = inspect_tab.inspect(context, Pickers(dataset="toy", model="my-finetune", count=5), BASE, "u03")
    assert shown[0]  # scored on the new model


@pytest.mark.parametrize(("reference", "says"), [
    ("", "type a model folder"),
    ("acme/not-cached", "'acme/not-cached' is not in the Hugging Face cache"),
    ("/no/such/folder", "/no/such/folder does not exist"),
    ("/no/such/model.gguf", "GGUF file /no/such/model.gguf does not exist"),
    ("bad\x00path", "is not a path or hub id"),
])
def test_a_bad_reference_is_one_toast_and_nothing_joins(context, reference: str, says: str, tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    before = context.models.names
    with pytest.raises(gr.Error) as refused:
        endpoint(own_model.add_model, context)(reference)
    assert says in str(refused.value.message) and "Traceback" not in str(refused.value.message)
    assert context.models.names == before


def test_a_folder_without_weights_is_refused_before_loading(context, tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(gr.Error, match=r"no \*\.safetensors weights"):
        endpoint(own_model.add_model, context)(str(tmp_path))


def test_a_pasted_template_overrides_the_audit_on_the_same_weights(context) -> None:
    picker, message = own_model.use_template(context, "tiny-llama", None, LETTER_FIRST, "seed", "", "as_trained")
    variant = picker.value
    assert variant.startswith("tiny-llama + template pasted ") and variant in context.models.names
    base, overridden = context.models.loaded("tiny-llama"), context.models.loaded(variant)
    assert overridden.model is base.model and overridden.adapters is base.adapters  # one copy of the weights
    assert overridden.tokenizer.chat_template == LETTER_FIRST != base.tokenizer.chat_template
    assert context.models.gate(variant) is context.models.gate("tiny-llama")
    assert "Letter audit" in message and "the model's own template" in message
    pickers = Pickers(dataset="toy", model="tiny-llama", count=5)
    own = dict(zip(inspect_tab.OUTPUT_NAMES, inspect_tab.inspect(context, pickers, BASE, "u03"), strict=True))
    new = dict(zip(inspect_tab.OUTPUT_NAMES, inspect_tab.inspect(
        context, Pickers(dataset="toy", model=variant, count=5), BASE, "u03"), strict=True))
    assert "im_start" in own["prompt"] and "im_start" not in new["prompt"]
    # The audit follows the template: this one's "(" ends the generation prompt where training has the letter.
    assert new["audit_note"] != own["audit_note"] and "generation prompt left out" in new["prompt"]
    # Picking the template again on the variant gives the same entry, not a variant of a variant.
    assert own_model.use_template(context, variant, None, LETTER_FIRST, "seed", "", "as_trained")[0].value == variant


def test_an_uploaded_template_that_does_not_render_is_one_toast(context, tmp_path: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message['content'] }\n")
    handler = endpoint(own_model.use_template, context)
    with pytest.raises(gr.Error, match=r"chat template broken.jinja does not render \(line 1\)"):
        handler("tiny-llama", str(broken), "", "seed", "", "as_trained")
    with pytest.raises(gr.Error, match=r"upload a \.jinja file or paste"):
        handler("tiny-llama", None, "  ", "seed", "", "as_trained")


def test_a_fine_tune_from_the_app_trains_with_the_template_and_records_it(context) -> None:
    variant = own_model.use_template(context, "tiny-llama", None, LETTER_FIRST, "seed", "", "as_trained")[0].value
    reference, template = context.models.train_reference(variant)
    assert Path(reference).is_absolute() and Path(template).read_text() == LETTER_FIRST
    status = context.finetune.start("with-template", "toy", variant, "quick", TINY_TRAINING)
    job = json.loads((context.finetune.jobs.runs_root / status.job_id / "job.json").read_text())
    assert job["argv"][job["argv"].index("--chat-template") + 1] == template
    done = wait_for_job(context.finetune.jobs, lambda status: not status.active, timeout=300)
    assert done.state == "done", done.message + done.log_tail
    manifest = json.loads((context.config.adapters_root / "with-template" / MANIFEST_FILE).read_text())
    recorded = manifest["base_model"]["chat_template"]
    assert recorded["path"] == template
    assert recorded["sha256"] == context.models.loaded(variant).chat_template.sha256
    # The adapter belongs to the checkpoint: offered on the model and on its template variant alike.
    assert "with-template" in context.models.adapter_names("tiny-llama")
    assert "with-template" in context.models.adapter_names(variant)


def test_an_app_others_reach_takes_typed_paths_only_inside_its_models_dirs(context, smol_tokenizer,
                                                                          tmp_path: Path, monkeypatch) -> None:
    from dataclasses import replace

    from rerank_app.server import typed_model_roots

    assert typed_model_roots("127.0.0.1", [str(tmp_path)]) is None  # this machine only: any path
    allowed = tmp_path / "models"
    allowed.mkdir()
    assert typed_model_roots("0.0.0.0", [str(allowed)]) == (allowed,)
    inside = save_tiny_model(smol_tokenizer, allowed / "shared-model")
    outside = save_tiny_model(smol_tokenizer, tmp_path / "private-model")
    monkeypatch.setattr(context.models, "config", replace(context.models.config, typed_model_roots=(allowed,)))
    before = context.models.names
    answers = []
    for probe in (outside, tmp_path / "no-such-folder", allowed / ".." / "private-model"):
        with pytest.raises(gr.Error) as refused:
            endpoint(own_model.add_model, context)(str(probe))
        answers.append(refused.value.message)
    assert len(set(answers)) == 1 and "only inside its --models-dir folders (models)" in answers[0]  # no probing
    assert context.models.names == before
    assert own_model.add_model(context, str(inside))[0].value == "shared-model"


def test_a_template_past_the_model_cap_is_refused_and_saves_no_file(smol_tokenizer, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from rerank_app import context as app_module

    context = make_context(tmp_path, smol_tokenizer)
    monkeypatch.setattr(app_module, "MAX_MODEL_ENTRIES", len(context.models.names) + 1)
    context.models.with_template("tiny-llama", LETTER_FIRST, "first")  # the cap's last place
    saved = sorted((context.config.upload_root / ".templates").iterdir())
    handler = endpoint(own_model.use_template, context)
    with pytest.raises(gr.Error, match="entries already: restart the app to add more"):
        handler("tiny-llama", None, LETTER_FIRST + "{# another #}", "seed", "", "as_trained")
    assert sorted((context.config.upload_root / ".templates").iterdir()) == saved


def test_two_templates_racing_for_the_last_place_leave_one_entry_and_one_file(smol_tokenizer, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Both calls are let through to loading the model together when they can be: the first to reserve the last
    place gets it, the other is refused before it saves anything (before, both saved and the second was refused)."""
    from rerank_app import context as app_module

    context = make_context(tmp_path, smol_tokenizer)
    context.models.loaded("tiny-llama")
    monkeypatch.setattr(app_module, "MAX_MODEL_ENTRIES", len(context.models.names) + 1)
    both_checked = threading.Barrier(2)
    real_loaded = context.models.loaded

    def loaded_once_both_checked(name: str):
        with contextlib.suppress(threading.BrokenBarrierError):
            both_checked.wait(timeout=2)  # only a call past the room check gets here
        return real_loaded(name)

    monkeypatch.setattr(context.models, "loaded", loaded_once_both_checked)
    answers: dict[str, str] = {}

    def add(text: str) -> None:
        try:
            answers[text] = context.models.with_template("tiny-llama", text, "pasted")
        except app_module.SessionError as error:
            answers[text] = f"refused: {error}"

    threads = [threading.Thread(target=add, args=(LETTER_FIRST + f"{{# {number} #}}",)) for number in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    refused = [answer for answer in answers.values() if answer.startswith("refused")]
    assert len(answers) == 2 and len(refused) == 1 and "entries already" in refused[0], answers
    assert len(list((context.config.upload_root / ".templates").iterdir())) == 1
    assert len(context.models.names) == app_module.MAX_MODEL_ENTRIES


def test_a_template_that_fails_after_its_place_was_held_gives_the_place_back(smol_tokenizer, tmp_path: Path,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    from rerank_app import context as app_module

    context = make_context(tmp_path, smol_tokenizer)
    monkeypatch.setattr(app_module, "MAX_MODEL_ENTRIES", len(context.models.names) + 1)
    real_loaded = context.models.loaded
    monkeypatch.setattr(context.models, "loaded", lambda name: (_ for _ in ()).throw(OSError("disk gone")))
    with pytest.raises(OSError, match="disk gone"):
        context.models.with_template("tiny-llama", LETTER_FIRST, "pasted")
    monkeypatch.setattr(context.models, "loaded", real_loaded)
    assert context.models.with_template("tiny-llama", LETTER_FIRST, "pasted") in context.models.names  # not full
