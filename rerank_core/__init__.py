"""Rerank Inspector's core: every link of the LlamaRec-style letter reranking chain, made visible."""

from rerank_core.candidates import CandidateConfig
from rerank_core.data.dataset import Dataset
from rerank_core.data.loaders import load_dataset
from rerank_core.inspector import BASE, Inspector, InspectSettings, UserInspection
from rerank_core.models import LoadedModel, load_model, load_tokenizer
from rerank_core.prompts import PRESETS, build_prompt
from rerank_core.verbalizer import resolve_letters

__all__ = [
    "BASE",
    "PRESETS",
    "CandidateConfig",
    "Dataset",
    "InspectSettings",
    "Inspector",
    "LoadedModel",
    "UserInspection",
    "build_prompt",
    "load_dataset",
    "load_model",
    "load_tokenizer",
    "resolve_letters",
]
