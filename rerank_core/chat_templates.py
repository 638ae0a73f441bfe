"""A chat template given apart from the model (--chat-template FILE): checkpoints often ship one they were not
trained with, and this is how a user tries the other one, for inference and training alike."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rerank_core.model_refs import ModelError

__all__ = ["MAX_TEMPLATE_BYTES", "ChatTemplateOverride", "apply_chat_template_override", "read_chat_template"]

# The longest templates in use (tool-calling families) are about 10 KB; a megabyte is a wrong file.
MAX_TEMPLATE_BYTES = 1_000_000
# What the render check feeds the template: one turn each way, the shape every preset renders.
_PROBE = [{"role": "user", "content": "Which one?"}, {"role": "assistant", "content": "A"}]


@dataclass(frozen=True)
class ChatTemplateOverride:
    """The template file's path and text, and the short hash manifests and reports record."""

    path: str
    text: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode()).hexdigest()[:16]

    def record(self) -> dict[str, str]:
        """What a manifest or report stores: where the template came from and which text it was."""
        return {"path": self.path, "sha256": self.sha256}


def read_chat_template(path: str | os.PathLike[str]) -> ChatTemplateOverride:
    """The template text of a Jinja file; a missing, empty, huge or non-UTF-8 file is refused naming the file."""
    file = Path(path).expanduser()
    try:
        size = file.stat().st_size
        if size > MAX_TEMPLATE_BYTES:
            raise ModelError(f"--chat-template {file} is {size} bytes: a chat template is a Jinja text of a few KB")
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"--chat-template {file} does not exist: pass a Jinja template file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelError(f"--chat-template {file} cannot be read ({error}): pass a UTF-8 Jinja file") from None
    if not text.strip():
        raise ModelError(f"--chat-template {file} is empty: pass a Jinja template file")
    return ChatTemplateOverride(str(file), text)


def apply_chat_template_override(tokenizer: Any, override: ChatTemplateOverride | None) -> Any:
    """Give the tokenizer the override's template once it renders a conversation; None leaves the tokenizer's own."""
    if override is None:
        return tokenizer
    previous = getattr(tokenizer, "chat_template", None)
    tokenizer.chat_template = override.text
    try:
        tokenizer.apply_chat_template(_PROBE, tokenize=False)
        tokenizer.apply_chat_template(_PROBE[:1], tokenize=False, add_generation_prompt=True)
    except Exception as error:
        tokenizer.chat_template = previous
        line = getattr(error, "lineno", None)
        where = f" (line {line})" if line else ""
        reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ModelError(f"--chat-template {override.path} does not render{where}: {reason}; fix the template, "
                         "or leave --chat-template out to use the tokenizer's own") from None
    return tokenizer
