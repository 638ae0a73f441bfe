"""Shared fixtures: real tokenizers, tiny Llama models built on them, a small hand-made dataset, and the model and
data folders, training settings and prompts that several test modules use."""

from __future__ import annotations

import csv
import json
import os
import random
import shutil
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from rerank_core.data.dataset import Dataset, Item
from rerank_core.models import LoadedModel, load_tokenizer, model_fingerprint
from rerank_core.prompts import build_prompt, encode_rendered, get_preset
from rerank_core.scoring import LetterScores
from rerank_core.training.config import TRAINING_PRESETS, TrainConfig

ROOT = Path(__file__).resolve().parent.parent

FIXTURES = Path(__file__).resolve().parent.parent.parent / "shared" / "fixtures"
LLAMA2_MODEL = FIXTURES / "tokenizers" / "llama2" / "tokenizer.model"

# A Llama-2 style chat template, for chat presets on a tokenizer that ships none.
LLAMA2_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}{% if message['role'] == 'user' %}"
    "{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def inference_only_system(template: str) -> str:
    """A template whose inference rendering opens with a system turn training never has: no slot can fix it."""
    return "{% if add_generation_prompt %}<|im_start|>system\nAnswer at once.<|im_end|>\n{% endif %}" + template


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's GPT-2 style BPE tokenizer with its ChatML template (converted once, then cached)."""
    return load_tokenizer()


def llama2_folder_at(folder: Path) -> Path:
    """The real Llama-2 SentencePiece model copied into `folder` with a config that loads it."""
    shutil.copy(LLAMA2_MODEL, folder / "tokenizer.model")
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True}))
    return folder


@pytest.fixture(scope="session")
def llama2_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real Llama-2 SentencePiece tokenizer from ../shared/fixtures, as a loadable folder."""
    if not LLAMA2_MODEL.is_file():
        pytest.skip("../shared/fixtures/tokenizers/llama2/tokenizer.model is absent")
    return llama2_folder_at(tmp_path_factory.mktemp("llama2"))


@pytest.fixture(scope="session")
def llama2_tokenizer(llama2_folder: Path):
    return load_tokenizer(llama2_folder)


@pytest.fixture(scope="session")
def llama2_chat_tokenizer(llama2_folder: Path):
    tokenizer = load_tokenizer(llama2_folder)
    tokenizer.chat_template = LLAMA2_CHAT_TEMPLATE
    return tokenizer


def build_tiny_llama(tokenizer, *, seed: int = 0, layers: int = 2, hidden: int = 32):
    """A few-layer Llama sized to the tokenizer's vocabulary: real code paths, seconds to run."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=hidden * 2,
        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id)
    model = LlamaForCausalLM(config).eval()
    return model


def tiny_loaded(tokenizer, *, seed: int = 0, name: str = "tiny-llama") -> LoadedModel:
    model = build_tiny_llama(tokenizer, seed=seed)
    return LoadedModel(model=model, tokenizer=tokenizer, name=name, path="(in memory)", device="cpu",
                       dtype=torch.float32, fingerprint=model_fingerprint(model.config, tokenizer))


@pytest.fixture
def tiny_smol(smol_tokenizer) -> LoadedModel:
    """A tiny random Llama over SmolLM2's tokenizer, fp32 on CPU."""
    return tiny_loaded(smol_tokenizer)


def make_toy_dataset(users: int = 30, items: int = 120, length: int = 12, seed: int = 0) -> Dataset:
    """Items with distinct titles and random sequences: enough for candidates and prompts."""
    rng = random.Random(seed)
    catalogue = {f"i{i:03d}": Item(f"i{i:03d}", f"Title {i}", caption=f"Caption {i}", summary=f"Summary {i}")
                 for i in range(items)}
    ids = sorted(catalogue)
    sequences = {f"u{u:02d}": rng.sample(ids, length) for u in range(users)}
    return Dataset("toy", catalogue, sequences)


@pytest.fixture
def toy_dataset() -> Dataset:
    return make_toy_dataset()


# -- CLI runs and training ---------------------------------------------------------------------

def tiny_config(**overrides) -> TrainConfig:
    """Small prompts and few samples: a tiny-model run takes a second or two."""
    settings = {"max_samples": 12, "candidates": 5, "batch_size": 4, "epochs": 1.0, "eval_users": 0,
                "eval_every": 0, "max_prompt_tokens": 160, "warmup": 0.0}
    settings.update(overrides)
    return replace(TRAINING_PRESETS["quick"], **settings)  # replace, unlike training_config, can set None


def write_csv_dataset(dataset, folder: Path) -> Path:
    """The dataset as the bundled items.csv / interactions.csv pair, for CLI runs in a subprocess."""
    folder.mkdir(parents=True, exist_ok=True)
    with open(folder / "items.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["item_id", "title", "caption", "summary"])
        for item in dataset.items.values():
            writer.writerow([item.item_id, item.title, item.caption, item.summary])
    with open(folder / "interactions.csv", "w", newline="", encoding="utf-8") as stream:
        writer = csv.writer(stream)
        writer.writerow(["user_id", "item_id", "timestamp"])
        for user, sequence in dataset.sequences.items():
            for position, item in enumerate(sequence):
                writer.writerow([user, item, 1_600_000_000 + position * 3600])
    return folder


def save_tiny_model(tokenizer, folder: Path, *, seed: int = 0) -> Path:
    """A tiny Llama and its tokenizer, saved as safetensors: a real model folder `--model` can load."""
    build_tiny_llama(tokenizer, seed=seed).save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def tiny_model_folder(smol_tokenizer, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(smol_tokenizer, tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def toy_data_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv_dataset(make_toy_dataset(), tmp_path_factory.mktemp("toy-data"))


def cli_command(model: Path, data: Path, root: Path, *extra: str) -> list[str]:
    """A `train` command line for a subprocess, sized for a tiny model."""
    return [sys.executable, "-m", "rerank_core.cli.train", "train", "--model", str(model), "--data", str(data),
            "--dtype", "fp32", "--device", "cpu", "--adapters-dir", str(root), "--no-progress",
            "--candidates", "5", "--max-prompt-tokens", "160", "--eval-users", "0", *extra]


def cli_env() -> dict[str, str]:
    """The environment of a CLI subprocess: this checkout on the path, one thread per process."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


# -- scoring --------------------------------------------------------------------------------------

def toy_prompts(tokenizer, count: int = 10) -> list[list[int]]:
    """Real seed prompts of different lengths (histories of 1 to `count` items)."""
    dataset = make_toy_dataset()
    titles = [dataset.text(item) for item in sorted(dataset.items)]
    prompts = []
    for index in range(count):
        history = titles[index:index + 1 + index * 2]
        built = build_prompt(tokenizer, get_preset("seed"), history, titles[50:54])
        prompts.append(encode_rendered(tokenizer, get_preset("seed"), built.rendered))
    return prompts


def shared_prefix_prompts(tokenizer) -> list[list[int]]:
    """One user's prompt with the candidates rotated and one with a shorter candidate list: a long common
    prefix (system prompt, instruction, history), suffixes of different lengths."""
    dataset = make_toy_dataset()
    titles = [dataset.text(item) for item in sorted(dataset.items)]
    history, candidates = titles[:12], titles[50:54]
    prompts, seed = [], get_preset("seed")
    for shift in range(4):
        rotated = candidates[shift:] + candidates[:shift]
        prompts.append(encode_rendered(tokenizer, seed, build_prompt(tokenizer, seed, history, rotated).rendered))
    shorter = build_prompt(tokenizer, seed, history, [candidates[0][:6], *candidates[1:]])
    prompts.append(encode_rendered(tokenizer, seed, shorter.rendered))
    return prompts


def letter_ids(tokenizer) -> list[int]:
    """The token IDs of A-D."""
    return [tokenizer.convert_tokens_to_ids(letter) for letter in "ABCD"]


def probabilities(scores: list[LetterScores]) -> torch.Tensor:
    """The letter probabilities of every scored prompt, one row each."""
    return torch.tensor([score.letter_probs for score in scores])
