"""Loading base models and tokenizers: the embedded SmolLM2, local folders, device and dtype."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from rerank_core.chat_templates import ChatTemplateOverride, apply_chat_template_override, read_chat_template
from rerank_core.compute import on_compute_thread
from rerank_core.fsutil import user_cache_dir
from rerank_core.model_refs import (
    EMBEDDED_MODEL_NAME,
    ModelError,
    ModelRef,
    embedded_model_folder,
    parse_model_ref,
    resolve_model_folder,
    resolve_tokenizer_folder,
)
from rerank_core.placement import (
    choose_placement,
    folder_parameter_count,
    gpu_free_bytes,
    input_device,
    parse_max_memory,
)

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "AdapterSlots",
    "LoadedModel",
    "ModelError",
    "auto_device",
    "auto_dtype",
    "embedded_model_folder",
    "load_model",
    "load_tokenizer",
    "model_fingerprint",
    "tokenizer_fingerprint",
    "weights_fingerprint",
]

log = logging.getLogger(__name__)

_WEIGHT_SUFFIXES = (".safetensors",)
# Values hashed per tensor for the weights fingerprint: enough to tell two fine-tunes apart, read in milliseconds.
_FINGERPRINT_VALUES = 256


@dataclass
class AdapterSlots:
    """Adapters loaded into one model: PEFT wraps the model in place, so every user of it must share this."""

    peft_model: Any = None
    infos: dict[str, Any] = field(default_factory=dict)
    versions: dict[str, tuple[int, int] | None] = field(default_factory=dict)


@dataclass
class LoadedModel:
    """A base model with its tokenizer and the identity adapters are checked against."""

    model: Any
    tokenizer: Any
    name: str
    path: str
    device: str
    dtype: torch.dtype
    fingerprint: str
    # The reference as given ('' for the embedded model), a hash of the weights themselves (see
    # weights_fingerprint), a chat template given apart, and accelerate's map when the model is split.
    reference: str = ""
    weights_fingerprint: str = ""
    chat_template: ChatTemplateOverride | None = None
    device_map: dict[str, Any] | None = None
    adapters: AdapterSlots = field(default_factory=AdapterSlots, repr=False, compare=False)

    @property
    def label(self) -> str:
        """The model as reports name it: its name, and the chat template given apart when there is one."""
        if self.chat_template is None:
            return self.name
        return f"{self.name} (chat template {self.chat_template.path}, sha256 {self.chat_template.sha256})"


def auto_device(requested: str = "auto") -> str:
    """CUDA when present, else CPU; an explicit request is honoured if this machine has that device."""
    if requested != "auto":
        try:  # fail here with the option's name, not deep inside model.to() with a bare AssertionError
            torch.empty(0, device=requested)
        except (RuntimeError, AssertionError, ValueError) as error:
            raise ModelError(f"--device {requested!r} cannot be used here ({error}); use auto, cpu or "
                             f"cuda[:N] (CUDA available: {torch.cuda.is_available()})") from None
        return requested
    return "cuda" if torch.cuda.is_available() else "cpu"


def _cpu_has_fast_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def auto_dtype(device: str, requested: str = "auto") -> torch.dtype:
    """bf16 where the hardware runs it fast (CUDA, AVX512-BF16/AMX CPUs), else fp32."""
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32,
             "float32": torch.float32, "fp16": torch.float16, "float16": torch.float16}
    if requested != "auto":
        if requested not in names:
            raise ModelError(f"--dtype {requested!r} is not one of auto, {', '.join(sorted(names))}")
        return names[requested]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if _cpu_has_fast_bf16() else torch.float32


def _template(chat_template: str | os.PathLike[str] | ChatTemplateOverride | None) -> ChatTemplateOverride | None:
    if chat_template is None or isinstance(chat_template, ChatTemplateOverride):
        return chat_template
    return read_chat_template(chat_template) if str(chat_template).strip() else None


def load_tokenizer(reference: str | os.PathLike[str] | ModelRef | None = None, *,
                   chat_template: str | os.PathLike[str] | ChatTemplateOverride | None = None) -> Any:
    """A tokenizer from any model reference (a folder with HF tokenizer files or a SentencePiece tokenizer.model, a
    cached hub id, a GGUF file, vocabulary-only included), or the embedded one; `chat_template` overrides its own."""
    # transformers takes seconds to import: only when a model or tokenizer loads
    from transformers import AutoTokenizer

    override = _template(chat_template)  # a bad template file is refused before anything loads
    folder = resolve_tokenizer_folder(reference)
    has_config = (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()
    try:
        if not has_config and (folder / "tokenizer.model").is_file():
            # transformers takes seconds to import: only when a model or tokenizer loads
            from transformers import LlamaTokenizer

            # The constructor ignores vocab_file in transformers 5 (an empty vocabulary); from_pretrained
            # converts the SentencePiece model. Llama checkpoints shipped this way expect a BOS token.
            tokenizer = LlamaTokenizer.from_pretrained(folder, add_bos_token=True)
        else:
            tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(
            f"could not load a tokenizer from {folder}: {error}. The folder needs tokenizer.json "
            "or tokenizer_config.json, or a SentencePiece tokenizer.model"
        ) from error
    return apply_chat_template_override(tokenizer, override)


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary and chat template: what decides letter token IDs."""
    digest = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for token, token_id in sorted(vocab.items(), key=lambda pair: pair[1]):
        digest.update(f"{token_id}\t{token}\n".encode())
    digest.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return digest.hexdigest()[:16]


def model_fingerprint(config: Any, tokenizer: Any) -> str:
    """A short hash of the architecture's shape and the tokenizer: what an adapter's matrices and letters depend on."""
    config_dict = config.to_dict()
    keep = {key: config_dict.get(key) for key in (
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "max_position_embeddings")}
    text = json.dumps(keep, sort_keys=True) + tokenizer_fingerprint(tokenizer)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def weights_fingerprint(folder: str | os.PathLike[str]) -> str:
    """A short hash of the weights on disk, so an adapter trained on one checkpoint is refused on another of the
    same shape (two fine-tunes of one base). Each tensor's name, shape and first values rounded to bf16 are hashed:
    the same weights saved in fp32 or bf16, sharded or not, GGUF-converted or copied, give the same hash."""
    sources: dict[str, Path] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt") as weights:
                sources.update((key, file) for key in weights.keys())  # noqa: SIM118 - not iterable
        except (SafetensorError, OSError) as error:
            raise ModelError(f"model weights {file} are unreadable ({error})") from None
    digest = hashlib.sha256()
    handles: dict[Path, Any] = {}
    try:
        for key in sorted(sources):
            if sources[key] not in handles:
                handles[sources[key]] = safe_open(str(sources[key]), framework="pt")
            tensor_slice = handles[sources[key]].get_slice(key)
            shape = tuple(tensor_slice.get_shape())
            first = tensor_slice[0:1] if len(shape) > 1 and shape[0] > 0 else tensor_slice[:]
            values = first.reshape(-1)[:_FINGERPRINT_VALUES]
            if values.is_floating_point():
                values = values.to(torch.bfloat16).view(torch.int16)
            digest.update(f"{key}{shape}".encode())
            digest.update(values.contiguous().numpy().tobytes())
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ModelError(f"model weights in {folder} are unreadable ({error})") from None
    return digest.hexdigest()[:16]


def _offload_folder(folder: Path) -> Path:
    """Where accelerate keeps the layers a device map sends to disk: one folder per model, under the cache."""
    return user_cache_dir() / "offload" / hashlib.sha256(str(folder.resolve()).encode()).hexdigest()[:12]


@on_compute_thread
def load_model(
    reference: str | os.PathLike[str] | ModelRef | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
    chat_template: str | os.PathLike[str] | ChatTemplateOverride | None = None,
    max_memory: str | dict[int | str, int] | None = None,
    device_map: str | dict[str, Any] | None = None,
) -> LoadedModel:
    """A causal LM and its tokenizer from any model reference (safetensors only), or the embedded default.

    `device` auto spreads the model with accelerate when it needs more than one GPU (see placement); an explicit
    `device_map` (accelerate's, e.g. {"model.layers.1": "disk", ...}) is used as given.
    """
    # transformers takes seconds to import: only when a model or tokenizer loads
    from transformers import AutoModelForCausalLM

    ref = reference if isinstance(reference, ModelRef) else parse_model_ref(reference)
    override = _template(chat_template)  # a bad template file is refused before anything loads
    budgets = parse_max_memory(max_memory) if isinstance(max_memory, str) or max_memory is None else max_memory
    # auto stays auto until the weights' size is known (placement decides); an explicit device is checked now.
    device_name = auto_device(device) if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
    torch_dtype = auto_dtype(device_name, dtype)
    folder = resolve_model_folder(ref, torch_dtype)
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json; pass a Hugging Face model folder")
    weights = [p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES)]
    if not weights:
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = (f" It has {', '.join(pickled)}: pickled weights are never loaded; convert them to "
                "safetensors first.") if pickled else ""
        raise ModelError(f"model folder {folder} has no *.safetensors weights.{hint}")
    if device_map is None:
        weight_bytes = folder_parameter_count(folder) * torch.empty(0, dtype=torch_dtype).element_size()
        try:
            placement = choose_placement(device, weight_bytes=weight_bytes, gpu_free=gpu_free_bytes(),
                                         max_memory=budgets)
        except ValueError as error:
            raise ModelError(str(error)) from None
        device_map, budgets = placement.device_map, placement.max_memory
        device_name = placement.device
    tokenizer = load_tokenizer(folder)
    own_template = getattr(tokenizer, "chat_template", None)
    apply_chat_template_override(tokenizer, override)  # a template that does not render stops before the weights
    placed: dict[str, Any] = {}
    if device_map is not None:
        # accelerate sends what fits nowhere else to disk, and needs a folder for it.
        placed = {"device_map": device_map, "max_memory": budgets, "offload_folder": str(_offload_folder(folder))}
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code, **placed
        )
    except (OSError, ValueError, RuntimeError) as error:
        hint = (" The folder ships its own Python code: pass --trust-remote-code only if you trust it."
                if "trust_remote_code" in str(error) and not trust_remote_code else "")
        raise ModelError(f"could not load model weights from {folder}: {error}{hint}") from error
    if device_map is None:
        model.to(device_name)
    model.eval()
    # The fingerprint is the checkpoint's own, template included: an override is recorded beside it, so an
    # adapter can be tried under another template (the point of giving one) and is still recognised.
    shown_template, tokenizer.chat_template = tokenizer.chat_template, own_template
    fingerprint = model_fingerprint(model.config, tokenizer)
    tokenizer.chat_template = shown_template
    split = getattr(model, "hf_device_map", None) if device_map is not None else None
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=ref.display_name if ref.kind != "folder" else folder.name,
        path=str(folder),
        device=str(input_device(model)) if split else device_name,
        dtype=torch_dtype,
        fingerprint=fingerprint,
        reference=ref.text,
        weights_fingerprint=weights_fingerprint(folder),
        chat_template=override,
        device_map=dict(split) if split else None,
    )
