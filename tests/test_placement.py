"""Models larger than one device: the placement decision, --max-memory parsing, and a tiny model split by accelerate
on CPU (with a layer offloaded to disk) scoring exactly as the same model in one piece."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from app_helpers import save_tiny_model, write_csv_dataset
from conftest import make_toy_dataset

from rerank_core.cli import main as cli
from rerank_core.mixed_precision import mixed_precision
from rerank_core.models import ModelError, load_model
from rerank_core.placement import Placement, choose_placement, input_device, parse_max_memory
from rerank_core.scoring import score_token_ids

GIB = 2**30
SPLIT_MAP = {"model.embed_tokens": "cpu", "model.rotary_emb": "cpu", "model.layers.0": "cpu",
             "model.layers.1": "disk", "model.norm": "cpu", "lm_head": "cpu"}


@pytest.fixture(autouse=True)
def own_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RERANK_INSPECTOR_CACHE", str(tmp_path / "cache"))  # disk offload goes there


@pytest.fixture(scope="module")
def model_folder(smol_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(smol_tokenizer, tmp_path_factory.mktemp("placement-model"))


def test_max_memory_is_parsed_and_bounded() -> None:
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=64GiB") == {0: 20 * GIB, 1: 20 * GIB, "cpu": 64 * GIB}
    assert parse_max_memory("") is None
    with pytest.raises(ValueError, match="'gpu0=1GiB' is not DEVICE=AMOUNT"):
        parse_max_memory("gpu0=1GiB")
    with pytest.raises(ValueError, match="out of range"):
        parse_max_memory("0=10B")


@pytest.mark.parametrize(("requested", "weights", "gpus", "budgets", "expected"), [
    ("cpu", 10 * GIB, [80 * GIB, 80 * GIB], None, Placement("cpu")),  # an explicit device is always honoured
    ("cuda:1", 10 * GIB, [80 * GIB, 80 * GIB], None, Placement("cuda:1")),
    ("auto", 10 * GIB, [], None, Placement("cpu")),
    ("auto", 10 * GIB, [80 * GIB], None, Placement("cuda")),  # fits one GPU: all of it there
    ("auto", 70 * GIB, [80 * GIB], None, Placement("cuda:0", "auto")),  # 70 > 0.8 x 80: spread (and CPU)
    ("auto", 1 * GIB, [80 * GIB, 80 * GIB], None, Placement("cuda:0", "auto")),  # several GPUs
    ("auto", 1 * GIB, [80 * GIB], {0: GIB}, Placement("cuda:0", "auto", {0: GIB})),
    ("auto", 1 * GIB, [], {"cpu": GIB}, Placement("cpu", "auto", {"cpu": GIB})),
])
def test_placement_decision(requested: str, weights: int, gpus: list[int], budgets, expected: Placement) -> None:
    assert choose_placement(requested, weight_bytes=weights, gpu_free=gpus, max_memory=budgets) == expected


def test_max_memory_with_an_explicit_device_is_refused(model_folder: Path) -> None:
    with pytest.raises(ModelError, match="--max-memory needs --device auto"):
        load_model(model_folder, device="cpu", max_memory="cpu=1GiB")


def _prompts(tokenizer) -> tuple[list[list[int]], list[int]]:
    history = "Seen: " + ", ".join(f"Title {n}" for n in range(30))
    prompts = [tokenizer.encode(f"{history}. Next: option {n}") for n in range(4)]
    return prompts, [tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"]


@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_split_model_scores_as_the_whole_one(model_folder: Path, dtype: str) -> None:
    whole = load_model(model_folder, dtype=dtype, device="cpu")
    split = load_model(model_folder, dtype=dtype, device_map=SPLIT_MAP)
    assert split.device_map == SPLIT_MAP and whole.device_map is None
    # The offloaded layer's weights wait on the meta device: model.device-style guesses would be wrong.
    assert any(parameter.device.type == "meta" for parameter in split.model.parameters())
    assert input_device(split.model) == torch.device("cpu") and split.device == "cpu"
    prompts, letters = _prompts(whole.tokenizer)
    # fp32: the same sums. bf16: rounding noise, as the whole model's MLPs may run oneDNN's fused kernel on this CPU
    # and the split one's (accelerate's forward in place) do not.
    tolerance = 1e-6 if dtype == "fp32" else 1e-4
    # Under accelerate's hook the head still projects in fp32 (mixed_precision replaces the forward the hook calls).
    with mixed_precision(split.model):
        logits = split.model(input_ids=torch.tensor([prompts[0]]), logits_to_keep=1).logits
    assert logits.dtype == torch.float32
    # Shared-prefix scoring (a key/value cache across the split) and plain batches alike.
    for share_prefix in (True, False):
        expected = score_token_ids(whole.model, whole.tokenizer, prompts, letters, share_prefix=share_prefix)
        got = score_token_ids(split.model, split.tokenizer, prompts, letters, share_prefix=share_prefix)
        for one, other in zip(expected, got, strict=True):
            assert one.letter_probs == pytest.approx(other.letter_probs, abs=tolerance)


def test_max_memory_budget_spreads_the_model(model_folder: Path, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    spread = load_model(model_folder, dtype="fp32", max_memory="cpu=2MiB")  # less than the embedding alone
    assert spread.device_map is not None and "disk" in spread.device_map.values()
    whole = load_model(model_folder, dtype="fp32", device="cpu")
    prompts, letters = _prompts(whole.tokenizer)
    expected = score_token_ids(whole.model, whole.tokenizer, prompts, letters)
    got = score_token_ids(spread.model, spread.tokenizer, prompts, letters)
    for one, other in zip(expected, got, strict=True):
        assert one.letter_probs == pytest.approx(other.letter_probs, abs=1e-6)
    # The CLI passes the budget through.
    data = write_csv_dataset(make_toy_dataset(), tmp_path / "data")
    code = cli.main(["show", "--data", str(data), "--model", str(model_folder), "--user", "u01", "--dtype", "fp32",
                     "--max-memory", "cpu=2MiB", "--format", "json"])
    assert code == 0 and '"user_id": "u01"' in capsys.readouterr().out
