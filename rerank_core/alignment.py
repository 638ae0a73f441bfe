"""Whether the inference rendering is a token prefix of the training rendering, and where not."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from rerank_core.prompts import (
    PromptError,
    PromptPreset,
    encode_conversation,
    encode_rendered,
    render_inference,
    render_training,
)

__all__ = ["TemplateMismatch", "TokenAlignment", "align"]

_CONTEXT = 4


class TemplateMismatch(PromptError):
    """Training would teach the model to answer after a prompt it never sees at inference."""


@dataclass(frozen=True)
class TokenAlignment:
    """Token IDs of both renderings of one prompt, and where they part."""

    prompt_ids: tuple[int, ...]
    full_ids: tuple[int, ...]
    diverge_at: int | None

    @property
    def is_prefix(self) -> bool:
        return self.diverge_at is None

    @property
    def completion_ids(self) -> tuple[int, ...]:
        """The tokens after the prompt: the answer letter and any end-of-turn tokens."""
        if not self.is_prefix:
            raise TemplateMismatch("the inference rendering is not a token prefix of the training rendering")
        return self.full_ids[len(self.prompt_ids):]

    def describe(self, tokenizer: Any) -> str:
        """Both token sequences around the first difference, in words a user can act on."""
        if self.is_prefix:
            return "the inference prompt is a token prefix of the training conversation"
        start = max(0, self.diverge_at - _CONTEXT)

        def window(ids: tuple[int, ...]) -> str:
            shown = ids[start:self.diverge_at + _CONTEXT]
            # Mark where a sequence stops, so a training text that ends at the prompt reads as such.
            end = ["(end)"] if self.diverge_at + _CONTEXT >= len(ids) else []
            return " ".join([*(f"{tokenizer.convert_ids_to_tokens(i)!r}({i})" for i in shown), *end])

        return (
            f"the inference prompt ({len(self.prompt_ids)} tokens) is not a token prefix of the training "
            f"conversation ({len(self.full_ids)} tokens): they differ at token {self.diverge_at}.\n"
            f"  inference: {window(self.prompt_ids)}\n"
            f"  training:  {window(self.full_ids)}\n"
            "The model would be trained to answer after text it never reads at inference (for example a "
            "template whose generation prompt adds a block the training conversation lacks, or a letter "
            "that merges with the preceding whitespace). Fix the chat template or choose another preset.")


def align(tokenizer: Any, preset: PromptPreset, text: str, answer_letter: str) -> TokenAlignment:
    """Tokenize both renderings of one prompt and find the first token where they differ."""
    prompt_ids = tuple(encode_rendered(tokenizer, preset, render_inference(tokenizer, preset, text)))
    full_ids = tuple(encode_conversation(tokenizer, preset, render_training(tokenizer, preset, text, answer_letter)))
    diverge_at = None
    for index, token_id in enumerate(prompt_ids):
        if index >= len(full_ids) or full_ids[index] != token_id:
            diverge_at = index
            break
    if diverge_at is None and len(full_ids) == len(prompt_ids):
        diverge_at = len(prompt_ids)  # nothing follows the prompt: no answer token to train
    return TokenAlignment(prompt_ids=prompt_ids, full_ids=full_ids, diverge_at=diverge_at)
