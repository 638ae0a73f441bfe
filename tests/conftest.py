"""Shared fixtures: real tokenizers, tiny Llama models built on them, and a small hand-made dataset."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import torch

from rerank_core.data.dataset import Dataset, Item
from rerank_core.models import LoadedModel, load_tokenizer, model_fingerprint

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
