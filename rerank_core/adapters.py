"""The adapters/ folder: names, manifests, checks against the base model, and atomic publishing."""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open

from rerank_core.fsutil import data_home, process_running, replace_folder
from rerank_core.models import LoadedModel
from rerank_core.prompts import PromptPreset, get_preset

__all__ = [
    "MANIFEST_FILE",
    "WEIGHTS_FILE",
    "AdapterError",
    "AdapterInfo",
    "adapters_root",
    "base_model_record",
    "check_adapter",
    "list_adapters",
    "new_staging_folder",
    "publish_adapter",
    "remove_stale",
    "validate_adapter_name",
]

log = logging.getLogger(__name__)

MANIFEST_FILE = "rerank_manifest.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_CONFIG_FILE = "adapter_config.json"
# Hidden names are work in progress (staging) or on their way out (replaced): never listed.
_STAGING_PREFIX = ".staging-"
_REPLACED_PREFIX = ".replaced-"
_NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class AdapterError(ValueError):
    """An adapter that cannot be used with the loaded model, with the reason and the fix."""


@dataclass(frozen=True)
class AdapterInfo:
    """A published adapter folder and what its manifest says (None for a plain PEFT adapter)."""

    name: str
    path: str
    manifest: dict[str, Any] | None

    @functools.cached_property
    def preset(self) -> PromptPreset | None:
        """The preset the manifest names, resolved once here; an unknown name raises PromptError."""
        name = (self.manifest or {}).get("preset")
        return get_preset(name) if name else None

    @property
    def strategy(self) -> str | None:
        return (self.manifest or {}).get("strategy")

    @property
    def max_prompt_tokens(self) -> int | None:
        """The prompt budget the adapter was trained with (None: no limit, or a manifest without it)."""
        return ((self.manifest or {}).get("training") or {}).get("max_prompt_tokens")

    @property
    def candidate_count(self) -> int | None:
        """How many candidates each training prompt had (None: a manifest without it)."""
        return ((self.manifest or {}).get("candidates") or {}).get("count")

    @property
    def candidate_source(self) -> str | None:
        """Where its training candidates came from (random, popular, retriever; None: a manifest without it)."""
        return ((self.manifest or {}).get("candidates") or {}).get("source")

    @property
    def text_field(self) -> str | None:
        """The item text the adapter was trained on (None: a manifest without it)."""
        return ((self.manifest or {}).get("training") or {}).get("text_field")

    @property
    def template_kwargs(self) -> str | None:
        """The chat-template options the adapter was trained with; None when the manifest predates them."""
        manifest = self.manifest or {}
        return manifest.get("template_kwargs")

    @property
    def base_name(self) -> str | None:
        return ((self.manifest or {}).get("base_model") or {}).get("name")

    @property
    def chat_template(self) -> dict[str, str] | None:
        """The chat template given apart at training (path and hash); None: the tokenizer's own, or an old manifest."""
        return ((self.manifest or {}).get("base_model") or {}).get("chat_template")


def base_model_record(loaded: LoadedModel) -> dict[str, Any]:
    """What a manifest records of the base: the reference as given, where it resolved, both fingerprints (shape and
    tokenizer; the weights themselves) and a chat template given apart, so the adapter is refused on other weights."""
    return {"name": loaded.name, "reference": loaded.reference, "path": loaded.path,
            "fingerprint": loaded.fingerprint, "weights_fingerprint": loaded.weights_fingerprint,
            "dtype": str(loaded.dtype).replace("torch.", ""),
            "chat_template": loaded.chat_template.record() if loaded.chat_template is not None else None}


def adapters_root(root: str | os.PathLike[str] | None = None) -> Path:
    """adapters/ under the data home (beside the code in a checkout, a user folder when pip-installed) unless
    RERANK_ADAPTERS_DIR or the caller names another folder."""
    if root is not None:
        return Path(root)
    override = os.environ.get("RERANK_ADAPTERS_DIR")
    if override:
        return Path(override)
    return data_home() / "adapters"


def validate_adapter_name(name: str) -> str:
    """Adapter names are plain folder names: letters, digits, '.', '_' and '-', no path tricks."""
    if not isinstance(name, str) or not _NAME_PATTERN.fullmatch(name) or ".." in name:
        raise AdapterError(
            f"adapter name {name!r} is not allowed: use 1-64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit, with no '..', '/' or control characters")
    return name


def _read_manifest(folder: Path) -> dict[str, Any] | None:
    manifest_path = folder / MANIFEST_FILE
    if not manifest_path.is_file():
        return None
    try:
        return json.loads(manifest_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterError(f"adapter manifest {manifest_path} cannot be read: {error}") from error


def list_adapters(root: str | os.PathLike[str] | None = None) -> list[AdapterInfo]:
    """Complete adapter folders only: staging and half-replaced folders are never shown."""
    folder = adapters_root(root)
    if not folder.is_dir():
        return []
    found = []
    for path in sorted(folder.iterdir()):
        if path.name.startswith(".") or not path.is_dir():
            continue
        if not ((path / _CONFIG_FILE).is_file() and (path / WEIGHTS_FILE).is_file()):
            continue
        try:
            manifest = _read_manifest(path)
        except AdapterError as error:
            log.warning("skipping adapter %s: %s", path.name, error)
            continue
        found.append(AdapterInfo(path.name, str(path), manifest))
    return found


def check_adapter(loaded: LoadedModel, name: str, root: str | os.PathLike[str] | None = None) -> AdapterInfo:
    """Refuse an adapter made for another base; a plain PEFT adapter passes with a warning if shapes fit."""
    validate_adapter_name(name)
    by_name = {info.name: info for info in list_adapters(root)}
    if name not in by_name:
        raise AdapterError(
            f"no adapter named {name!r} in {adapters_root(root)}; available: {', '.join(by_name) or 'none'}")
    info = by_name[name]
    _check_config(Path(info.path))
    manifest = info.manifest
    if manifest is None:
        log.warning("adapter %s has no %s; loading it as a plain PEFT adapter", name, MANIFEST_FILE)
        _check_shapes(loaded, Path(info.path))
        return info
    base = manifest.get("base_model") or {}
    if base.get("fingerprint") != loaded.fingerprint:
        raise AdapterError(
            f"adapter {name!r} was trained on base model {base.get('name')!r} (fingerprint "
            f"{base.get('fingerprint')}), but the loaded base is {loaded.name!r} (fingerprint "
            f"{loaded.fingerprint}); load that base model or pick an adapter trained on this one")
    # Two fine-tunes of one base share shape and tokenizer; their weights differ. Manifests older than the
    # weights fingerprint, and models built in memory, have none: the shape check alone decides, as before.
    trained_weights = base.get("weights_fingerprint")
    if trained_weights and loaded.weights_fingerprint and trained_weights != loaded.weights_fingerprint:
        raise AdapterError(
            f"adapter {name!r} was trained on other weights ({base.get('reference') or base.get('name')!r}, weights "
            f"{trained_weights}) than the loaded {loaded.reference or loaded.name!r} (weights "
            f"{loaded.weights_fingerprint}), though both have the same shape and tokenizer; load the checkpoint it "
            "was trained on, from any folder, hub id or GGUF that holds those weights")
    _check_shapes(loaded, Path(info.path))
    return info


def _check_config(folder: Path) -> None:
    """PEFT's own error for a broken adapter_config.json names neither the file nor the adapter."""
    path = folder / _CONFIG_FILE
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise AdapterError(f"adapter {folder.name!r} config {path} is unreadable ({error}); "
                           "delete the folder and train it again") from error
    if not isinstance(config, dict):
        raise AdapterError(f"adapter {folder.name!r} config {path} is not a JSON object; "
                           "delete the folder and train it again")


def _check_shapes(loaded: LoadedModel, folder: Path) -> None:
    """Every LoRA matrix must fit the module it adapts; catches adapters for other sizes and corrupt files."""
    modules = dict(loaded.model.named_modules())
    try:
        with safe_open(str(folder / WEIGHTS_FILE), framework="pt") as weights:
            for key in weights.keys():  # noqa: SIM118 - safe_open handles are not iterable
                shape = weights.get_slice(key).get_shape()
                module_name = key.replace("base_model.model.", "", 1).rsplit(".lora_", 1)[0]
                module = modules.get(module_name)
                if module is None or not hasattr(module, "in_features"):
                    raise AdapterError(
                        f"adapter {folder.name!r} has weights for module {module_name!r}, which the loaded "
                        f"base {loaded.name!r} does not have: it was made for another model")
                if (".lora_A." in key and shape[1] != module.in_features) or \
                        (".lora_B." in key and shape[0] != module.out_features):
                    raise AdapterError(
                        f"adapter {folder.name!r} weight {key} has shape {tuple(shape)}, which does not fit "
                        f"{module_name} ({module.in_features}→{module.out_features}) of {loaded.name!r}")
    except (SafetensorError, OSError) as error:
        raise AdapterError(
            f"adapter {folder.name!r} weights {folder / WEIGHTS_FILE} are unreadable ({error}); "
            "delete the folder and train it again") from error


def new_staging_folder(root: str | os.PathLike[str] | None = None) -> Path:
    """A hidden folder inside adapters/ to write into; rename makes it visible only when complete."""
    folder = adapters_root(root)
    folder.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f"{_STAGING_PREFIX}{os.getpid()}-", dir=folder))


def publish_adapter(staging: Path, name: str, root: str | os.PathLike[str] | None = None,
                    *, overwrite: bool = False) -> Path:
    """Rename a complete staging folder to adapters/<name>; an overwritten adapter survives any failure."""
    validate_adapter_name(name)
    folder = adapters_root(root)
    target = folder / name
    staging.chmod(0o755)
    if not target.exists():
        os.rename(staging, target)
        return target
    if not overwrite:
        raise AdapterError(f"adapter {name!r} already exists in {folder}; choose another name or allow overwrite")
    replace_folder(staging, target, aside_prefix=f"{_REPLACED_PREFIX}{os.getpid()}-{name}-")
    return target


def remove_stale(root: str | os.PathLike[str] | None = None) -> list[str]:
    """Delete staging folders whose writing process is gone (a killed run), and restore lost renames."""
    folder = adapters_root(root)
    removed: list[str] = []
    if not folder.is_dir():
        return removed
    for path in folder.iterdir():
        for prefix in (_STAGING_PREFIX, _REPLACED_PREFIX):
            if not path.name.startswith(prefix):
                continue
            pid_text, _, rest = path.name[len(prefix):].partition("-")
            if pid_text.isdigit() and process_running(int(pid_text)):
                continue  # its writer is still at work: a publish in progress
            original = folder / rest.rsplit("-", 1)[0]
            if prefix == _REPLACED_PREFIX and not original.exists():
                # The writer died between its two renames: the set-aside adapter is the only copy.
                os.rename(path, original)
            else:
                shutil.rmtree(path, ignore_errors=True)
            removed.append(path.name)
    return removed

