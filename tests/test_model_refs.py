"""Model references as users have them: a hub id from a fake local HF cache, GGUF files written here, a chat template
given apart, adapter provenance across GGUF and folder, and one clear line for each bad reference."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from app_helpers import make_adapter
from conftest import make_toy_dataset, save_tiny_model, write_csv_dataset
from gguf_helpers import write_tiny_gguf

from rerank_core import model_refs
from rerank_core.adapters import MANIFEST_FILE, AdapterError, base_model_record, check_adapter
from rerank_core.cli import main as cli
from rerank_core.model_refs import ModelError, hf_hub_cache, parse_model_ref, read_gguf_header
from rerank_core.models import load_model, load_tokenizer, weights_fingerprint

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        code = cli.main(argv)
    except SystemExit as stopped:
        code = stopped.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def model_folder(smol_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(smol_tokenizer, tmp_path_factory.mktemp("refs-model"))


@pytest.fixture
def hub_cache(model_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A Hugging Face cache laid out as from_pretrained leaves it: blobs behind snapshot symlinks, refs/main."""
    cache = tmp_path / "hub"
    repo = cache / "models--acme--tiny-chat"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (repo / "blobs").mkdir()
    for file in model_folder.iterdir():
        blob = repo / "blobs" / f"blob-{file.name}"
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Conversions land in the test's folder, never in the user's cache."""
    cache = tmp_path / "rerank-cache"
    monkeypatch.setenv("RERANK_INSPECTOR_CACHE", str(cache))
    return cache


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_gguf(tmp_path_factory.mktemp("gguf") / "tiny-chat.Q8.gguf")


def test_each_kind_of_reference_is_recognised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "acme" / "local").mkdir(parents=True)
    assert parse_model_ref(None).kind == "embedded"
    assert parse_model_ref("").kind == "embedded"
    ref = parse_model_ref("Qwen/Qwen2.5-0.5B-Instruct@v1.0")
    assert (ref.kind, ref.repo_id, ref.revision) == ("hub", "Qwen/Qwen2.5-0.5B-Instruct", "v1.0")
    assert parse_model_ref("~/models/mine.gguf").kind == "gguf"
    assert parse_model_ref(str(tmp_path / "acme" / "local")).kind == "folder"
    # An existing folder spelled like a hub id is the folder.
    monkeypatch.chdir(tmp_path)
    assert parse_model_ref("acme/local").kind == "folder"


def test_hf_cache_location_follows_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hf_hub_cache() == tmp_path / "hf-home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hf_hub_cache() == tmp_path / "elsewhere"


def test_hub_id_loads_from_the_local_cache(hub_cache: Path, model_folder: Path) -> None:
    loaded = load_model("acme/tiny-chat", dtype="fp32", device="cpu")
    assert loaded.name == "acme/tiny-chat" and loaded.reference == "acme/tiny-chat"
    assert Path(loaded.path) == hub_cache / "models--acme--tiny-chat" / "snapshots" / COMMIT
    assert loaded.weights_fingerprint == weights_fingerprint(model_folder)
    # A revision: the commit (or its prefix) picks the snapshot.
    assert Path(load_tokenizer(f"acme/tiny-chat@{COMMIT[:8]}").name_or_path).name == COMMIT


def test_hub_id_through_hf_home(hub_cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "hf-home"
    home.mkdir()
    shutil.move(str(hub_cache), home / "hub")
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(home))
    assert load_tokenizer("acme/tiny-chat").get_vocab()


def test_missing_hub_id_names_the_id_and_the_cache(hub_cache: Path, tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ModelError) as caught:
        load_model("acme/not-there", device="cpu")
    message = str(caught.value)
    assert "'acme/not-there'" in message and str(hub_cache) in message and "huggingface-cli download" in message
    with pytest.raises(ModelError, match=r"revision 'v9' is not in the Hugging Face cache .*refs: main"):
        load_tokenizer("acme/tiny-chat@v9")
    data = write_csv_dataset(make_toy_dataset(), tmp_path / "data")
    code, _, err = run_cli(["show", "--data", str(data), "--model", "acme/not-there", "--user", "u01"], capsys)
    assert code == 2 and "acme/not-there" in err and "Traceback" not in err
    assert len([line for line in err.splitlines() if line.strip()]) == 1


def test_gguf_is_converted_once_and_again_when_the_file_changes(tiny_gguf: Path, tmp_path: Path,
                                                                 own_cache: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    source = shutil.copy(tiny_gguf, tmp_path / "mine.gguf")
    first = load_model(source, dtype="fp32", device="cpu")
    assert first.name == "mine.gguf" and Path(first.path).parent == own_cache / "gguf"
    assert first.model.config.hidden_size == 32 and first.tokenizer.chat_template

    def no_second_conversion(*args: object) -> None:
        raise AssertionError("converted again although the file did not change")

    monkeypatch.setattr(model_refs, "_save_gguf_model", no_second_conversion)
    again = load_model(source, dtype="fp32", device="cpu")
    assert again.path == first.path
    monkeypatch.undo()
    monkeypatch.setenv("RERANK_INSPECTOR_CACHE", str(own_cache))
    write_tiny_gguf(Path(source), seed=7)  # same name, other weights: a new key
    changed = load_model(source, dtype="fp32", device="cpu")
    assert changed.path != first.path and changed.weights_fingerprint != first.weights_fingerprint


def test_a_changed_gguf_leaves_no_stale_conversion_once_the_new_one_is_published(
        tiny_gguf: Path, tmp_path: Path, own_cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = Path(shutil.copy(tiny_gguf, tmp_path / "mine.gguf"))
    (tmp_path / "other").mkdir()
    other = Path(shutil.copy(tiny_gguf, tmp_path / "other" / "mine.gguf"))
    old_model = Path(model_refs.gguf_model_folder(source))
    old_tokenizer = model_refs.gguf_tokenizer_folder(source)
    assert old_tokenizer == old_model  # the converted model's tokenizer serves
    kept = Path(model_refs.gguf_model_folder(other))  # same file name, another path: not this file's conversion
    write_tiny_gguf(source, seed=7)
    seen_while_converting: list[bool] = []
    convert = model_refs._save_gguf_model

    def watching(*args: object) -> None:
        seen_while_converting.append(old_model.is_dir())  # the old copy stays readable until the new one is in
        convert(*args)

    monkeypatch.setattr(model_refs, "_save_gguf_model", watching)
    new_model = Path(model_refs.gguf_model_folder(source))
    assert seen_while_converting == [True]
    assert new_model.is_dir() and not old_model.exists() and kept.is_dir()
    assert sorted(path.name for path in (own_cache / "gguf").iterdir() if not path.name.startswith(".")) == \
        sorted([new_model.name, kept.name])
    assert not list((own_cache / "gguf").glob(".removing-*"))


def test_what_a_kill_cut_short_is_removed_by_the_next_conversion(
        tiny_gguf: Path, tmp_path: Path, own_cache: Path) -> None:
    """A removal or a conversion whose process died leaves a folder named after that pid; a live pid's stays."""
    source = Path(shutil.copy(tiny_gguf, tmp_path / "mine.gguf"))
    base = Path(model_refs.gguf_model_folder(source)).parent
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    abandoned = [base / f".removing-{dead.pid}-mine-old-fp32", base / f".converting-{dead.pid}-k2j4"]
    in_progress = [base / f".removing-{os.getpid()}-mine-older-fp32", base / f".converting-{os.getpid()}-x8q1"]
    for folder in abandoned + in_progress:
        folder.mkdir()
        (folder / "model.safetensors").write_bytes(b"x")
    write_tiny_gguf(source, seed=7)
    model_refs.gguf_model_folder(source)  # a new conversion, which also removes the stale one
    assert not any(folder.exists() for folder in abandoned)
    assert all(folder.is_dir() for folder in in_progress)  # their owner is alive: still at work


def test_gguf_dtype_is_the_chosen_one(tiny_gguf: Path) -> None:
    loaded = load_model(tiny_gguf, dtype="bf16", device="cpu")
    assert loaded.model.dtype == torch.bfloat16 and Path(loaded.path).name.endswith("-bf16")


def test_vocab_only_gguf_serves_audit_without_scores(smol_tokenizer, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    vocab = write_tiny_gguf(tmp_path / "vocab.gguf", vocab_only=True)
    assert read_gguf_header(vocab).tensor_count == 0
    tokenizer = load_tokenizer(vocab)
    assert tokenizer.get_vocab() == smol_tokenizer.get_vocab()
    code, out, _ = run_cli(["audit", "--tokenizer", str(vocab), "--candidates", "5"], capsys)
    assert code == 0 and "letters" in out
    with pytest.raises(ModelError, match=r"vocabulary-only .* pass it as --tokenizer"):
        load_model(vocab, device="cpu")


def test_gguf_of_an_unsupported_architecture_is_one_clear_line(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    odd = write_tiny_gguf(tmp_path / "odd.gguf", architecture="rwkv6", vocab_only=True)
    with pytest.raises(ModelError, match=r"architecture 'rwkv6', which transformers cannot load .* llama"):
        load_tokenizer(odd)
    code, _, err = run_cli(["audit", "--tokenizer", str(odd)], capsys)
    assert code == 2 and "rwkv6" in err and len(err.strip().splitlines()) == 1
    (tmp_path / "broken.gguf").write_bytes(b"GGUF\x03\x00")
    with pytest.raises(ModelError, match=r"broken\.gguf cannot be read"):
        load_tokenizer(tmp_path / "broken.gguf")


def test_adapter_trained_on_gguf_weights_follows_the_weights(tiny_gguf: Path, smol_tokenizer,
                                                            tmp_path: Path) -> None:
    on_gguf = load_model(tiny_gguf, dtype="fp32", device="cpu")
    folder = make_adapter(on_gguf, tmp_path / "adapters", "from-gguf")
    manifest = json.loads((folder / MANIFEST_FILE).read_text())
    manifest["base_model"] = base_model_record(on_gguf)
    (folder / MANIFEST_FILE).write_text(json.dumps(manifest))
    assert manifest["base_model"]["reference"] == str(tiny_gguf)
    # The same weights from a plain folder (a copy of the conversion): accepted.
    copy = Path(shutil.copytree(on_gguf.path, tmp_path / "copied-folder"))
    same = load_model(copy, dtype="bf16", device="cpu")
    assert same.weights_fingerprint == on_gguf.weights_fingerprint  # bf16 or fp32: the same weights
    assert check_adapter(same, "from-gguf", tmp_path / "adapters").name == "from-gguf"
    # Other weights of the same shape and tokenizer: refused, naming both.
    other_gguf = write_tiny_gguf(tmp_path / "other.gguf", seed=3)
    other = load_model(other_gguf, dtype="fp32", device="cpu")
    assert other.fingerprint == on_gguf.fingerprint
    with pytest.raises(AdapterError, match="trained on other weights"):
        check_adapter(other, "from-gguf", tmp_path / "adapters")


TEMPLATE_LETTER_FIRST = (
    "{% for message in messages %}{{ message['role'] }}: {{ message['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant: ({% endif %}")


def test_chat_template_override_changes_the_audit(model_folder: Path, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "mine.jinja"
    template.write_text(TEMPLATE_LETTER_FIRST)
    audit = ["audit", "--tokenizer", str(model_folder), "--candidates", "3", "--format", "json"]
    code, own, _ = run_cli(audit, capsys)
    assert code == 0
    code, overridden, _ = run_cli([*audit, "--chat-template", str(template)], capsys)
    assert code == 0
    own_slot, new_slot = json.loads(own)["answer_slot"], json.loads(overridden)["answer_slot"]
    # SmolLM2's own template ends the generation prompt with a newline; this one ends inside "(": the slot differs.
    assert own_slot != new_slot
    tokenizer = load_tokenizer(model_folder, chat_template=template)
    assert tokenizer.chat_template == TEMPLATE_LETTER_FIRST


def test_chat_template_is_recorded_for_adapters_and_kept_out_of_the_fingerprint(model_folder: Path,
                                                                                tmp_path: Path) -> None:
    template = tmp_path / "mine.jinja"
    template.write_text(TEMPLATE_LETTER_FIRST)
    plain = load_model(model_folder, dtype="fp32", device="cpu")
    overridden = load_model(model_folder, dtype="fp32", device="cpu", chat_template=template)
    assert overridden.tokenizer.chat_template == TEMPLATE_LETTER_FIRST
    assert overridden.fingerprint == plain.fingerprint  # the same checkpoint: its adapters still apply
    record = base_model_record(overridden)["chat_template"]
    assert record["path"] == str(template) and len(record["sha256"]) == 16
    assert base_model_record(plain)["chat_template"] is None


def test_template_that_does_not_render_is_one_clear_line(model_folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message['content'] }\n")
    with pytest.raises(ModelError, match=r"chat template .*broken.jinja does not render \(line 1\)"):
        load_tokenizer(model_folder, chat_template=broken)
    code, _, err = run_cli(["audit", "--tokenizer", str(model_folder), "--chat-template", str(broken)], capsys)
    assert code == 2 and "does not render" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(ModelError, match="does not exist"):
        load_tokenizer(model_folder, chat_template=tmp_path / "absent.jinja")


def test_chat_template_is_named_in_the_report(model_folder: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "mine.jinja"
    template.write_text(TEMPLATE_LETTER_FIRST)
    data = write_csv_dataset(make_toy_dataset(), tmp_path / "data")
    report = tmp_path / "u01.html"
    code, _, err = run_cli(["show", "--data", str(data), "--model", str(model_folder), "--user", "u01", "--dtype",
                            "fp32", "--chat-template", str(template), "--format", "html", "--output", str(report)],
                           capsys)
    assert code == 0, err
    assert f"chat template {template}" in report.read_text(encoding="utf-8")


def test_training_records_reference_weights_and_template(hub_cache: Path, model_folder: Path, tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """A fine-tune of a hub id under a template given apart: the manifest says which weights and which template,
    and the adapter loads back on the same weights from a plain folder."""
    template = tmp_path / "mine.jinja"
    template.write_text(TEMPLATE_LETTER_FIRST)
    data = write_csv_dataset(make_toy_dataset(), tmp_path / "data")
    root = tmp_path / "adapters"
    code, _, err = run_cli(["train", "--model", "acme/tiny-chat", "--chat-template", str(template), "--data",
                            str(data), "--dtype", "fp32", "--device", "cpu", "--adapters-dir", str(root), "--name",
                            "on-hub", "--max-samples", "8", "--candidates", "5", "--max-prompt-tokens", "160",
                            "--eval-users", "0", "--lora-r", "4", "--target-modules", "q_proj,v_proj", "--no-progress"],
                           capsys)
    assert code == 0, err
    base = json.loads((root / "on-hub" / MANIFEST_FILE).read_text())["base_model"]
    assert base["reference"] == "acme/tiny-chat" and base["weights_fingerprint"] == weights_fingerprint(model_folder)
    assert base["chat_template"]["path"] == str(template)
    assert check_adapter(load_model(model_folder, dtype="fp32", device="cpu"), "on-hub", root).name == "on-hub"


def test_train_with_a_bad_chat_template_is_a_bad_setting_and_loads_nothing(model_folder: Path, tmp_path: Path,
                                                                          capsys: pytest.CaptureFixture[str],
                                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import rerank_core.cli.train as train_command

    def no_loading(*args: object, **kwargs: object) -> None:
        raise AssertionError("loaded a model for a run with a bad template")

    monkeypatch.setattr(train_command, "load_model", no_loading)
    monkeypatch.setattr(train_command, "load_dataset", no_loading)
    raising = tmp_path / "raising.jinja"
    raising.write_text("{{ raise_exception('this model has no assistant role') }}")
    unclosed = tmp_path / "unclosed.jinja"
    unclosed.write_text("{% for message in messages %}{{ message['content'] }}")
    for template, says in ((tmp_path / "absent.jinja", "does not exist"), (raising, "no assistant role"),
                           (unclosed, "does not render")):
        code, _, err = run_cli(["train", "--model", str(model_folder), "--chat-template", str(template), "--name",
                                "never", "--adapters-dir", str(tmp_path / "adapters"), "--no-progress"], capsys)
        assert code == 2 and says in err and str(template) in err and "Traceback" not in err
    assert not (tmp_path / "adapters" / "never").exists()


def test_show_and_eval_json_name_the_model_and_the_template(hub_cache: Path, tmp_path: Path,
                                                           capsys: pytest.CaptureFixture[str]) -> None:
    template = tmp_path / "mine.jinja"
    template.write_text(TEMPLATE_LETTER_FIRST)
    data = write_csv_dataset(make_toy_dataset(), tmp_path / "data")
    common = ["--data", str(data), "--model", "acme/tiny-chat", "--dtype", "fp32", "--device", "cpu",
              "--candidates", "5", "--chat-template", str(template)]
    code, out, err = run_cli(["show", *common, "--user", "u01", "--format", "json"], capsys)
    assert code == 0, err
    shown = json.loads(out)["model"]
    assert shown["reference"] == "acme/tiny-chat" and shown["chat_template"]["path"] == str(template)
    sha = shown["chat_template"]["sha256"]
    assert len(sha) == 16
    code, out, _ = run_cli(["show", "--data", str(data), "--tokenizer", "acme/tiny-chat", "--user", "u01",
                            "--format", "json"], capsys)
    assert code == 0 and json.loads(out)["model"] == {"reference": "acme/tiny-chat", "name": "acme/tiny-chat",
                                                      "chat_template": None}
    code, out, _ = run_cli(["show", *common, "--user", "u01"], capsys)
    assert code == 0 and f"model acme/tiny-chat, chat template {template} (sha256 {sha})" in out
    out_dir = tmp_path / "eval"
    code, out, err = run_cli(["eval", *common, "--users", "2", "--output-dir", str(out_dir), "--baselines", "none",
                              "--format", "json"], capsys)
    assert code == 0, err
    summary = json.loads((out_dir / "summary.json").read_text())
    assert summary == json.loads(out)  # the printed JSON is summary.json
    assert summary["model"]["reference"] == "acme/tiny-chat" and summary["model"]["chat_template"]["sha256"] == sha
    code, out, _ = run_cli(["eval", *common, "--users", "2", "--output-dir", str(tmp_path / "eval2"),
                            "--baselines", "none"], capsys)
    assert code == 0 and f"chat template {template} (sha256 {sha})" in out
