"""A chat template given apart from the model (--chat-template FILE): checkpoints often ship one they were not
trained with, and this is how a user tries the other one, for inference and training alike."""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rerank_core.model_refs import ModelError

__all__ = ["MAX_TEMPLATE_BYTES", "ChatTemplateOverride", "apply_chat_template_override", "chat_template_from_text",
           "check_chat_template", "read_chat_template"]

# The longest templates in use (tool-calling families) are about 10 KB; a megabyte is a wrong file.
MAX_TEMPLATE_BYTES = 1_000_000
# What the render check feeds the template: one turn each way, the shape every preset renders.
_PROBE = [{"role": "user", "content": "Which one?"}, {"role": "assistant", "content": "A"}]
# What a tokenizer hands every template; stand-ins while no tokenizer is loaded yet (check_chat_template).
_STAND_IN_TOKENS = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}


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
            raise ModelError(f"chat template {file} is {size} bytes: a chat template is a Jinja text of a few KB")
        text = file.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ModelError(f"chat template {file} does not exist: pass a Jinja template file") from None
    except (OSError, UnicodeDecodeError) as error:
        raise ModelError(f"chat template {file} cannot be read ({error}): pass a UTF-8 Jinja file") from None
    return chat_template_from_text(text, str(file))


def chat_template_from_text(text: str, source: str) -> ChatTemplateOverride:
    """A template given as text (the app's text area or upload); `source` names it in messages and records."""
    if len(text.encode()) > MAX_TEMPLATE_BYTES:
        raise ModelError(f"chat template {source} is over {MAX_TEMPLATE_BYTES} bytes: a chat template is a Jinja "
                         "text of a few KB")
    if not text.strip():
        raise ModelError(f"chat template {source} is empty: pass a Jinja template")
    return ChatTemplateOverride(source, text)


def _refusal(override: ChatTemplateOverride, error: Exception) -> ModelError:
    line = getattr(error, "lineno", None)
    where = f" (line {line})" if line else ""
    reason = str(error).splitlines()[0] if str(error) else type(error).__name__
    return ModelError(f"chat template {override.path} does not render{where}: {reason}; fix the template, "
                      "or leave it out (--chat-template, the app's template field) to use the tokenizer's own")


def check_chat_template(override: ChatTemplateOverride) -> ChatTemplateOverride:
    """Refuse a template that does not render before any tokenizer or model loads (train's exit 2): rendered as
    apply_chat_template would, with stand-ins for the special tokens."""
    # transformers takes seconds to import: only when a template is given
    from transformers.utils.chat_template_utils import render_jinja_template

    try:
        for conversation, generation in ((_PROBE, False), (_PROBE[:1], True)):
            render_jinja_template([conversation], chat_template=override.text, add_generation_prompt=generation,
                                  **_STAND_IN_TOKENS)
    except Exception as error:  # Jinja raises its own types, and the template's raise_exception any message
        raise _refusal(override, error) from None
    return override


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
        raise _refusal(override, error) from None
    return tokenizer
