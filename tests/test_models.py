"""Loading: dtype choice, folders that must be refused, a tiny saved model, a bare SentencePiece model."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from conftest import LLAMA2_MODEL, build_tiny_llama

import rerank_core.models as models_module
from rerank_core.models import ModelError, auto_device, auto_dtype, load_model, load_tokenizer, model_fingerprint


@pytest.mark.parametrize(("name", "dtype"), [
    ("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp32", torch.float32),
    ("float32", torch.float32), ("fp16", torch.float16), ("float16", torch.float16)])
def test_explicit_dtype_is_honoured(name: str, dtype: torch.dtype) -> None:
    assert auto_dtype("cpu", name) == dtype
    assert auto_dtype("cuda", name) == dtype


def test_bad_dtype_names_the_option() -> None:
    with pytest.raises(ModelError, match=r"--dtype 'int8' is not one of auto, .*bf16.*fp32"):
        auto_dtype("cpu", "int8")


def test_auto_dtype_on_cpu_follows_bf16_support(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(models_module, "_cpu_has_fast_bf16", lambda: True)
    assert auto_dtype("cpu") == torch.bfloat16
    monkeypatch.setattr(models_module, "_cpu_has_fast_bf16", lambda: False)
    assert auto_dtype("cpu") == torch.float32
    assert auto_device("cpu") == "cpu"


def test_missing_folder_and_missing_config_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "nowhere")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelError, match="not a folder"):
        load_model(tmp_path / "file.txt")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(ModelError, match=r"no config\.json"):
        load_model(tmp_path)


@pytest.fixture(scope="module")
def saved_tiny(smol_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, torch.nn.Module]:
    folder = tmp_path_factory.mktemp("tiny-saved")
    model = build_tiny_llama(smol_tokenizer, seed=3)
    model.save_pretrained(folder, safe_serialization=True)
    smol_tokenizer.save_pretrained(folder)
    return folder, model


def test_pickled_weights_are_never_loaded(saved_tiny, tmp_path: Path) -> None:
    folder, _ = saved_tiny
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(folder / "config.json", pickled / "config.json")
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ModelError, match=r"no \*\.safetensors.*pytorch_model\.bin: pickled weights are never loaded"):
        load_model(pickled)
    (pickled / "pytorch_model.bin").unlink()
    with pytest.raises(ModelError, match=r"no \*\.safetensors weights\.$"):
        load_model(pickled)


def test_saved_tiny_model_loads_in_fp32(saved_tiny, smol_tokenizer) -> None:
    folder, original = saved_tiny
    loaded = load_model(folder, device="cpu", dtype="fp32")
    assert loaded.dtype == torch.float32
    assert next(loaded.model.parameters()).dtype == torch.float32
    assert loaded.device == "cpu"
    assert loaded.name == folder.name and loaded.path == str(folder)
    assert not loaded.model.training
    assert loaded.tokenizer.chat_template == smol_tokenizer.chat_template
    assert loaded.fingerprint == model_fingerprint(original.config, smol_tokenizer)
    ids = torch.tensor([smol_tokenizer.encode("hello world")])
    with torch.no_grad():
        assert torch.equal(loaded.model(input_ids=ids).logits, original(input_ids=ids).logits)
    # bf16 on request.
    assert load_model(folder, device="cpu", dtype="bf16").model.dtype == torch.bfloat16


def test_fingerprint_changes_with_the_chat_template(saved_tiny, smol_tokenizer,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    _, model = saved_tiny
    before = model_fingerprint(model.config, smol_tokenizer)
    monkeypatch.setattr(smol_tokenizer, "chat_template", "{{ messages }}")
    assert model_fingerprint(model.config, smol_tokenizer) != before


def test_load_tokenizer_from_a_bare_sentencepiece_model(tmp_path: Path, llama2_tokenizer) -> None:
    if not LLAMA2_MODEL.is_file():
        pytest.skip("../shared/fixtures is absent")
    shutil.copy(LLAMA2_MODEL, tmp_path / "tokenizer.model")
    tokenizer = load_tokenizer(tmp_path)
    assert len(tokenizer) == 32000
    assert tokenizer.tokenize("Hello world") == ["▁Hello", "▁world"]
    assert tokenizer.encode("A", add_special_tokens=False) == [319]
    assert tokenizer.convert_tokens_to_ids("A") == 29909
    assert tokenizer.encode("Hello world") == [1, 15043, 3186]  # BOS, as Llama checkpoints expect
    assert tokenizer.unk_token_id == 0 and tokenizer.eos_token_id == 2
    text = "### Response:\nA</s>"
    assert tokenizer(text, add_special_tokens=False)["input_ids"] == llama2_tokenizer(
        text, add_special_tokens=False)["input_ids"]


def test_load_tokenizer_from_an_empty_folder_says_what_is_needed(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match=r"tokenizer\.json or tokenizer_config\.json, or a SentencePiece"):
        load_tokenizer(tmp_path)
